"""End-to-end training on synthetic cells: run folder contents, learning, seeds, refusals."""

import json
import shutil

import keras
import numpy as np
import pytest
from _training_run import TINY

from malaria_classifier.config import load_config
from malaria_classifier.serving import read_serving_copy
from malaria_classifier.splits import read_manifest
from malaria_classifier.training import train_model


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


def test_a_run_folder_inside_the_data_is_refused(synthetic_cells):
    inside = synthetic_cells / "Parasitized" / "run"
    with pytest.raises(ValueError, match="is inside the data folder"):
        train_model(synthetic_cells, TINY, inside, verbose=0)
    assert not inside.exists()


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


def test_a_cell_list_file_name_is_refused_not_read_letter_by_letter(synthetic_cells, tmp_path):
    for name in ("flags.csv", tmp_path / "flags.csv"):
        with pytest.raises(ValueError, match="got the file name .*flags.csv.*read_cell_list"):
            train_model(synthetic_cells, TINY, tmp_path / "r", verbose=0, exclude_cells=name)
    assert not (tmp_path / "r").exists()  # refused before anything was written
