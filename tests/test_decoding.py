"""Decoding in worker processes: same pixels, same order, bad files and dead workers survived."""

from __future__ import annotations

import multiprocessing
import platform
import resource
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from _synthetic import save_tiny_model
from conftest import kill_workers, write_cells

from malaria_classifier.decoding import DecodePool
from malaria_classifier.images import load_for_model
from malaria_classifier.prediction import Predictor
from malaria_classifier.worker_scoring import PROCESS_DECODE_MIN_FILES


def _assert_decoded_like_load_for_model(paths, results) -> None:
    assert len(results) == len(paths)
    for path, (image, error) in zip(paths, results, strict=True):
        assert error is None
        np.testing.assert_array_equal(image, load_for_model(path, 16))


def test_images_come_back_in_order_with_the_pixels_of_load_for_model(tmp_path):
    paths = write_cells(tmp_path, 40)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(7, str(broken))

    with DecodePool(processes=2) as pool:
        results = list(pool.iter_images(paths, 16, chunk_size=5))

    image, error = results[7]
    assert image is None and "broken.png" in error
    _assert_decoded_like_load_for_model(paths[:7] + paths[8:], results[:7] + results[8:])


def test_a_killed_worker_loses_no_file(tmp_path, caplog):
    paths = write_cells(tmp_path, 60)
    with DecodePool(processes=1) as pool:
        stream = pool.iter_images(paths, 16, chunk_size=4, lookahead_chunks=3)
        first = next(stream)
        kill_workers()

        results = [first, *stream]

    assert "decode process died" in caplog.text
    _assert_decoded_like_load_for_model(paths, results)


def test_predictor_rows_are_the_same_with_decode_processes(tmp_path):
    paths = write_cells(tmp_path / "cells", PROCESS_DECODE_MIN_FILES + 20)
    model = save_tiny_model(tmp_path / "model.keras")
    in_threads = Predictor(model, decode_processes=False)
    in_processes = Predictor(model, decode_processes=True)

    expected = list(in_threads.predict_paths([tmp_path / "cells"]))
    actual = list(in_processes.predict_paths([tmp_path / "cells"]))

    assert [row.path for row in actual] == sorted(paths)
    assert actual == expected


def _worker_pids() -> set[int]:
    return {child.pid for child in multiprocessing.active_children()}


def test_a_pool_serves_many_jobs_with_the_same_workers(tmp_path):
    paths = write_cells(tmp_path, 30)
    with DecodePool(processes=2) as pool:
        first = list(pool.iter_images(paths, 16, chunk_size=4))
        workers = _worker_pids()
        second = list(pool.iter_images(reversed(paths), 16, chunk_size=4))
        assert _worker_pids() == workers

    for (image, _), (reversed_image, _) in zip(first, reversed(second), strict=True):
        np.testing.assert_array_equal(image, reversed_image)
    assert not (_worker_pids() & workers)  # closed with the block


def test_a_job_abandoned_halfway_leaves_the_next_job_intact(tmp_path):
    paths = write_cells(tmp_path, 40)
    with DecodePool(processes=1) as pool:
        abandoned = pool.iter_images(paths, 16, chunk_size=2, lookahead_chunks=8)
        next(abandoned)
        abandoned.close()
        results = list(pool.iter_images(paths[::-1], 16, chunk_size=3))

    _assert_decoded_like_load_for_model(paths[::-1], results)


def test_after_a_worker_dies_the_next_job_gets_a_fresh_pool(tmp_path, caplog):
    paths = write_cells(tmp_path, 24)
    with DecodePool(processes=1) as pool:
        stream = pool.iter_images(paths, 16, chunk_size=4, lookahead_chunks=2)
        next(stream)
        kill_workers()
        assert len([next(stream), *stream]) == len(paths) - 1
        assert "decode process died" in caplog.text

        again = list(pool.iter_images(paths, 16, chunk_size=4))

        assert _worker_pids()  # a new worker decoded the second job
    assert [error for _, error in again] == [None] * len(paths)


def page_faults_per_round(chunk: list[str], arrays: int = 6, megabytes: int = 8) -> list[int]:
    """Page faults of each round of allocating, filling and freeing ``arrays`` buffers.

    Runs in a worker process (one round per item of ``chunk``): the pattern of a
    chunk's temporaries, whose pages glibc's defaults hand back to the OS each time.
    """
    faults = []
    for _ in chunk:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffers = [np.ones(megabytes << 20, dtype=np.uint8) for _ in range(arrays)]
        del buffers
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="the malloc settings are glibc's (mallopt)"
)
def test_decode_workers_reuse_freed_memory_instead_of_faulting_it_in_again():
    rounds = ["round"] * 5
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context) as plain_process:
        default = plain_process.submit(page_faults_per_round, rounds).result()
    if sum(default[1:]) < default[0]:
        pytest.skip(f"this C library keeps freed memory by default ({default} page faults)")

    with DecodePool(processes=1) as pool:
        (in_worker,) = pool.map_chunks(page_faults_per_round, rounds, chunk_size=len(rounds))

    # The first round maps the pages; later rounds reuse them.
    assert sum(in_worker[1:]) < in_worker[0] / 10, (default, in_worker)


def test_a_predictor_stops_its_decode_workers_when_closed(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    before = _worker_pids()
    with Predictor(model, decode_processes=True) as predictor:
        started = _worker_pids() - before
        assert len(started) == predictor._decode_pool.processes

    assert not (_worker_pids() & started)


def _sleep_in_worker(seconds: float) -> None:
    import time

    time.sleep(seconds)


@pytest.mark.skipif(platform.system() != "Linux", reason="reads /proc to see the workers")
def test_ctrl_c_stops_busy_workers_at_once_instead_of_waiting_for_them(tmp_path):
    """A worker still busy when Ctrl+C comes must not keep the command from ending."""
    import time

    with pytest.raises(KeyboardInterrupt), DecodePool(2) as pool:
        for _ in range(4):
            pool._executor.submit(_sleep_in_worker, 60)
        deadline = time.monotonic() + 30
        while len(pool._executor._processes) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = list(pool._executor._processes.values())
        assert len(workers) == 2
        time.sleep(1.0)  # both are busy sleeping now
        left_at = time.monotonic()
        raise KeyboardInterrupt
    assert time.monotonic() - left_at < 15  # close() would wait a minute for the sleepers
    # Asked of the OS, not of the Process objects: the executor's own thread may reap a
    # worker first, and its object then never learns the exit code.
    assert [_still_running(worker.pid) for worker in workers] == [False, False]


def _still_running(pid: int) -> bool:
    """Whether ``pid`` is a live (not a zombie, not a reaped) process; Linux only."""
    status = Path(f"/proc/{pid}/status")
    try:
        state = next(line for line in status.read_text().splitlines() if line.startswith("State"))
    except (FileNotFoundError, ProcessLookupError):
        return False
    return "Z" not in state.split()[1]
