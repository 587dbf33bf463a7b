"""Scoring in the decode workers: rows as in the main process, dead workers survived."""

import pytest
from conftest import kill_workers, write_cells

from malaria_classifier import worker_scoring
from malaria_classifier.model_card import default_model_path
from malaria_classifier.prediction import Predictor
from malaria_classifier.worker_scoring import (
    PROCESS_DECODE_MIN_FILES,
    ServingSource,
    worker_forward,
)


def _job_with_bad_files(folder) -> list[str]:
    """Enough cells for the worker processes, with an unreadable file and a missing one."""
    paths = write_cells(folder, PROCESS_DECODE_MIN_FILES + 40)
    broken = folder / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return [*paths[:100], str(broken), str(folder / "missing.png"), *paths[100:]]


def test_workers_score_the_bundled_model_like_the_main_process(tmp_path):
    # The bundled default has a serving copy and a Not-a-cell check that needs the
    # network's features: each worker then runs the whole path for its chunk.
    paths = _job_with_bad_files(tmp_path)
    expected = list(Predictor(decode_processes=False).predict_paths(paths))

    with Predictor(decode_processes=True) as in_workers:
        # The main process must not run the forward pass: the workers do.
        in_workers._forward = None
        rows = list(in_workers.predict_paths(paths))

    assert rows == expected
    assert [row.path for row in rows] == paths
    assert "broken.png" in rows[100].error and "does not exist" in rows[101].error
    assert {row.decision for row in rows[:100]} >= {"Not a cell"}  # the check ran


def test_a_killed_scoring_worker_loses_no_file(tmp_path, caplog, monkeypatch):
    paths = _job_with_bad_files(tmp_path)
    expected = list(Predictor(decode_processes=False).predict_paths(paths))
    # Small chunks, so most of the job is still to be sent when the workers die (with
    # the look-ahead window of 8 chunks, 64 files at most are in flight).
    monkeypatch.setattr(worker_scoring, "WORKER_CHUNK_FILES", 8)

    with Predictor(decode_processes=True, batch_size=32) as predictor:
        stream = predictor.predict_paths(paths)
        first = next(stream)
        kill_workers()
        rows = [first, *stream]

    assert "decode process died" in caplog.text
    assert rows == expected


def test_a_worker_refuses_a_serving_copy_that_changed_under_it():
    source = ServingSource(str(default_model_path()), "0" * 64, with_features=True)

    with pytest.raises(ValueError, match="changed while predicting.*Run the prediction again"):
        worker_forward(source)
