"""Baseline: a plain tutorial CNN trained on the *same* patient split as a run folder.

Usage:
    python bench/baseline_tutorial_cnn.py --run runs/default [--data ../shared/data/nih-cell-images]

The issue's yardstick is "three conv blocks at 64x64, 10 epochs, flips and rotations".
This script trains exactly that on the run's manifest (same train/validation/test
patients, same decode and resize) and prints its validation and test metrics next to
the run's own, so the comparison is made in one place on identical data.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import keras
import numpy as np
from keras import layers

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.evaluation import summarize
from malaria_classifier.pipeline import make_dataset
from malaria_classifier.splits import read_manifest


def build_tutorial_cnn(size: int = 64) -> keras.Model:
    inputs = keras.Input((size, size, 3), dtype="uint8")
    x = layers.Rescaling(1 / 255)(inputs)
    for filters in (32, 64, 128):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D()(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    outputs = layers.Dense(2, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    rows = read_manifest(args.run / "manifest.csv")
    config = TrainingConfig(
        image_size=64,
        batch_size=32,
        zoom_range=0.0,
        shift_range=0.0,
        brightness_delta=0.0,
        contrast_range=0.0,
        saturation_range=0.0,
        hue_delta=0.0,
    )
    keras.utils.set_random_seed(0)
    split_rows = {s: [r for r in rows if r.split == s] for s in ("train", "validation", "test")}
    datasets = {
        s: make_dataset(
            [args.data / r.path for r in split_rows[s]],
            [r.label for r in split_rows[s]],
            config,
            training=s == "train",
        )
        for s in split_rows
    }
    model = build_tutorial_cnn()
    started = time.monotonic()
    model.fit(datasets["train"], epochs=args.epochs, verbose=2)
    seconds = time.monotonic() - started
    metrics_path = args.run / "metrics.json"
    run_metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    print(f"tutorial CNN: {model.count_params():,} parameters, trained {seconds / 60:.1f} min")
    for split in ("validation", "test"):
        y_true = np.array([CLASS_NAMES.index(r.label) for r in split_rows[split]])
        y_score = model.predict(datasets[split], verbose=0)[:, 1]
        baseline = summarize(y_true, y_score, [r.patient for r in split_rows[split]], split)
        for name in ("accuracy", "roc_auc", "recall", "specificity"):
            theirs = baseline["metrics"][name]
            line = (
                f"{split:<10} {name:<11} tutorial CNN {theirs['value']:.4f} "
                f"[{theirs['ci95'][0]:.4f}, {theirs['ci95'][1]:.4f}]"
            )
            if split in run_metrics:
                ours = run_metrics[split]["metrics"][name]
                line += f"   run {ours['value']:.4f} [{ours['ci95'][0]:.4f}, {ours['ci95'][1]:.4f}]"
            print(line)


if __name__ == "__main__":
    main()
