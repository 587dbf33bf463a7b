"""The checks of what ``malaria calibrate`` is given, before any scoring."""

import json

import pytest

from malaria_classifier.calibration_inputs import (
    check_cells_present,
    check_model_matches_run,
    check_splits,
)
from malaria_classifier.splits import ManifestRow


def _manifest(*rows):
    return [
        ManifestRow(f"Parasitized/{p}_{i}.png", "Parasitized", p, s, "x")
        for i, (p, s) in enumerate(rows)
    ]


def test_a_model_from_another_split_is_refused(tmp_path):
    model = tmp_path / "model.keras"
    card = {"split": {"patients": {"train": ["P1"], "validation": ["P2"], "test": ["P3"]}}}
    (tmp_path / "model_card.json").write_text(json.dumps(card), encoding="utf-8")
    manifest = tmp_path / "manifest.csv"

    check_model_matches_run(model, _manifest(("P1", "train"), ("P2", "validation")), manifest)
    with pytest.raises(ValueError, match="patient P1 is train for the model but test in"):
        check_model_matches_run(model, _manifest(("P1", "test"), ("P3", "train")), manifest)


def test_missing_validation_or_test_cells_are_refused(tmp_path):
    rows = _manifest(("P1", "train"), ("P2", "validation"), ("P3", "test"))
    (tmp_path / "Parasitized").mkdir()
    (tmp_path / rows[1].path).write_bytes(b"png")
    with pytest.raises(ValueError, match=r"1 of the 2 validation and test cells .*/P3_2\.png"):
        check_cells_present(rows, tmp_path, tmp_path / "manifest.csv")
    (tmp_path / rows[2].path).write_bytes(b"png")
    check_cells_present(rows, tmp_path, tmp_path / "manifest.csv")  # train cells may be absent


def test_a_validation_split_without_healthy_donors_is_refused_before_scoring(tmp_path):
    rows = _manifest(("P1", "validation"), ("P2", "test"))
    with pytest.raises(ValueError, match=r"1 infected and 0 healthy patients"):
        check_splits(rows, tmp_path / "manifest.csv")
    with pytest.raises(ValueError, match=r"has no test cells \(splits found: validation\)"):
        check_splits(rows[:1], tmp_path / "manifest.csv")
