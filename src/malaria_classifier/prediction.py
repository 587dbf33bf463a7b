"""Score image files with a trained model: the :class:`Predictor` API and CSV/JSON output.

Rows have the columns ``path,label,probability,confidence,error``: ``probability`` is
always P(Parasitized); ``confidence`` is the probability of the chosen label. A bad
file gets a row with an empty label and a clear error, and the rest go on.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from malaria_classifier.constants import (
    CLASS_NAMES,
    DEFAULT_THRESHOLD,
    POSITIVE_CLASS,
    POSITIVE_INDEX,
)
from malaria_classifier.data import is_image_file
from malaria_classifier.images import resize_with_pad
from malaria_classifier.model_card import default_model_path, read_model_card
from malaria_classifier.pipeline import iter_images

OUTPUT_COLUMNS: tuple[str, ...] = ("path", "label", "probability", "confidence", "error")


@dataclass
class PredictionRow:
    """One image's result; ``label`` is empty and ``error`` set when it failed."""

    path: str
    label: str
    probability: float | None
    confidence: float | None
    error: str


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[tuple[str, str | None]]:
    """Turn files and folders (searched recursively) into ``(path, error)`` pairs.

    A path that does not exist yields an error instead of stopping the batch; files
    inside folders that are not images (by suffix) are skipped silently, while a
    file named explicitly is always tried.
    """
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for current, dirs, files in os.walk(path, followlinks=False):
                dirs.sort()
                for name in sorted(files):
                    candidate = Path(current) / name
                    if is_image_file(candidate):
                        yield str(candidate), None
        elif path.exists() or path.is_symlink():
            yield str(path), None
        else:
            yield str(path), f"{path}: does not exist. Check the path."


def label_for(probability: float, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The predicted class for P(Parasitized); ties go to Parasitized (safer to recheck)."""
    return POSITIVE_CLASS if probability >= threshold else CLASS_NAMES[1 - POSITIVE_INDEX]


class Predictor:
    """A loaded model that scores images; load once, call many times.

    Example:
        >>> predictor = Predictor()  # the bundled default model
        >>> rows = list(predictor.predict_paths(["cells/"]))
        >>> rows[0].label, rows[0].probability  # doctest: +SKIP
        ('Parasitized', 0.998)

    Args:
        model_path: A ``.keras`` file from ``malaria train``; None for the default.
        batch_size: Images per forward pass.
        threshold: P(Parasitized) at or above which a cell is called Parasitized;
            None takes the model card's ``decision_threshold`` (0.5 without a card).
        runtime: What runs the forward pass: ``keras`` (TensorFlow), ``onnx`` (ONNX
            Runtime, fastest on CPU) or ``tflite`` (LiteRT); the last two need the
            ``export`` extra and convert the model in memory at start-up.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 256,
        threshold: float | None = None,
        runtime: str = "keras",
    ) -> None:
        from malaria_classifier.model import load_model
        from malaria_classifier.runtimes import check_runtime, make_forward

        self.runtime = check_runtime(runtime)

        self.model_path = Path(model_path) if model_path else default_model_path()
        self.model = load_model(str(self.model_path))
        self.card = read_model_card(self.model_path)
        self.image_size = int(self.model.input_shape[1])
        self.batch_size = batch_size
        if threshold is None:
            threshold = float(self.card.get("decision_threshold", DEFAULT_THRESHOLD))
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {threshold}.")
        self.threshold = threshold
        self._forward = make_forward(self.model, runtime)

    def predict_arrays(self, images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        """P(Parasitized) for RGB uint8 arrays of any size (each is resized with padding)."""
        batch = np.stack(
            [
                image
                if image.shape[:2] == (self.image_size, self.image_size)
                else resize_with_pad(image, self.image_size)
                for image in images
            ]
        )
        return self._predict_batch(batch)

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        probabilities = np.asarray(self._forward(batch))
        return probabilities[:, POSITIVE_INDEX].astype(np.float64)

    def predict_paths(self, inputs: Iterable[str | Path]) -> Iterator[PredictionRow]:
        """Yield one row per image under ``inputs``, in order, streaming in batches.

        Folders are walked lazily and decoding runs a bounded window ahead, so memory
        stays flat however many files there are.
        """
        # Two views of one lazy walk: the loader runs ahead by its look-ahead window,
        # and tee buffers only the paths between the two.
        pairs, pairs_to_load = itertools.tee(expand_inputs(inputs))
        readable = (path for path, error in pairs_to_load if error is None)
        loaded = iter_images(readable, self.image_size)
        pending: list[tuple[str, np.ndarray | None, str | None]] = []
        images_pending = 0
        for path, error in pairs:
            image = None
            if error is None:
                image, error = next(loaded)
            pending.append((path, image, error))
            images_pending += image is not None
            if images_pending >= self.batch_size:
                yield from self._flush(pending)
                pending, images_pending = [], 0
        yield from self._flush(pending)

    def _flush(
        self, pending: list[tuple[str, np.ndarray | None, str | None]]
    ) -> list[PredictionRow]:
        images = [image for _, image, _ in pending if image is not None]
        probabilities = iter(self._predict_batch(np.stack(images)) if images else [])
        rows = []
        for path, image, error in pending:
            if image is None:
                rows.append(PredictionRow(path, "", None, None, error or "unknown error"))
                continue
            probability = float(next(probabilities))
            label = label_for(probability, self.threshold)
            confidence = probability if label == POSITIVE_CLASS else 1.0 - probability
            rows.append(PredictionRow(path, label, probability, confidence, ""))
        return rows


def write_rows(rows: Iterable[PredictionRow], handle: TextIO, output_format: str) -> dict[str, int]:
    """Stream rows to ``handle`` as CSV or JSON; returns counts of predicted and failed.

    Raises:
        ValueError: For a format other than ``csv`` or ``json``.
    """
    if output_format not in ("csv", "json"):
        raise ValueError(f"Unknown output format {output_format!r}; use 'csv' or 'json'.")
    counts = {"predicted": 0, "failed": 0}
    writer = csv.writer(handle, lineterminator="\n") if output_format == "csv" else None
    if writer:
        writer.writerow(OUTPUT_COLUMNS)
    else:
        handle.write("[")
    for index, row in enumerate(rows):
        counts["failed" if row.error else "predicted"] += 1
        if writer:
            writer.writerow(_csv_values(row))
        else:
            handle.write(("," if index else "") + "\n  " + json.dumps(asdict(row)))
        handle.flush()
    if not writer:
        handle.write("\n]\n")
    return counts


def _csv_values(row: PredictionRow) -> list[str]:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    return [row.path, row.label, number(row.probability), number(row.confidence), row.error]
