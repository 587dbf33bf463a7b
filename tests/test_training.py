"""End-to-end training on synthetic cells: run folder contents, resume, atomic saves."""

import json
import math
import shutil
import zipfile

import h5py
import keras
import numpy as np
import pytest
from _synthetic import write_synthetic_dataset

from malaria_classifier import training
from malaria_classifier.config import TrainingConfig, load_config
from malaria_classifier.images import sha256_of_file
from malaria_classifier.serving import read_serving_copy
from malaria_classifier.splits import check_no_leakage, read_manifest
from malaria_classifier.training import RunCheckpoint, RunFolderError, train_model

TINY = TrainingConfig(
    image_size=32,
    base_filters=8,
    conv_blocks=2,
    dense_units=16,
    batch_size=16,
    epochs=2,
    learning_rate=0.003,
    validation_fraction=0.25,
    test_fraction=0.25,
)


@pytest.fixture(scope="module")
def synthetic_cells(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cells", patients=12)
    (root / "Parasitized" / "C20P10thinF_IMG_truncated_cell_99.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10
    )
    return root


@pytest.fixture(scope="module")
def finished_run(synthetic_cells, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "run"
    return train_model(synthetic_cells, TINY, run_dir, verbose=0)


def crash_after_first_epoch(monkeypatch):
    """Make training die after its first epoch's checkpoint; return the real callback."""
    original = RunCheckpoint.on_epoch_end

    def crash(self, epoch, logs=None):
        original(self, epoch, logs)
        if epoch == 0:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C or the machine died

    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", crash)
    return original


@pytest.fixture
def interrupted_run(synthetic_cells, tmp_path):
    """A run folder whose training died after its first epoch."""
    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        crash_after_first_epoch(patch)
        with pytest.raises(KeyboardInterrupt):
            train_model(synthetic_cells, TINY, run_dir, verbose=0)
    return run_dir


def test_run_folder_holds_everything_needed_to_reproduce(finished_run):
    run_dir = finished_run.run_dir
    for name in (
        "config.yaml",
        "manifest.csv",
        "model.keras",
        "model_card.json",
        "history.json",
        "metrics.json",
        "data_report.json",
        "evaluation/confusion_matrix.png",
        "evaluation/roc_curve.json",
        "evaluation/per_patient.csv",
        "checkpoint/state.json",
        "model.serving.onnx",
        "model.serving.json",
    ):
        assert (run_dir / name).is_file(), name
    assert read_serving_copy(run_dir / "model.keras") is not None  # fresh: predict needs no TF
    assert any((run_dir / "tensorboard").rglob("*tfevents*"))
    assert load_config(run_dir / "config.yaml") == TINY
    assert len(json.loads((run_dir / "history.json").read_text())) == 2


def test_checkpoint_folder_holds_only_what_its_state_names(finished_run):
    checkpoint_dir = finished_run.run_dir / "checkpoint"
    state = json.loads((checkpoint_dir / "state.json").read_text())
    assert state["checkpoint"] == "epoch-002.keras"
    assert state["best_checkpoint"] == f"best-epoch-{state['best_epoch']:03d}.keras"
    named = {state["checkpoint"], state["best_checkpoint"], "state.json"}
    assert {path.name for path in checkpoint_dir.iterdir()} == named
    best = checkpoint_dir / state["best_checkpoint"]
    assert sha256_of_file(best) == sha256_of_file(finished_run.model_path)


def test_the_per_patient_table_says_its_split_and_threshold(finished_run):
    import csv

    with open(finished_run.run_dir / "evaluation" / "per_patient.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert rows and {row["split"] for row in rows} == {"test"}
    assert {float(row["threshold"]) for row in rows} == {0.5}  # not calibrated yet


def test_unreadable_images_are_skipped_and_reported(finished_run):
    report = json.loads((finished_run.run_dir / "data_report.json").read_text())
    assert [entry["path"].endswith("truncated_cell_99.png") for entry in report["unreadable"]] == [
        True
    ]
    rows = read_manifest(finished_run.run_dir / "manifest.csv")
    assert not any("truncated" in row.path for row in rows)


def test_manifest_is_split_by_patient_without_leakage(finished_run):
    rows = read_manifest(finished_run.run_dir / "manifest.csv")
    check_no_leakage(rows)
    assert {row.split for row in rows} == {"train", "validation", "test"}
    assert all(len(row.sha256) == 64 for row in rows)


def test_model_card_describes_data_split_and_metrics(finished_run):
    card = json.loads((finished_run.run_dir / "model_card.json").read_text())
    assert card["class_order"] == ["Uninfected", "Parasitized"]
    assert card["input"]["shape"] == [32, 32, 3]
    assert card["split"]["unit"] == "patient"
    split_patients = card["split"]["patients"]
    assert not set(split_patients["train"]) & set(split_patients["test"])
    test_block = card["metrics"]["test"]
    assert test_block["split"] == "test" and test_block["positive_class"] == "Parasitized"
    assert len(test_block["metrics"]["accuracy"]["ci95"]) == 2
    assert card["versions"]["keras"] == keras.__version__


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


def test_existing_run_is_not_overwritten_without_resume(finished_run, synthetic_cells):
    before = finished_run.model_path.read_bytes()
    with pytest.raises(RunFolderError, match="--resume"):
        train_model(synthetic_cells, TINY, finished_run.run_dir, verbose=0)
    assert finished_run.model_path.read_bytes() == before


def test_resume_without_a_run_is_refused(synthetic_cells, tmp_path):
    with pytest.raises(RunFolderError, match="no manifest"):
        train_model(synthetic_cells, TINY, tmp_path / "new", resume=True, verbose=0)


def test_resume_on_other_data_is_refused_before_training(finished_run, tmp_path):
    other = write_synthetic_dataset(tmp_path / "other", patients=3)
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    (run_dir / "model_card.json").unlink()  # as if killed before the card was written
    before = (run_dir / "model.keras").read_bytes()
    with pytest.raises(RunFolderError, match=r"cells are not in .* Pass the --data folder"):
        train_model(other, TINY, run_dir, resume=True, verbose=0)
    assert (run_dir / "model.keras").read_bytes() == before


def test_a_run_folder_inside_the_data_is_refused(synthetic_cells):
    inside = synthetic_cells / "Parasitized" / "run"
    with pytest.raises(ValueError, match="is inside the data folder"):
        train_model(synthetic_cells, TINY, inside, verbose=0)
    assert not inside.exists()


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
    real_write = training.write_json_atomically

    def die_on_second_state(value, path):
        if path.name == "state.json" and value["epoch"] == 2:
            raise KeyboardInterrupt
        real_write(value, path)

    monkeypatch.setattr(training, "write_json_atomically", die_on_second_state)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0)
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["checkpoint"] == "epoch-001.keras"
    assert (run_dir / "checkpoint" / "epoch-002.keras").is_file()  # uncommitted
    steps_per_epoch = _optimizer_steps(run_dir / "checkpoint" / "epoch-001.keras")

    monkeypatch.setattr(training, "write_json_atomically", real_write)
    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)

    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert [entry["epoch"] for entry in state["history"]] == [1, 2]
    assert _optimizer_steps(run_dir / "checkpoint" / state["checkpoint"]) == 2 * steps_per_epoch


def test_a_kill_after_the_state_is_written_still_publishes_the_best_model(
    synthetic_cells, tmp_path, monkeypatch
):
    """state.json names a best epoch whose copy to model.keras never happened."""
    real_publish = training.publish_best_model

    def die(run_dir, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "publish_best_model", die)
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

    monkeypatch.setattr(training, "publish_best_model", real_publish)
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


def test_resuming_a_finished_run_changes_nothing(finished_run, synthetic_cells, tmp_path, capsys):
    """A card extended by `malaria calibrate` must survive a stray --resume."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    card_path = run_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card["decision_threshold"] = 0.73  # as calibrate leaves it
    card_path.write_text(json.dumps(card))
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    result = train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)

    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    assert result.metrics == json.loads((run_dir / "metrics.json").read_text())
    assert "finished run" in capsys.readouterr().err


def test_a_finished_run_given_more_epochs_trains_them_on_resume(
    finished_run, synthetic_cells, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run.run_dir, run_dir)
    config = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(config.replace("epochs: 2", "epochs: 3"))
    (run_dir / "ood.json").write_text("{}")  # as calibrate left it, for the old model
    card_path = run_dir / "model_card.json"
    card_path.write_text(card_path.read_text().replace('"model_sha256": "', '"model_sha256": "x'))
    assert not training.is_run_finished(run_dir)  # the card describes another model.keras

    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0, exclude_cells=())

    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    card = json.loads(card_path.read_text())
    assert card["training"]["epochs_run"] == 3
    assert card["model_sha256"] == sha256_of_file(run_dir / "model.keras")
    assert not (run_dir / "ood.json").exists()  # its limits were fitted on the old model
    assert training.is_run_finished(run_dir)


def test_training_learns_the_synthetic_signal(synthetic_cells, tmp_path):
    """Dark dots (parasites) on pink discs are easy: a few epochs must beat chance clearly."""
    config = TINY.replace(epochs=8, augment=False)
    result = train_model(synthetic_cells, config, tmp_path / "learn", verbose=0)
    history = json.loads((tmp_path / "learn" / "history.json").read_text())
    assert max(entry["accuracy"] for entry in history) > 0.8
    assert result.metrics["validation"]["metrics"]["roc_auc"]["value"] > 0.8


def test_training_seed_trains_other_weights_on_the_same_patients(
    finished_run, synthetic_cells, tmp_path
):
    """Seed spread and ensembles need a second model on exactly the same split."""
    result = train_model(synthetic_cells, TINY.replace(training_seed=7), tmp_path / "s7", verbose=0)

    same_split = read_manifest(finished_run.run_dir / "manifest.csv")
    assert read_manifest(result.run_dir / "manifest.csv") == same_split
    first = keras.saving.load_model(finished_run.model_path, compile=False)
    second = keras.saving.load_model(result.model_path, compile=False)
    kernel = first.get_layer("last_conv_conv").get_weights()[0]
    assert not np.allclose(kernel, second.get_layer("last_conv_conv").get_weights()[0])


def test_listed_training_cells_are_left_out_of_training_and_resume_keeps_them(
    finished_run, synthetic_cells, tmp_path, monkeypatch
):
    """Suspected label errors are not trained on; validation and test cells always stay."""
    split = read_manifest(finished_run.run_dir / "manifest.csv")  # same data and seed
    train_rows = [row for row in split if row.split == "train"]
    test_row = next(row for row in split if row.split == "test")
    listed = {row.sha256 for row in train_rows[:3]} | {test_row.path}
    seen_by_training = []
    real_datasets = training.make_split_datasets

    def spy(root, rows, config):
        seen_by_training.append({row.path for row in rows})
        return real_datasets(root, rows, config)

    monkeypatch.setattr(training, "make_split_datasets", spy)
    original = crash_after_first_epoch(monkeypatch)
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0, exclude_cells=listed)
    monkeypatch.setattr(RunCheckpoint, "on_epoch_end", original)
    result = train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0)

    left_out = read_manifest(run_dir / "left_out_of_training.csv")
    assert left_out == train_rows[:3]
    assert len(seen_by_training) == 2  # the first run and the resumed one
    for paths in seen_by_training:
        assert not paths & {row.path for row in left_out}
        assert test_row.path in paths and {row.path for row in train_rows[3:]} <= paths
    assert read_manifest(run_dir / "manifest.csv") == split  # the split itself is unchanged
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["training"]["cells_left_out"] == 3
    assert result.metrics["test"]["cells"] == sum(row.split == "test" for row in split)


def test_a_fresh_start_drops_the_cell_list_of_a_start_that_finished_no_epoch(
    finished_run, synthetic_cells, tmp_path, monkeypatch
):
    split = read_manifest(finished_run.run_dir / "manifest.csv")
    train_rows = [row for row in split if row.split == "train"]
    seen_by_training = []
    real_datasets = training.make_split_datasets

    def die_first_then_spy(root, rows, config):
        seen_by_training.append({row.path for row in rows})
        if len(seen_by_training) == 1:
            raise KeyboardInterrupt  # killed while building the input pipeline
        return real_datasets(root, rows, config)

    monkeypatch.setattr(training, "make_split_datasets", die_first_then_spy)
    run_dir = tmp_path / "run"
    listed = {row.sha256 for row in train_rows[:3]}
    with pytest.raises(KeyboardInterrupt):
        train_model(synthetic_cells, TINY, run_dir, verbose=0, exclude_cells=listed)
    assert (run_dir / "left_out_of_training.csv").exists()

    train_model(synthetic_cells, TINY, run_dir, verbose=0)  # started again, no list

    assert not (run_dir / "left_out_of_training.csv").exists()
    assert {row.path for row in train_rows} <= seen_by_training[1]
    card = json.loads((run_dir / "model_card.json").read_text())
    assert card["training"]["cells_left_out"] == 0


def test_a_list_that_empties_a_class_of_training_is_refused(
    finished_run, synthetic_cells, tmp_path
):
    split = read_manifest(finished_run.run_dir / "manifest.csv")
    every_parasitized = {
        row.sha256 for row in split if row.split == "train" and row.label == "Parasitized"
    }
    with pytest.raises(ValueError, match="leaves no Parasitized cell in the training split"):
        train_model(
            synthetic_cells, TINY, tmp_path / "r", verbose=0, exclude_cells=every_parasitized
        )


def test_a_cell_list_file_name_is_refused_not_read_letter_by_letter(synthetic_cells, tmp_path):
    for name in ("flags.csv", tmp_path / "flags.csv"):
        with pytest.raises(ValueError, match="got the file name .*flags.csv.*read_cell_list"):
            train_model(synthetic_cells, TINY, tmp_path / "r", verbose=0, exclude_cells=name)
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_a_state_without_a_validation_loss_yet_reads_back_as_infinity(tmp_path):
    path = tmp_path / "state.json"
    training.write_json_atomically({"epoch": 0, "best_val_loss": math.inf, "history": []}, path)
    assert training._read_state(path)["best_val_loss"] == math.inf
