"""Files read a bounded window ahead of the Predictor's rows, in threads or worker processes.

Small jobs decode in threads. Jobs of ``PROCESS_DECODE_MIN_FILES`` files or more go to
the decode worker processes (:class:`~malaria_classifier.decoding.DecodePool`): with a
serving copy each worker scores its own chunk end to end (:func:`score_files`: decode,
forward pass, Not-a-cell statistics) and only the scores come back, so every core runs
one busy process and the main process only builds rows
(:class:`~malaria_classifier.prediction.Predictor`); without one they only decode.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from malaria_classifier.constants import POSITIVE_INDEX
from malaria_classifier.decoding import DecodePool, iter_images, load_chunk
from malaria_classifier.ood_statistics import image_statistics
from malaria_classifier.runtimes import ScoringForward, serving_forward
from malaria_classifier.serving import read_serving_copy

# Jobs at least this large decode in worker processes; smaller ones do not pay the
# fraction of a second it takes to start them.
PROCESS_DECODE_MIN_FILES = 256

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


def stack_cell_scores(
    cells: list[CellScores],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Single cells' scores (from any chunks) as one batch: probabilities, features, statistics."""
    first = cells[0]
    return (
        np.array([cell.probability for cell in cells]),
        None if first.features is None else np.stack([cell.features for cell in cells]),
        None if first.statistics is None else np.stack([cell.statistics for cell in cells]),
    )


# What was read for one readable path: its decoded image or, from a scoring worker,
# its scores; None when it failed (its error then says why).
Loaded = np.ndarray | CellScores | None
# Per input path, in input order: the path, what was read for it, and its error.
Pending = list[tuple[str, Loaded, str | None]]


def batches_ahead(
    pairs: Iterable[tuple[str, str | None]],
    batch_size: int,
    image_size: int,
    pool: DecodePool | None,
    source: ServingSource | None,
    with_statistics: bool,
) -> Iterator[Pending]:
    """The ``(path, error)`` pairs of a walk, read ahead, in batches of ``batch_size`` images.

    Every path comes back in order, with its error when it could not be read, so a
    batch holds ``batch_size`` read images and the failed paths between them (the
    last batch fewer, perhaps none). The other arguments are :func:`read_ahead`'s.
    """
    # Two views of one lazy walk: the reader runs ahead by its look-ahead window, and
    # tee buffers only the paths between the two.
    pairs, pairs_to_load = itertools.tee(pairs)
    readable = (path for path, error in pairs_to_load if error is None)
    loaded = read_ahead(readable, image_size, pool, source, with_statistics)
    pending: Pending = []
    images_pending = 0
    for path, error in pairs:
        item = None
        if error is None:
            item, error = next(loaded)
        pending.append((path, item, error))
        images_pending += item is not None
        if images_pending >= batch_size:
            yield pending
            pending, images_pending = [], 0
    yield pending


def read_ahead(
    paths: Iterator[str],
    image_size: int,
    pool: DecodePool | None,
    source: ServingSource | None,
    with_statistics: bool,
) -> Iterator[tuple[Loaded, str | None]]:
    """Per path, its decoded image or its scores (or its error), computed ahead.

    Large jobs run in the worker processes: there each worker also scores its
    chunk (forward pass and Not-a-cell statistics) when the model has a serving
    copy, so only scores come back and every core runs one busy process (the main
    process then only builds rows). Small jobs decode in threads.

    Args:
        paths: Files to read, in order.
        image_size: Side of the model input.
        pool: The decode worker processes; None decodes every job in threads.
        source: The serving copy the workers score with; None when they only decode.
        with_statistics: Whether scoring workers also compute the Not-a-cell statistics.
    """
    first = list(itertools.islice(paths, PROCESS_DECODE_MIN_FILES))
    paths = itertools.chain(first, paths)
    if pool is None or len(first) < PROCESS_DECODE_MIN_FILES:
        return iter_images(paths, image_size)
    if source is None:
        return pool.iter_images(paths, image_size)
    return _scored_in_workers(pool, paths, image_size, source, with_statistics)


def _scored_in_workers(
    pool: DecodePool,
    paths: Iterator[str],
    image_size: int,
    source: ServingSource,
    with_statistics: bool,
) -> Iterator[tuple[CellScores | None, str | None]]:
    chunks = pool.map_chunks(
        score_files,
        paths,
        image_size,
        source,
        with_statistics,
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
