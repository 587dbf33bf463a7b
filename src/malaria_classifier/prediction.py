"""Score image files with a trained model: the :class:`Predictor` API and CSV/JSON output.

Rows have the columns ``path,label,probability,confidence,error,decision,reason``:
``probability`` is always P(Parasitized), calibrated when the model has a calibration
(``malaria calibrate``); ``confidence`` is the probability of the chosen label;
``decision`` is Parasitized, Uninfected, Uncertain or Not a cell (see
:mod:`malaria_classifier.decision`), and ``reason`` says why a cell is Uncertain or Not a
cell (empty for a clear call). A bad file gets a row with an empty label and
decision and a clear error, and the rest go on. What a Predictor is given is checked in
:mod:`~malaria_classifier.prediction_inputs`; files are read (and in decode workers,
scored) ahead of the rows by :mod:`~malaria_classifier.worker_scoring`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from malaria_classifier.constants import (
    CLASS_NAMES,
    DEFAULT_THRESHOLD,
    POSITIVE_CLASS,
    POSITIVE_INDEX,
)
from malaria_classifier.decision import load_decision_rule, transformed_views
from malaria_classifier.decoding import DecodePool
from malaria_classifier.model_card import default_model_path, read_model_card
from malaria_classifier.ood import FinalLayer, combine_signals, final_layer_weights
from malaria_classifier.ood_statistics import image_statistics
from malaria_classifier.prediction_inputs import (
    check_predictor_arguments,
    distinct_inputs,  # noqa: F401  (malaria predict imports it from here)
    expand_inputs,
    prepare_arrays,
)
from malaria_classifier.runtimes import (
    check_runtime,
    make_best_scoring_forward,
    serving_forward,
)
from malaria_classifier.serving import read_serving_copy
from malaria_classifier.verdict import VerdictRule
from malaria_classifier.worker_scoring import (
    PROCESS_DECODE_MIN_FILES,  # noqa: F401  (malaria predict imports it from here)
    CellScores,
    Pending,
    ServingSource,
    batches_ahead,
    stack_cell_scores,
    worker_forward,
)

OUTPUT_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "probability",
    "confidence",
    "error",
    "decision",
    "reason",
)


@dataclass
class PredictionRow:
    """One image's result; ``label`` is empty and ``error`` set when it failed.

    ``probability`` and ``confidence`` are calibrated; ``uncalibrated_probability`` is
    the raw softmax output, and ``reason`` says why a cell is Uncertain or Not a cell.
    """

    path: str
    label: str
    probability: float | None
    confidence: float | None
    error: str
    decision: str = ""
    uncalibrated_probability: float | None = None
    reason: str = ""


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
        threshold: Calibrated P(Parasitized) at or above which a cell is called
            Parasitized; None takes the model card's ``decision_threshold`` (0.5
            without a card).
        test_time_views: Also score three flipped/rotated copies of every cell and call
            it Uncertain when they disagree (about 2x slower; off by default).
        check_ood: Run the "Not a cell" check when the model has an ``ood.json``.
        runtime: What runs the forward pass: ``auto`` (the default, as in ``malaria
            predict``: ONNX Runtime, the fastest on CPU, or Keras for a model it cannot
            convert), ``onnx`` (ONNX Runtime), ``keras`` (TensorFlow) or ``tflite``
            (LiteRT, needs the ``export`` extra); all agree within 1e-4. ``auto`` and
            ``onnx`` use the model's serving copy (``model.serving.onnx``, written by
            ``malaria train``; see :mod:`malaria_classifier.serving`) when it matches
            the ``.keras`` file, and then never import TensorFlow: a predictor starts
            in about 0.3 s instead of about 6 s. Otherwise they, like ``tflite``,
            convert the model in memory at start-up (under a second). ``tflite``
            cannot feed the "Not a cell" check (pass ``check_ood=False`` with it).
            ``Predictor.runtime`` says which ran.
        decode_processes: Decode jobs of ``PROCESS_DECODE_MIN_FILES`` files or more
            in worker processes (one per core), which do not compete with the model
            for Python's global lock (``malaria predict`` does); with a serving copy
            each worker also scores its own files, so only scores come back. The workers start
            with the predictor and serve every later call; ``close()`` (or a ``with``
            block) stops them. Off by default in the API: like every library that
            starts processes, it needs the calling script's code behind
            ``if __name__ == "__main__":``.
        not_a_cell: Which "Not a cell" limits apply: ``strict`` (fitted on NIH cells
            as imaged; rejects the most non-cell images) or ``other-labs`` (also
            fitted on NIH cells changed to look like other laboratories' crops:
            smaller, blurred, re-stained, on a smear background; accepts those, but
            lets more non-cells through). See docs/benchmarks.md section 5.
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        batch_size: int = 256,
        threshold: float | None = None,
        test_time_views: bool = False,
        check_ood: bool = True,
        runtime: str = "auto",
        decode_processes: bool = False,
        not_a_cell: str = "strict",
    ) -> None:
        check_runtime(runtime)
        check_predictor_arguments(
            model_path, threshold, test_time_views, check_ood, decode_processes
        )
        # The "Not a cell" image statistics (numpy, which releases the GIL) run on this
        # thread while the forward pass of the same batch runs.
        self._statistics_thread = ThreadPoolExecutor(1, thread_name_prefix="ood-statistics")
        # Started first, so the workers' imports overlap loading the model.
        self._decode_pool = DecodePool().start() if decode_processes else None
        try:
            self._load(model_path, batch_size, threshold, check_ood, runtime, not_a_cell)
        except BaseException:
            self.close()
            raise
        self.test_time_views = test_time_views
        self.decode_processes = decode_processes
        if self._serving_source is not None:
            # The workers load the model while this process finishes starting up.
            self._decode_pool.prepare(worker_forward, self._serving_source)

    def _load(
        self,
        model_path: str | Path | None,
        batch_size: int,
        threshold: float | None,
        check_ood: bool,
        runtime: str,
        not_a_cell: str,
    ) -> None:
        if model_path is not None and not str(model_path).strip():
            raise ValueError(
                "model_path is empty (an unset variable?); pass a .keras file, or None for "
                "the bundled default model."
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        self.card = read_model_card(self.model_path)
        self.batch_size = batch_size
        self.rule = load_decision_rule(self.model_path, self.card, threshold, not_a_cell)
        if not check_ood:
            self.rule.ood = None
        self.threshold = self.rule.threshold
        self.verdict_rule: VerdictRule | None = VerdictRule.from_card(self.card)
        self._with_features = self.rule.ood is not None and self.rule.ood.density is not None
        # With decode processes on every core, the forward pass gets one thread: a
        # second one costs 20% more CPU time (0.45 vs 0.37 core-ms an image) that the
        # decoders need (docs/benchmarks.md 8.2e).
        threads = 1 if self._decode_pool else None
        self._model = None
        serving = read_serving_copy(self.model_path) if runtime in ("auto", "onnx") else None
        self._serving_source: ServingSource | None = None
        if serving is not None:  # no TensorFlow needed (serving.py)
            self._forward = serving_forward(serving, self._with_features, threads)
            if self._decode_pool is not None:  # the workers will score with the same copy
                self._serving_source = ServingSource(
                    str(self.model_path),
                    serving.onnx_sha256,
                    self._with_features,
                )
            self.runtime, self.image_size = "onnx", serving.image_size
            self._final_layer: FinalLayer | None = serving.final_layer
            return
        model = self.model
        self.image_size = int(model.input_shape[1])
        self._final_layer = final_layer_weights(model)
        self._forward, self.runtime = make_best_scoring_forward(
            model, runtime, self._with_features, threads
        )

    @property
    def model(self):
        """The Keras model (loaded on first use: a serving copy predicts without it)."""
        if self._model is None:
            from malaria_classifier.model import load_model

            self._model = load_model(str(self.model_path))
        return self._model

    def close(self) -> None:
        """Stop the decode worker processes and the statistics thread (if any).

        A closed predictor refuses further work with a clear message; closing twice
        is harmless.
        """
        self._closed = True
        if self._decode_pool is not None:
            self._decode_pool.close()
        self._statistics_thread.shutdown(wait=False)

    def _check_open(self) -> None:
        if getattr(self, "_closed", False):
            raise ValueError(
                "This Predictor is closed (close() or the end of its `with` block); "
                "create a new Predictor to predict again."
            )

    def __enter__(self) -> Predictor:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if (
            exc_type is not None
            and issubclass(exc_type, KeyboardInterrupt)
            and self._decode_pool is not None
        ):
            self._decode_pool.terminate()  # Ctrl+C: stop the workers now, never wait on them
        self.close()

    def predict_arrays(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """Calibrated P(Parasitized) for RGB uint8 arrays of any size, prepared as files
        are (a cell cut out of a smear background, resized with padding)."""
        self._check_open()
        return self._predict_batch(prepare_arrays(images, self.image_size))

    def predict_images(
        self, images: Iterable[np.ndarray], names: Iterable[str] | None = None
    ) -> list[PredictionRow]:
        """Full rows (decision included) for decoded RGB arrays, e.g. dashboard uploads.

        Args:
            images: uint8 arrays ``(height, width, 3)`` of any size: a list, a batch
                array ``(n, height, width, 3)`` or any iterable (read once, scored as
                one batch; for a large stream use :meth:`predict_paths` on files).
            names: Shown in the ``path`` field; defaults to ``image_<n>``.
        """
        self._check_open()
        if not isinstance(images, (Sequence, np.ndarray)):
            images = list(images)  # a generator: len() and two passes need a list
        names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        if len(names) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(names)} names; pass one each.")
        if not len(images):
            return []
        return self._rows_for_batch(names, prepare_arrays(images, self.image_size))

    def _raw_scores(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Uncalibrated P(Parasitized) and, when the OOD check needs them, features."""
        probabilities, features = self._forward(batch)
        return probabilities[:, POSITIVE_INDEX].astype(np.float64), features

    def _predict_batch(self, batch: np.ndarray) -> np.ndarray:
        return self.rule.calibrate(self._raw_scores(batch)[0])

    def _rows_for_batch(self, names: Sequence[str], batch: np.ndarray) -> list[PredictionRow]:
        """Score one batch and build its rows: calibration, views, OOD, decision."""
        statistics: Future | None = None
        if self.rule.ood is not None:
            statistics = self._statistics_thread.submit(image_statistics, batch)
        raw, features = self._raw_scores(batch)
        views = None
        if self.test_time_views:
            view_raw, _ = self._raw_scores(transformed_views(batch))
            views = self.rule.calibrate(view_raw).reshape(-1, len(batch)).T
        return self._rows_from_scores(
            names, raw, features, statistics.result() if statistics else None, views
        )

    def _rows_from_scores(
        self,
        names: Sequence[str],
        raw: np.ndarray,
        features: np.ndarray | None,
        statistics: np.ndarray | None,
        views: np.ndarray | None = None,
    ) -> list[PredictionRow]:
        """Rows from a batch's raw scores: calibration, the Not-a-cell check, decision."""
        calibrated = self.rule.calibrate(raw)
        ood_reasons = None
        if self.rule.ood is not None and statistics is not None:
            signals = combine_signals(
                statistics, features, self.rule.ood.density, self._final_layer
            )
            ood_reasons = self.rule.ood.reasons(signals)
        decisions, reasons = self.rule.decide(calibrated, ood_reasons, views)
        rows = []
        for index, name in enumerate(names):
            probability = float(calibrated[index])
            label = label_for(probability, self.threshold)
            confidence = probability if label == POSITIVE_CLASS else 1.0 - probability
            rows.append(
                PredictionRow(
                    name,
                    label,
                    probability,
                    confidence,
                    "",
                    decisions[index],
                    float(raw[index]),
                    reasons[index],
                )
            )
        return rows

    def predict_paths(
        self, inputs: Iterable[str | bytes | Path] | str | bytes | os.PathLike
    ) -> Iterator[PredictionRow]:
        """Yield one row per image under ``inputs``, in order, streaming in batches.

        Folders are walked lazily and decoding runs a bounded window ahead, so memory
        stays flat however many files there are.

        Raises:
            ValueError: At the call, not at the first row, when the Predictor is closed.
        """
        self._check_open()
        return self._predict_paths(inputs)

    def _predict_paths(
        self, inputs: Iterable[str | bytes | Path] | str | bytes | os.PathLike
    ) -> Iterator[PredictionRow]:
        # Test-time views need the images themselves: the workers then only decode.
        source = None if self.test_time_views else self._serving_source
        batches = batches_ahead(
            expand_inputs(inputs),
            self.batch_size,
            self.image_size,
            self._decode_pool,
            source,
            self.rule.ood is not None,
        )
        for pending in batches:
            yield from self._flush(pending)

    def _flush(self, pending: Pending) -> list[PredictionRow]:
        loaded = [(path, item) for path, item, _ in pending if item is not None]
        scored = iter(self._rows_for_items(loaded) if loaded else [])
        rows = []
        for path, item, error in pending:
            if item is None:
                rows.append(PredictionRow(path, "", None, None, error or "unknown error"))
            else:
                rows.append(next(scored))
        return rows

    def _rows_for_items(
        self, loaded: list[tuple[str, np.ndarray | CellScores]]
    ) -> list[PredictionRow]:
        names = [path for path, _ in loaded]
        items = [item for _, item in loaded]
        if not isinstance(items[0], CellScores):
            return self._rows_for_batch(names, np.stack(items))
        return self._rows_from_scores(names, *stack_cell_scores(items))


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
            record = {column: getattr(row, column) for column in OUTPUT_COLUMNS}
            handle.write(("," if index else "") + "\n  " + json.dumps(record))
        handle.flush()
    if not writer:
        handle.write("\n]\n")
    return counts


def _csv_values(row: PredictionRow) -> list[str]:
    def number(value: float | None) -> str:
        return "" if value is None else f"{value:.6f}"

    return [
        row.path,
        row.label,
        number(row.probability),
        number(row.confidence),
        row.error,
        row.decision,
        row.reason,
    ]
