"""Epoch checkpoints and their commit rule: kills on each side of state.json, resume."""

import json
import math
import zipfile

import h5py
import keras
import numpy as np
import pytest
from _training_run import TINY, crash_after_first_epoch

from malaria_classifier import checkpoints, training
from malaria_classifier.checkpoints import RunCheckpoint
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.run_folder import RunFolderError
from malaria_classifier.training import train_model


def test_checkpoint_folder_holds_only_what_its_state_names(finished_run):
    checkpoint_dir = finished_run.run_dir / "checkpoint"
    state = json.loads((checkpoint_dir / "state.json").read_text())
    assert state["checkpoint"] == "epoch-002.keras"
    assert state["best_checkpoint"] == f"best-epoch-{state['best_epoch']:03d}.keras"
    named = {state["checkpoint"], state["best_checkpoint"], "state.json"}
    assert {path.name for path in checkpoint_dir.iterdir()} == named
    best = checkpoint_dir / state["best_checkpoint"]
    assert sha256_of_file(best) == sha256_of_file(finished_run.model_path)


def test_saved_model_takes_raw_uint8_and_has_no_optimizer(finished_run, tmp_path):
    model = keras.saving.load_model(finished_run.model_path, compile=False)
    assert model.inputs[0].dtype == "uint8"
    assert getattr(model, "optimizer", None) is None
    with zipfile.ZipFile(finished_run.model_path) as archive:
        archive.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as weights:
        assert "optimizer" not in weights  # the shipped file carries no Adam state
    output = model(np.zeros((2, 32, 32, 3), dtype=np.uint8))
    assert np.allclose(np.asarray(output).sum(axis=1), 1.0, atol=1e-5)


@pytest.fixture
def interrupted_run(synthetic_cells, tmp_path):
    """A run folder whose training died after its first epoch."""
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        crash_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train_model(synthetic_cells, TINY, run_dir, verbose=0)
    return run_dir


def test_interrupted_run_keeps_its_last_good_model_and_resumes(
    synthetic_cells, tmp_path, monkeypatch
):
    original = crash_after_first_epoch(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0)
    assert keras.saving.load_model(run_dir / "model.keras", compile=False) is not None
    assert not list(run_dir.rglob("*.partial.keras"))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1
    assert state["seconds"] > 0

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", original)
    result = train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert result.model_path.is_file()
    # The card counts the first session's epoch too, not only the resumed session.
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["training"]["seconds"] >= round(state["seconds"], 1)
    assert result.seconds >= state["seconds"]


def _optimizer_steps(checkpoint):
    return int(keras.saving.load_model(checkpoint, compile=True).optimizer.iterations.numpy())


def test_a_kill_before_the_state_is_written_resumes_from_the_committed_epoch(
    synthetic_cells, tmp_path, monkeypatch
):
    """Epoch 2's checkpoint is on disk but its state.json never was: resume from epoch 1.

    Before epoch-named checkpoints, this kill resumed epoch 1's state on epoch 2's
    weights and optimizer, training one epoch twice.
    """
    real_write = checkpoints.write_json_atomically

    def die_on_second_state(value, path):
        if path.name == "state.json" and value["epoch"] == 2:
            raise KeyboardInterrupt
        real_write(value, path)

    monkeypatch.setattr(checkpoints, "write_json_atomically", die_on_second_state)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["checkpoint"] == "epoch-001.keras"
    assert (run_dir / "checkpoint" / "epoch-002.keras").is_file()  # uncommitted
    steps_per_epoch = _optimizer_steps(run_dir / "checkpoint" / "epoch-001.keras")

    monkeypatch.setattr(checkpoints, "write_json_atomically", real_write)
    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)

    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert [entry["epoch"] for entry in state["history"]] == [1, 2]
    assert _optimizer_steps(run_dir / "checkpoint" / state["checkpoint"]) == 2 * steps_per_epoch


def test_a_kill_after_the_state_is_written_still_publishes_the_best_model(
    synthetic_cells, tmp_path, monkeypatch
):
    """state.json names a best epoch whose copy to model.keras never happened."""
    real_publish = checkpoints.publish_best_model

    def die(run_dir, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "publish_best_model", die)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0)
    assert not (run_dir / "model.keras").exists()
    best = sha256_of_file(run_dir / "checkpoint" / "best-epoch-001.keras")
    model_at_resume = []
    real_fit = training._fit

    def spy(*arguments):
        model_path = run_dir / "model.keras"
        model_at_resume.append(model_path.is_file() and sha256_of_file(model_path))
        return real_fit(*arguments)

    monkeypatch.setattr(checkpoints, "publish_best_model", real_publish)
    monkeypatch.setattr(training, "_fit", spy)
    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)
    assert model_at_resume == [best]


def test_resuming_a_run_whose_named_checkpoint_is_gone_is_refused(synthetic_cells, interrupted_run):
    run_dir = interrupted_run
    (run_dir / "checkpoint" / "epoch-001.keras").unlink()
    with pytest.raises(RunFolderError, match=r"epoch-001.keras, is missing. Start a new run"):
        train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)


def test_a_run_folder_with_the_older_last_keras_checkpoint_resumes(
    synthetic_cells, interrupted_run
):
    """Runs interrupted before epoch-named checkpoints kept checkpoint/last.keras."""
    run_dir = interrupted_run
    checkpoint_dir = run_dir / "checkpoint"
    state = json.loads((checkpoint_dir / "state.json").read_text())
    (checkpoint_dir / state.pop("checkpoint")).rename(checkpoint_dir / "last.keras")
    (checkpoint_dir / state.pop("best_checkpoint")).unlink()
    (checkpoint_dir / "state.json").write_text(json.dumps(state))

    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)

    state = json.loads((checkpoint_dir / "state.json").read_text())
    assert [entry["epoch"] for entry in state["history"]] == [1, 2]
    assert not (checkpoint_dir / "last.keras").exists()  # superseded by epoch-002.keras


def test_a_state_without_a_validation_loss_yet_reads_back_as_infinity(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomically({"epoch": 0, "best_val_loss": math.inf, "history": []}, path)
    assert checkpoints.read_state(path)["best_val_loss"] == math.inf
