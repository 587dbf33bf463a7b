"""The run folder: a new run's split and cell list, refusals to resume, finished runs."""

import json
import shutil

import pytest
from _synthetic import write_synthetic_dataset
from _training_run import TINY, crash_after_first_epoch

from malaria_classifier import training
from malaria_classifier.checkpoints import RunCheckpoint
from malaria_classifier.images import sha256_of_file
from malaria_classifier.run_folder import RunFolderError, is_run_finished
from malaria_classifier.splits import check_no_leakage, read_manifest
from malaria_classifier.training import train_model


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
    assert not is_run_finished(run_dir)  # the card describes another model.keras

    train_model(synthetic_cells, TINY, run_dir, resume=True, verbose=0, exclude_cells=())

    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2, 3]
    card = json.loads(card_path.read_text())
    assert card["training"]["epochs_run"] == 3
    assert card["model_sha256"] == sha256_of_file(run_dir / "model.keras")
    assert not (run_dir / "ood.json").exists()  # its limits were fitted on the old model
    assert is_run_finished(run_dir)


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
