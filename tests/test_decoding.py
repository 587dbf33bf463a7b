"""Decoding in worker processes: same pixels, same order, bad files and dead workers survived."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
from _synthetic import save_tiny_model
from conftest import write_png

from malaria_classifier.decoding import iter_images_in_processes
from malaria_classifier.images import load_for_model
from malaria_classifier.prediction import PROCESS_DECODE_MIN_FILES, Predictor


def _cells(folder, count: int) -> list[str]:
    paths = []
    for index in range(count):
        size = (12 + index % 9, 10 + index % 13)
        color = (index % 256, (7 * index) % 256, (13 * index) % 256)
        paths.append(str(write_png(folder / f"cell_{index:04d}.png", size=size, color=color)))
    return paths


def test_images_come_back_in_order_with_the_pixels_of_load_for_model(tmp_path):
    paths = _cells(tmp_path, 40)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(7, str(broken))

    results = list(iter_images_in_processes(paths, 16, processes=2, chunk_size=5))

    assert len(results) == len(paths)
    image, error = results[7]
    assert image is None and "broken.png" in error
    for path, (image, error) in zip(paths[:7] + paths[8:], results[:7] + results[8:], strict=True):
        assert error is None
        np.testing.assert_array_equal(image, load_for_model(path, 16))


def test_a_killed_worker_loses_no_file(tmp_path, caplog):
    paths = _cells(tmp_path, 60)
    stream = iter_images_in_processes(paths, 16, processes=1, chunk_size=4, lookahead_chunks=3)
    first = next(stream)
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)

    results = [first, *stream]

    assert "decode process died" in caplog.text
    assert len(results) == len(paths)
    for path, (image, error) in zip(paths, results, strict=True):
        assert error is None
        np.testing.assert_array_equal(image, load_for_model(path, 16))


def test_predictor_rows_are_the_same_with_decode_processes(tmp_path):
    paths = _cells(tmp_path / "cells", PROCESS_DECODE_MIN_FILES + 20)
    model = save_tiny_model(tmp_path / "model.keras")
    in_threads = Predictor(model, decode_processes=False)
    in_processes = Predictor(model, decode_processes=True)

    expected = list(in_threads.predict_paths([tmp_path / "cells"]))
    actual = list(in_processes.predict_paths([tmp_path / "cells"]))

    assert [row.path for row in actual] == sorted(paths)
    assert actual == expected
