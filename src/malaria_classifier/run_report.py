"""What a training run writes once its epochs are done: serving copy, evaluation, model card.

``RUN/model.serving.*`` (prediction without TensorFlow), ``RUN/metrics.json`` (validation
and test patients), ``RUN/evaluation/`` (test figures, ``per_patient.csv``) and the model
card's content; :func:`malaria_classifier.training.train_model` writes the card last.
"""

from __future__ import annotations

import logging
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES, DEFAULT_THRESHOLD, POSITIVE_CLASS
from malaria_classifier.evaluation import per_patient_table, roc_points, summarize
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model import count_weight_bytes, load_model
from malaria_classifier.model_card import MODEL_FILE, write_json_atomically
from malaria_classifier.splits import SPLITS, ManifestRow, split_summary

LOGGER = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"


def write_serving_copy_or_warn(model_path: Path) -> None:
    """Write the TensorFlow-free copy that lets `malaria predict` start in a second.

    Optional: without it prediction converts the model in memory, so a conversion
    failure is reported and training still succeeds.
    """
    from malaria_classifier.serving import write_serving_copy

    try:
        write_serving_copy(load_model(str(model_path)), model_path)
    except Exception as error:  # tf2onnx raises many types
        LOGGER.warning(
            "No serving copy written for %s (%s); prediction will convert it.", model_path, error
        )


def evaluate_run(
    run_dir: Path, root: Path, by_split: dict[str, list[ManifestRow]]
) -> dict[str, Any]:
    """Score the best model on validation and test patients; save test figures.

    The test patients' figures and per-patient table go to ``RUN/evaluation/``: a
    cross-validation collects the tables of its folds from there.
    """
    from malaria_classifier.evaluate import PATIENT_TABLE, write_patient_table
    from malaria_classifier.plots import save_figures
    from malaria_classifier.prediction import Predictor

    predictor = Predictor(run_dir / MODEL_FILE)
    metrics: dict[str, Any] = {}
    for split in ("validation", "test"):
        split_rows = by_split[split]
        predictions = list(predictor.predict_paths([root / row.path for row in split_rows]))
        y_true = np.array([CLASS_NAMES.index(row.label) for row in split_rows])
        y_score = np.array([row.probability for row in predictions])
        groups = [row.patient for row in split_rows]
        metrics[split] = summarize(y_true, y_score, groups, split, predictor.threshold)
        if split == "test":
            output_dir = run_dir / "evaluation"
            output_dir.mkdir(exist_ok=True)
            save_figures(
                output_dir,
                metrics[split]["confusion_matrix"]["counts"],
                roc_points(y_true, y_score),
                metrics[split]["metrics"]["roc_auc"]["value"],
                split,
                predictor.threshold,
            )
            write_patient_table(
                per_patient_table(y_true, y_score, groups, predictor.threshold, split),
                output_dir / PATIENT_TABLE,
            )
    write_json_atomically(metrics, run_dir / METRICS_FILE)
    return metrics


def build_model_card(
    config: TrainingConfig,
    run_dir: Path,
    root: Path,
    rows: list[ManifestRow],
    state: dict[str, Any],
    metrics: dict[str, Any],
    training_seconds: float,
) -> dict[str, Any]:
    """The JSON model card: data, split, config, metrics with CIs, versions, date."""
    model = keras.saving.load_model(run_dir / MODEL_FILE, compile=False, safe_mode=True)
    patients = {
        split: sorted({row.patient for row in rows if row.split == split}) for split in SPLITS
    }
    return {
        "model": MODEL_FILE,
        # Which model.keras this card describes: a resumed run compares it.
        "model_sha256": sha256_of_file(run_dir / MODEL_FILE),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "Classify a single red-blood-cell crop from a Giemsa-stained thin blood smear.",
        "class_order": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "probability": f"softmax output {CLASS_NAMES.index(POSITIVE_CLASS)} = P({POSITIVE_CLASS})",
        "decision_threshold": DEFAULT_THRESHOLD,
        "input": {
            "shape": [config.image_size, config.image_size, 3],
            "dtype": "uint8",
            "pixels": "raw RGB 0-255; normalization is inside the model",
            "resize": "longer side scaled to image_size (antialiased bilinear), padded with black",
        },
        "weights": {"parameters": int(model.count_params()), "bytes": count_weight_bytes(model)},
        "data": {
            "folder": str(root),
            "cells": {label: sum(row.label == label for row in rows) for label in CLASS_NAMES},
            "patients": len({row.patient for row in rows}),
        },
        "split": {
            "unit": "patient",
            "seed": config.seed,
            "fractions": {
                "train": round(1 - config.validation_fraction - config.test_fraction, 4),
                "validation": config.validation_fraction,
                "test": config.test_fraction,
            },
            "summary": split_summary(rows),
            "patients": patients,
        },
        "config": config.to_dict(),
        "training": {
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "seconds": round(training_seconds, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        },
        "metrics": metrics,
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
    }
