"""Which cells `malaria evaluate` scores, and what it writes."""

import csv
import json
from pathlib import Path

import pytest
from _synthetic import save_tiny_model, write_synthetic_dataset

from malaria_classifier.data import ImageRecord
from malaria_classifier.evaluate import evaluate_model, select_records
from malaria_classifier.prediction import Predictor

CARD = {"split": {"patients": {"train": ["P1", "P2"], "validation": ["P3"], "test": ["P4"]}}}


def _records(patients):
    return [ImageRecord(Path(f"{p}_{i}.png"), "Uninfected", p) for p in patients for i in range(2)]


def test_test_split_takes_test_patients_and_never_seen_ones():
    chosen, description = select_records(_records(["P1", "P3", "P4", "P9"]), CARD, "test")
    assert {record.patient for record in chosen} == {"P4", "P9"}
    assert "never saw" in description


def test_validation_split_takes_only_validation_patients():
    chosen, _ = select_records(_records(["P1", "P3", "P4", "P9"]), CARD, "validation")
    assert {record.patient for record in chosen} == {"P3"}


def test_folder_of_unknown_patients_is_evaluated_whole():
    records = _records(["X1", "X2"])
    chosen, description = select_records(records, CARD, "test")
    assert chosen == records and "all 4 cells" in description
    # Unseen patients are no model's train or validation patients: not scored as such.
    for split in ("train", "validation"):
        with pytest.raises(ValueError, match=f"--split {split}: none of this folder's 2 pat"):
            select_records(records, CARD, split)
        with pytest.raises(ValueError, match="use --split test"):
            select_records(records, {}, split)


def test_a_model_path_instead_of_a_predictor_is_refused_with_what_to_pass(tmp_path):
    with pytest.raises(ValueError, match=r"Predictor\('model.keras'\), got str"):
        evaluate_model("model.keras", tmp_path, output_dir=tmp_path / "out")


def test_unknown_split_name_is_refused():
    with pytest.raises(ValueError, match="--split must be one of"):
        select_records(_records(["P1"]), CARD, "holdout")


def test_split_with_no_cells_in_the_folder_is_refused():
    with pytest.raises(ValueError, match="No cell of the model's validation patients"):
        select_records(_records(["P1", "P4"]), CARD, "validation")


def test_evaluate_model_writes_metrics_table_and_figures(tmp_path):
    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    (data / "Uninfected" / "C1_thinF_broken_cell_1.png").write_bytes(b"broken")
    predictor = Predictor(save_tiny_model(tmp_path / "model" / "model.keras"))
    report = evaluate_model(predictor, data, "test", tmp_path / "out", n_resamples=50)
    written = {path.name for path in (tmp_path / "out").iterdir()}
    assert {"metrics.json", "per_patient.csv"} <= written
    assert {
        "confusion_matrix.png",
        "confusion_matrix.json",
        "roc_curve.png",
        "roc_curve.json",
    } <= written
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["positive_class"] == "Parasitized"
    assert metrics["cells"] == 4 * 3 + 3 * 3
    assert len(metrics["unreadable"]) == 1 and "broken" in metrics["unreadable"][0]["path"]
    with open(tmp_path / "out" / "per_patient.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == report["patients"] == 4


def test_a_report_killed_before_its_figures_shows_no_metrics_of_the_new_model(
    tmp_path, monkeypatch
):
    """metrics.json comes last: new figures never sit beside an earlier model's metrics."""
    from malaria_classifier import evaluate

    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    predictor = Predictor(save_tiny_model(tmp_path / "model" / "model.keras"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.json").write_text('{"model": "an earlier one"}')

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "save_figures", killed)
    with pytest.raises(KeyboardInterrupt):
        evaluate_model(predictor, data, "test", tmp_path / "out", n_resamples=20)
    assert not (tmp_path / "out" / "metrics.json").exists()
