"""Decode image files in worker processes, ahead of the model, in order.

Decoding a PNG cell is about half C (zlib, unfiltering) and half Python (Pillow's
chunk parsing, our checks). Decode threads therefore fight the main thread, which
runs the model and the "Not a cell" statistics, for Python's global lock; worker
processes do not. ``malaria predict`` on large folders uses :class:`DecodePool`; everything
else (training, small batches) uses the threads of :func:`iter_images`.

This module imports no TensorFlow, so a worker starts in a fraction of a second.
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.images import ImageLoadError, load_for_model

LOGGER = logging.getLogger(__name__)

LoadResult = tuple[np.ndarray | None, str | None]


def load_one(path: str | Path, image_size: int) -> LoadResult:
    """Decode and fit one file; a bad file gives its error, never an exception."""
    try:
        return load_for_model(path, image_size), None
    except ImageLoadError as error:
        return None, str(error)


def load_chunk(paths: list[str], image_size: int) -> list[LoadResult]:
    """:func:`load_one` for each file; runs inside a worker process (so: no TensorFlow)."""
    return [load_one(path, image_size) for path in paths]


def default_workers() -> int:
    """Decode threads or processes: one per core (decoding releases the GIL in C)."""
    return max(1, os.cpu_count() or 1)


def iter_images(
    paths: Iterable[str | Path], image_size: int, workers: int | None = None, lookahead: int = 512
) -> Iterator[LoadResult]:
    """Yield ``(image, None)`` or ``(None, error)`` per path, in order, decoding in threads.

    A bounded window of futures keeps memory flat however many paths there are, and
    a bad file yields its error instead of stopping the stream.
    """
    workers = workers or default_workers()
    with ThreadPoolExecutor(max_workers=workers) as executor:
        pending: deque = deque()
        for path in paths:
            pending.append(executor.submit(load_one, path, image_size))
            if len(pending) >= lookahead:
                yield pending.popleft().result()
        for future in pending:
            yield future.result()


# glibc's mallopt parameters (malloc.h) and the values the workers use.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
WORKER_MALLOC_SETTINGS: tuple[tuple[int, int], ...] = (
    (_M_MMAP_THRESHOLD, 32 << 20),  # arrays up to 32 MB come from the heap, not mmap
    (_M_TRIM_THRESHOLD, 128 << 20),  # up to 128 MB freed at the heap's top stay mapped
    (_M_TOP_PAD, 64 << 20),  # the heap grows in 64 MB steps (pages mapped once touched)
)


def keep_freed_memory() -> bool:
    """Make this process reuse the memory it frees instead of returning it to the OS.

    A worker allocates the same few megabytes for every chunk (the decoded pixels, the
    batch, the Not-a-cell statistics' temporaries). With glibc's defaults those pages
    are unmapped or trimmed after each chunk and faulted in again for the next: 0.10 to
    0.12 ms of system time an image, a tenth of the worker's CPU (docs/benchmarks.md
    section 8.2j). Kept, a worker's memory stays at its peak for one chunk, which is
    bounded, so memory stays flat however many files there are. Only the worker
    processes call this (the pool's initializer), never a user's own process.

    Returns:
        Whether the settings took (False where the C library has no ``mallopt``,
        e.g. macOS or Windows; nothing changes there).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(parameter, value) == 1 for parameter, value in WORKER_MALLOC_SETTINGS)


