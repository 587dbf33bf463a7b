"""Score image files with a trained model: the :class:`Predictor` API and CSV/JSON output.

Rows have the columns ``path,label,probability,confidence,error,decision,reason``:
``probability`` is always P(Parasitized), calibrated when the model has a calibration
(``malaria calibrate``); ``confidence`` is the probability of the chosen label;
``decision`` is Parasitized, Uninfected, Uncertain or Not a cell (see
:mod:`malaria_classifier.decision`), and ``reason`` says why a cell is Uncertain or Not a
cell (empty for a clear call). A bad file gets a row with an empty label and
decision and a clear error, and the rest go on.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

from malaria_classifier.constants import (
    CLASS_NAMES,
    DEFAULT_THRESHOLD,
    POSITIVE_CLASS,
    POSITIVE_INDEX,
)
from malaria_classifier.data import is_image_file, walk_files
from malaria_classifier.decision import load_decision_rule, transformed_views
from malaria_classifier.decoding import DecodePool, iter_images, load_chunk
from malaria_classifier.images import resize_with_pad
from malaria_classifier.model_card import check_model_path, default_model_path, read_model_card
from malaria_classifier.ood import (
    FinalLayer,
    combine_signals,
    final_layer_weights,
    image_statistics,
)
from malaria_classifier.runtimes import (
    ScoringForward,
    check_runtime,
    make_best_scoring_forward,
    serving_forward,
)
from malaria_classifier.serving import read_serving_copy
from malaria_classifier.verdict import VerdictRule

# Jobs at least this large decode in worker processes; smaller ones do not pay the
# fraction of a second it takes to start them.
PROCESS_DECODE_MIN_FILES = 256

OUTPUT_COLUMNS: tuple[str, ...] = (
    "path",
    "label",
    "probability",
    "confidence",
    "error",
    "decision",
    "reason",
)


# Files a decode worker scores per task when it runs the whole path (decode, forward
# pass, Not-a-cell statistics); the scores are the same whatever the batch (checked:
# identical to the bit for chunks of 100 and batches of 256), so this only trades
# round trips against the look-ahead window.
WORKER_CHUNK_FILES = 128


@dataclass(frozen=True)
class ServingSource:
    """Which serving copy a worker process loads: the same one the predictor loaded."""

    model_path: str
    onnx_sha256: str
    with_features: bool


class CellScores(NamedTuple):
    """One image scored in a worker: raw P(Parasitized), features, image statistics."""

    probability: float
    features: np.ndarray | None
    statistics: np.ndarray | None


class ChunkScores(NamedTuple):
    """What a worker returns for a chunk of files (images themselves stay there)."""

    errors: list[str | None]  # per file; None where it was scored
    probabilities: np.ndarray  # (scored,) raw P(Parasitized), in file order
    features: np.ndarray | None  # (scored, units) penultimate-layer activations
    statistics: np.ndarray | None  # (scored, len(STATISTIC_NAMES)) for the Not-a-cell check

    def cell(self, index: int) -> CellScores:
        """The scores of the ``index``-th file that was scored."""
        return CellScores(
            float(self.probabilities[index]),
            None if self.features is None else self.features[index],
            None if self.statistics is None else self.statistics[index],
        )


# One ONNX Runtime session per worker process, kept for every chunk of every job.
_WORKER_FORWARDS: dict[ServingSource, ScoringForward] = {}


def worker_forward(source: ServingSource) -> ScoringForward:
    """The forward pass of ``source`` in this process (loaded once, one thread).

    Raises:
        ValueError: If the serving copy on disk is no longer the one the predictor
            loaded (the model was retrained or re-calibrated meanwhile).
    """
    forward = _WORKER_FORWARDS.get(source)
    if forward is None:
        serving = read_serving_copy(source.model_path)
        if serving is None or serving.onnx_sha256 != source.onnx_sha256:
            raise ValueError(
                f"The serving copy of {source.model_path} changed while predicting "
                f"(retrained or re-calibrated?). Run the prediction again."
            )
        _WORKER_FORWARDS.clear()  # a worker serves one predictor's model at a time
        forward = _WORKER_FORWARDS[source] = serving_forward(serving, source.with_features, 1)
    return forward


def score_files(
    paths: list[str], image_size: int, source: ServingSource, with_statistics: bool
) -> ChunkScores:
    """Decode, score and measure a chunk of files: the task of a worker process.

    Only the scores travel back (about 0.3 KB an image instead of its 12 KB of
    pixels), and each worker is one busy process per core with no thread beside it:
    1.18 CPU-ms an image against 1.38-1.45 with the forward pass and statistics in
    the main process (docs/benchmarks.md section 8.2i).
    """
    results = load_chunk(paths, image_size)
    errors = [error for _, error in results]
    images = [image for image, _ in results if image is not None]
    if not images:
        return ChunkScores(errors, np.empty(0), None, None)
    batch = np.stack(images)
    probabilities, features = worker_forward(source)(batch)
    statistics = image_statistics(batch) if with_statistics else None
    return ChunkScores(
        errors, probabilities[:, POSITIVE_INDEX].astype(np.float64), features, statistics
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


def expand_inputs(
    inputs: Iterable[str | bytes | Path] | str | bytes | os.PathLike,
) -> Iterator[tuple[str, str | None]]:
    """Turn files and folders (searched recursively) into ``(path, error)`` pairs.

    A path that does not exist, or a folder that cannot be read, yields an error
    instead of stopping the batch; files inside folders that are not images (by
    suffix) are skipped silently, while a file named explicitly is always tried. One
    path on its own (a ``str``, ``bytes`` or ``Path``) is one input, not a sequence of
    characters.
    """
    if isinstance(inputs, str | bytes | os.PathLike):
        inputs = [inputs]
    for item in inputs:
        path = Path(os.fsdecode(item))  # a bytes name (os.listdir(b".")) too
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)  # one system call a file
        except (FileNotFoundError, NotADirectoryError):
            if path.is_symlink():  # a broken link: reading it names the problem
                yield str(path), None
            else:
                yield str(path), f"{path}: does not exist. Check the path."
            continue
        except OSError:  # e.g. permission denied: reading it names the problem
            is_folder = False
        if is_folder:
            for candidate, error in walk_files(path):
                if error is not None:
                    yield str(candidate), error
                elif is_image_file(candidate):
                    yield str(candidate), None
        else:
            yield str(path), None


def distinct_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """The inputs without repeats and without those inside another input folder
    (``cells cells/``, a folder spelled relative and absolute, a file or sub-folder of a
    folder also named, before or after it).

    ``malaria predict`` uses it so that each file is predicted once and a patient's
    verdict never counts a cell twice; ``Predictor.predict_paths`` itself keeps one
    row per path it is given. Sets and each path's own parents, so 100,000 files
    named one by one (a shell glob) cost 100,000 look-ups, not 100,000 squared.
    """
    items = list(inputs)
    resolved = [Path(os.path.realpath(item)) for item in items]
    named = set(resolved)  # a named path that is another one's parent is a folder
    seen: set[Path] = set()
    kept = []
    for item, path in zip(items, resolved, strict=True):
        if path in seen or any(parent in named for parent in path.parents):
            continue
        seen.add(path)
        kept.append(Path(item))
    return kept


def _check_arguments(
    model_path: str | Path | None,
    threshold: float | None,
    test_time_views: bool,
    check_ood: bool,
    decode_processes: bool,
) -> None:
    """Refuse wrong arguments before seconds of model loading, naming the value."""
    if model_path is not None and str(model_path).strip():
        check_model_path(model_path)  # seconds before TensorFlow would be loaded to say so
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0.0 < threshold < 1.0
    ):
        raise ValueError(
            f"threshold must be between 0 and 1 (exclusive), or None for the "
            f"model's own operating threshold; got {threshold!r}."
        )
    switches = {
        "test_time_views": test_time_views,
        "check_ood": check_ood,
        "decode_processes": decode_processes,
    }
    for name, value in switches.items():
        if not isinstance(value, bool | np.bool_):
            raise ValueError(f"{name} must be True or False, got {value!r}.")


def check_rgb_array(image: np.ndarray, index: int) -> np.ndarray:
    """An image array as the model takes it: uint8 RGB ``(height, width, 3)``, 0-255.

    Raises:
        ValueError: Naming the image and what to pass instead; floats are refused
            rather than cast (a float image in [0, 1] cast to uint8 is all black).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(
            f"Image {index} has shape {image.shape}; expected (height, width, 3) RGB. Convert "
            f"grayscale or RGBA first (e.g. PIL's image.convert('RGB'))."
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"Image {index} is {image.dtype}; expected uint8 pixels 0-255. For floats in "
            f"[0, 1] pass (image * 255).round().astype('uint8')."
        )
    return image


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
        _check_arguments(model_path, threshold, test_time_views, check_ood, decode_processes)
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
        return self._predict_batch(self._fit_arrays(images))

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
        return self._rows_for_batch(names, self._fit_arrays(images))

    def _fit_arrays(self, images: np.ndarray | Iterable[np.ndarray]) -> np.ndarray:
        """Prepare arrays exactly as files are prepared (:func:`load_for_model`).

        Every array goes through :func:`resize_with_pad`, also one already of the input
        size: a 64x64 crop on a smear must be cut out like a file of that crop, or the
        API and ``predict_paths`` would give the same pixels different answers. For an
        array that is already a prepared model input the step changes nothing.
        """
        if not isinstance(images, (Sequence, np.ndarray)):
            images = list(images)  # a generator: len() needs a list
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise ValueError(
                f"Got one array of shape {images.shape}; pass a list of images (e.g. "
                f"[image]) or a batch of shape (n, height, width, 3)."
            )
        if not len(images):
            raise ValueError("Got no images; pass at least one (height, width, 3) array.")
        return np.stack(
            [
                resize_with_pad(check_rgb_array(image, index), self.image_size)
                for index, image in enumerate(images)
            ]
        )

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
        # Two views of one lazy walk: the loader runs ahead by its look-ahead window,
        # and tee buffers only the paths between the two.
        pairs, pairs_to_load = itertools.tee(expand_inputs(inputs))
        readable = (path for path, error in pairs_to_load if error is None)
        loaded = self._loaded(readable)
        pending: list[tuple[str, np.ndarray | CellScores | None, str | None]] = []
        images_pending = 0
        for path, error in pairs:
            item = None
            if error is None:
                item, error = next(loaded)
            pending.append((path, item, error))
            images_pending += item is not None
            if images_pending >= self.batch_size:
                yield from self._flush(pending)
                pending, images_pending = [], 0
        yield from self._flush(pending)

    def _loaded(
        self, paths: Iterator[str]
    ) -> Iterator[tuple[np.ndarray | CellScores | None, str | None]]:
        """Per path, its decoded image or its scores (or its error), computed ahead.

        Large jobs run in the worker processes: there each worker also scores its
        chunk (forward pass and Not-a-cell statistics) when the model has a serving
        copy, so only scores come back and every core runs one busy process (the main
        process then only builds rows). Small jobs decode in threads.
        """
        first = list(itertools.islice(paths, PROCESS_DECODE_MIN_FILES))
        paths = itertools.chain(first, paths)
        if self._decode_pool is None or len(first) < PROCESS_DECODE_MIN_FILES:
            return iter_images(paths, self.image_size)
        if self._serving_source is None or self.test_time_views:
            return self._decode_pool.iter_images(paths, self.image_size)
        return self._scored_in_workers(paths)

    def _scored_in_workers(
        self, paths: Iterator[str]
    ) -> Iterator[tuple[CellScores | None, str | None]]:
        chunks = self._decode_pool.map_chunks(
            score_files,
            paths,
            self.image_size,
            self._serving_source,
            self.rule.ood is not None,
            chunk_size=WORKER_CHUNK_FILES,
        )
        for chunk in chunks:
            scored = 0
            for error in chunk.errors:
                if error is not None:
                    yield None, error
                    continue
                yield chunk.cell(scored), None
                scored += 1

    def _flush(
        self, pending: list[tuple[str, np.ndarray | CellScores | None, str | None]]
    ) -> list[PredictionRow]:
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
        return self._rows_from_scores(
            names,
            np.array([item.probability for item in items]),
            None if items[0].features is None else np.stack([item.features for item in items]),
            None if items[0].statistics is None else np.stack([item.statistics for item in items]),
        )


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
