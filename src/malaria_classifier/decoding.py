"""Decode image files in worker processes, ahead of the model, in order.

Decoding a PNG cell is about half C (zlib, unfiltering) and half Python (Pillow's
chunk parsing, our checks). Decode threads therefore fight the main thread, which
runs the model and the "Not a cell" statistics, for Python's global lock; worker
processes do not. ``malaria predict`` on large folders uses this module; everything
else (training, small batches) uses the threads of ``pipeline.iter_images``.

This module imports no TensorFlow, so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path

import numpy as np

from malaria_classifier.images import ImageLoadError, load_for_model

LOGGER = logging.getLogger(__name__)

LoadResult = tuple[np.ndarray | None, str | None]


def load_chunk(paths: list[str], image_size: int) -> list[LoadResult]:
    """Decode and fit each file; a bad file gives its error, never an exception.

    Runs inside a worker process, so it must stay importable without TensorFlow.
    """
    results: list[LoadResult] = []
    for path in paths:
        try:
            results.append((load_for_model(path, image_size), None))
        except ImageLoadError as error:
            results.append((None, str(error)))
    return results


def default_processes() -> int:
    """One decode process per core."""
    return max(1, os.cpu_count() or 1)


def iter_images_in_processes(
    paths: Iterable[str | Path],
    image_size: int,
    processes: int | None = None,
    chunk_size: int = 64,
    lookahead_chunks: int = 8,
) -> Iterator[LoadResult]:
    """Yield ``(image, None)`` or ``(None, error)`` per path, in order, decoding ahead.

    Paths are sent in chunks (one round trip per ``chunk_size`` files) and at most
    ``lookahead_chunks`` chunks are in flight, so memory stays flat however many
    paths there are. If a worker process dies (e.g. killed for memory by a hostile
    file), the chunks it held and everything after them are decoded in this process
    instead: the stream goes on and no file is lost.

    Args:
        paths: Files to decode, consumed lazily.
        image_size: Side of the square model input.
        processes: Worker processes; default one per core.
        chunk_size: Files per task sent to a worker.
        lookahead_chunks: Chunks decoded ahead of the consumer.
    """
    path_iterator = iter(str(path) for path in paths)
    context = multiprocessing.get_context("spawn")  # never fork a process running TensorFlow
    executor = ProcessPoolExecutor(processes or default_processes(), mp_context=context)
    pending: deque[tuple[list[str], Future]] = deque()
    broken = False
    try:
        while True:
            while not broken and len(pending) < lookahead_chunks:
                chunk = list(islice(path_iterator, chunk_size))
                if not chunk:
                    break
                try:
                    pending.append((chunk, executor.submit(load_chunk, chunk, image_size)))
                except BrokenProcessPool:
                    _warn_once(broken)
                    broken = True
                    pending.append((chunk, _failed_future()))
            if not pending:
                break
            chunk, future = pending.popleft()
            try:
                yield from future.result()
            except BrokenProcessPool:
                _warn_once(broken)
                broken = True
                yield from load_chunk(chunk, image_size)
        if broken:
            while chunk := list(islice(path_iterator, chunk_size)):
                yield from load_chunk(chunk, image_size)
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _warn_once(already_broken: bool) -> None:
    if not already_broken:
        LOGGER.warning("A decode process died; decoding the rest in this process.")


def _failed_future() -> Future:
    future: Future = Future()
    future.set_exception(BrokenProcessPool("the decode pool is broken"))
    return future