def _start_worker() -> None:
    """Set up a worker: Ctrl+C is the main process's to handle (it stops the pool),
    so workers do not print a traceback each; and freed memory is kept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    keep_freed_memory()


def _worker_ready() -> int:
    """A no-op task: run once per worker at start so its imports happen up front."""
    return os.getpid()


class DecodePool:
    """Worker processes that decode files ahead of the model, kept for many jobs.

    Starting the workers (a new interpreter each, importing numpy, Pillow and the
    PNG decoder) takes 0.5-0.8 s on two cores: as long as decoding 1,000 cells. A
    :class:`~malaria_classifier.prediction.Predictor` therefore starts its pool once,
    beside loading the model, and every later job reuses the warm workers. If a
    worker dies, that job finishes in the calling process and the next job gets a
    fresh pool.

    Example:
        >>> with DecodePool() as pool:  # doctest: +SKIP
        ...     for image, error in pool.iter_images(paths, 64):
        ...         ...

    Args:
        processes: Worker processes; default one per core.
    """

    def __init__(self, processes: int | None = None) -> None:
        self.processes = processes or default_workers()
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> DecodePool:
        """Spawn the workers now (returns at once; they import in the background)."""
        if self._executor is None:
            context = multiprocessing.get_context("spawn")  # never fork TensorFlow
            self._executor = ProcessPoolExecutor(
                self.processes, mp_context=context, initializer=_start_worker
            )
            for _ in range(self.processes):
                self._executor.submit(_worker_ready)
        return self

    def prepare(self, task: Callable[..., Any], *task_arguments: Any) -> None:
        """Run ``task(*task_arguments)`` once per worker, in the background, and return.

        For work every later chunk needs, e.g. loading a model, so that it overlaps
        the caller's own start-up. Best effort: the pool gives each task to whichever
        worker is free, so a worker may get none (it then does the work at its first
        chunk) or two.
        """
        self.start()
        for _ in range(self.processes):
            self._executor.submit(task, *task_arguments)

    def close(self) -> None:
        """Stop the workers (queued work is cancelled); the pool can be started again."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def terminate(self) -> None:
        """Stop the workers at once, without waiting for them (for Ctrl+C).

        :meth:`close` waits for the workers to take their stop signal from the task
        queue; after an interrupt that arrived while they were starting or busy, that
        wait (and the interpreter's own join at exit) could hang. Here each worker is
        sent SIGTERM and reaped; ``ProcessPoolExecutor`` offers no public way before
        Python 3.14, so its process table is read directly.
        """
        if self._executor is None:
            return
        processes = list((getattr(self._executor, "_processes", None) or {}).values())
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._executor = None
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(timeout=2)
            if not process.is_alive():
                continue
            try:  # still there (stuck in a disk read, say): SIGKILL cannot be ignored
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                continue  # already reaped by the executor's own thread
            process.join(timeout=5)

    def __enter__(self) -> DecodePool:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, *exc_info: object) -> None:
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            self.terminate()
        else:
            self.close()

    def iter_images(
        self,
        paths: Iterable[str | Path],
        image_size: int,
        chunk_size: int = 64,
        lookahead_chunks: int = 8,
    ) -> Iterator[LoadResult]:
        """Yield ``(image, None)`` or ``(None, error)`` per path, in order, decoding ahead.

        Args:
            paths: Files to decode, consumed lazily.
            image_size: Side of the square model input.
            chunk_size: Files per task sent to a worker.
            lookahead_chunks: Chunks decoded ahead of the consumer.
        """
        for results in self.map_chunks(
            load_chunk, paths, image_size, chunk_size=chunk_size, lookahead_chunks=lookahead_chunks
        ):
            yield from results

    def map_chunks(
        self,
        task: Callable[..., Any],
        paths: Iterable[str | Path],
        *task_arguments: Any,
        chunk_size: int = 64,
        lookahead_chunks: int = 8,
    ) -> Iterator[Any]:
        """Yield ``task(chunk, *task_arguments)`` for consecutive chunks of ``paths``, in order.

        Paths are sent in chunks (one round trip per ``chunk_size`` files) and at most
        ``lookahead_chunks`` chunks are in flight, so memory stays flat however many
        paths there are. If a worker process dies (e.g. killed for memory by a hostile
        file), the chunks it held and everything after them run in this process
        instead: the stream goes on and no file is lost. ``task`` must be a module-level
        function (it is pickled by name) that reports a bad file in its result rather
        than raising.

        Args:
            task: What a worker does with a chunk: ``task(list_of_paths, *task_arguments)``.
            paths: Files, consumed lazily.
            task_arguments: Passed to every call of ``task`` after the chunk.
            chunk_size: Files per task sent to a worker.
            lookahead_chunks: Chunks computed ahead of the consumer.
        """
        self.start()
        executor = self._executor
        path_iterator = iter(str(path) for path in paths)
        pending: deque[tuple[list[str], Future]] = deque()
        broken = False
        try:
            while True:
                while not broken and len(pending) < lookahead_chunks:
                    chunk = list(islice(path_iterator, chunk_size))
                    if not chunk:
                        break
                    try:
                        pending.append((chunk, executor.submit(task, chunk, *task_arguments)))
                    except BrokenProcessPool:
                        broken = self._mark_broken(broken)
                        pending.append((chunk, _failed_future()))
                if not pending:
                    break
                chunk, future = pending.popleft()
                try:
                    result = future.result()
                except BrokenProcessPool:
                    broken = self._mark_broken(broken)
                    result = task(chunk, *task_arguments)
                yield result
            if broken:
                while chunk := list(islice(path_iterator, chunk_size)):
                    yield task(chunk, *task_arguments)
        finally:
            # A consumer that stops early leaves no queued work behind for the next job.
            for _, future in pending:
                future.cancel()

    def _mark_broken(self, already_broken: bool) -> bool:
        _warn_once(already_broken)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None  # the next job starts a fresh pool
        return True


def _warn_once(already_broken: bool) -> None:
    if not already_broken:
        LOGGER.warning("A decode process died; decoding the rest in this process.")


def _failed_future() -> Future:
    future: Future = Future()
    future.set_exception(BrokenProcessPool("the decode pool is broken"))
    return future
