"""Which cells `malaria evaluate` scores, and what it writes."""

import csv
import json
from pathlib import Path

import numpy as np
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


def _strict_json(path: Path) -> dict:
    """Parse as strict JSON: NaN or Infinity, which json.dumps writes by default, fail."""

    def refuse(constant: str) -> None:
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.keras")


def test_report_files_agree_with_scikit_learn_on_the_same_predictions(tmp_path, tiny_model):
    import plotly.io
    from sklearn import metrics as sk

    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    (data / "Parasitized" / "C11P1thinF_broken_cell_9.png").write_bytes(b"broken")
    predictor = Predictor(tiny_model)
    evaluate_model(predictor, data, "test", tmp_path / "out", n_resamples=30)
    report = _strict_json(tmp_path / "out" / "metrics.json")
    rows = [row for row in predictor.predict_paths([data]) if not row.error]
    y_true = np.array([int("/Parasitized/" in row.path) for row in rows])
    y_score = np.array([row.probability for row in rows])
    called = y_score >= 0.5
    assert report["threshold"] == 0.5
    assert report["metrics"]["accuracy"]["value"] == pytest.approx(
        sk.accuracy_score(y_true, called)
    )
    assert report["metrics"]["roc_auc"]["value"] == pytest.approx(sk.roc_auc_score(y_true, y_score))
    counts = sk.confusion_matrix(y_true, called, labels=[0, 1]).tolist()
    assert report["confusion_matrix"]["counts"] == counts
    matrix = plotly.io.read_json(tmp_path / "out" / "confusion_matrix.json")
    assert [list(row) for row in matrix.data[0].z] == counts
    roc = plotly.io.read_json(tmp_path / "out" / "roc_curve.json")
    fpr, tpr, _ = sk.roc_curve(y_true, y_score)
    assert list(roc.data[0].x) == pytest.approx(fpr) and list(roc.data[0].y) == pytest.approx(tpr)
    assert report["threshold_rule"] == (
        "Cells are called Parasitized at uncalibrated P(Parasitized) >= 0.5: the default 0.5: "
        "the model has not been through `malaria calibrate`, which chooses an operating "
        "threshold on validation patients."
    )
    assert report["unreadable"][0]["patient"] == "P1"
    assert report["unreadable"][0]["label"] == "Parasitized"
    assert report["bootstrap"]["usable_resamples"]["accuracy"] == 30
    with open(tmp_path / "out" / "per_patient.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [
        "patient",
        "cells",
        "parasitized_cells",
        "predicted_parasitized",
        "errors",
        "accuracy",
        "split",
        "threshold",
    ]
    assert {(row["split"], row["threshold"]) for row in table} == {("test", "0.5")}
    assert sum(int(row["cells"]) for row in table) == report["cells"] == len(rows)


def test_the_threshold_rule_names_the_calibrated_operating_point_or_the_callers_choice():
    from malaria_classifier.evaluate import describe_threshold

    card = {
        "decision_threshold": 0.5491,
        "calibration": {"operating_point": {"target": "highest sensitivity with spec >= 0.97"}},
    }
    assert describe_threshold(card, 0.5491) == (
        "Cells are called Parasitized at calibrated P(Parasitized) >= 0.5491: the model's "
        "operating threshold (highest sensitivity with spec >= 0.97, chosen on validation "
        "patients by `malaria calibrate`)."
    )
    assert describe_threshold(card, 0.5).endswith(
        ">= 0.5: set by the caller, not the model card's 0.5491."
    )


def test_test_patients_of_one_class_give_null_figures_with_reasons_and_no_roc(tmp_path, tiny_model):
    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    predictor = Predictor(tiny_model)
    # P1-P3 (infected) trained on; the healthy donor C904 is the only test patient.
    predictor.card = {"split": {"patients": {"train": ["P1", "P2", "P3"], "test": ["C904"]}}}
    report = evaluate_model(predictor, data, "test", tmp_path / "out", n_resamples=20)
    written = _strict_json(tmp_path / "out" / "metrics.json")
    assert written["cells"] == 3 and written["patients"] == 1
    assert written["metrics"]["roc_auc"] == {"value": None, "ci95": [None, None]}
    assert written["undefined"]["roc_auc"] == (
        "all cells are Uninfected; roc_auc needs cells of both classes"
    )
    assert written["metrics"]["specificity"]["value"] is not None
    assert "no interval is given" in written["caveat"]
    assert not (tmp_path / "out" / "roc_curve.json").exists()
    assert report == written


def test_a_folder_of_one_class_only_is_evaluated(tmp_path, tiny_model):
    """Healthy donors' cells alone (no Parasitized/ folder) measure specificity."""
    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    donors = tmp_path / "donors"
    (donors / "Uninfected").mkdir(parents=True)
    for path in sorted((data / "Uninfected").glob("*.png")):
        (donors / "Uninfected" / path.name).write_bytes(path.read_bytes())
    report = evaluate_model(Predictor(tiny_model), donors, "test", tmp_path / "out", 20)
    assert report["cells"] == len(list((data / "Uninfected").glob("*.png")))
    assert report["metrics"]["specificity"]["value"] is not None
    assert report["metrics"]["roc_auc"]["value"] is None
    assert _strict_json(tmp_path / "out" / "metrics.json") == report


def test_unreadable_folders_and_unlabelled_images_are_named_not_dropped(
    tmp_path, tiny_model, monkeypatch
):
    from malaria_classifier import evaluate

    data = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=3)
    (data / "extra").mkdir()
    (data / "extra" / "C11P1thinF_loose_cell_1.png").write_bytes(
        (data / "Uninfected" / "C904NThinF_IMG_2015_4_cell_50.png").read_bytes()
    )
    (data / "Parasitized" / "notes.txt").write_text("slide notes")
    hidden = data / "Parasitized" / "slide7"
    real_discover = evaluate.discover_images

    def with_a_locked_folder(directory, **options):
        # Root reads any folder, so an unlistable one is staged rather than chmod-ed.
        discovery = real_discover(directory, **options)
        discovery.unreadable_folders.append((hidden, f"{hidden}: folder cannot be read"))
        return discovery

    monkeypatch.setattr(evaluate, "discover_images", with_a_locked_folder)
    report = evaluate_model(Predictor(tiny_model), data, "test", tmp_path / "out", n_resamples=5)
    assert report["unreadable"] == [
        {"path": str(hidden), "error": f"{hidden}: folder cannot be read"}
    ]
    assert report["selection"]["outside_class_folders"] == [
        str(data / "extra" / "C11P1thinF_loose_cell_1.png")
    ]
    assert report["selection"]["not_image_files"] == [str(data / "Parasitized" / "notes.txt")]
    description = report["selection"]["description"]
    assert "1 image(s) outside the Parasitized/ and Uninfected/ folders" in description
    assert "1 file(s) in the class folders are not images" in description


def test_a_folder_of_training_patients_only_is_refused_with_what_it_holds():
    with pytest.raises(
        ValueError,
        match=r"No cell of the model's test patients or of a patient the model never saw is "
        r"in this folder: its 2 patient\(s\) are all the model's train patients\. .*--split "
        r"train to score those patients knowingly",
    ):
        select_records(_records(["P1", "P2"]), CARD, "test")
