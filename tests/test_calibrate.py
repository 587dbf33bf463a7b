"""Fitting the "Not a cell" part of the trust layer from scored splits (no model needed)."""

import re

import numpy as np
import pytest

from malaria_classifier.calibrate import _by_patient, calibrate_model, fit_ood_layer
from malaria_classifier.model_card import DEFAULT_MODEL_DIR
from malaria_classifier.ood_statistics import STATISTIC_NAMES
from malaria_classifier.split_scoring import SplitScores
from malaria_classifier.verdict import VerdictRule, verdict_for


class _FinalLayer:
    def get_weights(self):
        return [np.eye(2), np.zeros(2)]


class _Model:
    """Just what the OOD fit reads from a model: the final dense layer's weights."""

    layers = [_FinalLayer()]


def _scores(count, seed, shift=0.0, variants=None):
    rng = np.random.default_rng(seed)
    return SplitScores(
        labels=np.arange(count) % 2,
        patients=np.array([f"P{i % 5}" for i in range(count)]),
        probabilities=rng.random(count),
        features=rng.normal(size=(count, 2)) + (np.arange(count) % 2)[:, None] * 3,
        statistics=rng.normal(0.5 + shift, 0.05, size=(count, len(STATISTIC_NAMES))),
        variants=variants,
    )


def test_variant_cells_widen_the_limits_and_are_recorded():
    train, validation = _scores(4000, 0), _scores(1000, 1)
    changes = np.array(["hue + blur", "smear background"] * 500)
    scores = {
        "train": train,
        "validation": validation,
        "train_variants": _scores(4000, 2, shift=0.2, variants=np.tile(changes, 4)),
        "validation_variants": _scores(1000, 3, shift=0.2, variants=changes),
    }
    plain = fit_ood_layer(_Model(), {"train": train, "validation": validation})
    varied = fit_ood_layer(_Model(), scores)
    assert varied.upper["foreground_red"] > plain.upper["foreground_red"] + 0.1
    assert plain.fitted_on["variants"].startswith("none")
    assert varied.fitted_on["train_variants_cells"] == 4000
    assert varied.fitted_on["validation_variants_changes"] == {
        "blur": 500,
        "hue": 500,
        "smear background": 500,
    }
    assert varied.fitted_on["within_budget"]
    assert varied.fitted_on["validation_variant_false_rejection"] <= 0.01
    assert varied.fitted_on["validation_false_rejection"] <= 0.005
    # the feature density stays that of the training cells as imaged
    np.testing.assert_allclose(varied.density.means, plain.density.means)


@pytest.mark.parametrize("value", [0.0, 1.0, 1.5, float("nan")])
def test_min_specificity_outside_0_1_is_refused_before_scoring(tmp_path, value):
    message = (
        f"--min-specificity must be a number between 0 and 1 (exclusive), e.g. 0.97, got {value}."
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        calibrate_model(tmp_path / "model.keras", tmp_path, tmp_path, min_specificity=value)


def test_a_missing_model_is_named_not_its_manifest(tmp_path):
    with pytest.raises(ValueError, match=r"missing/model\.keras does not exist\. Pass --model"):
        calibrate_model(tmp_path / "missing" / "model.keras", tmp_path / "missing", tmp_path)


def test_the_bundled_model_is_never_calibrated_in_place(tmp_path):
    bundled = DEFAULT_MODEL_DIR / "model.keras"
    before = (DEFAULT_MODEL_DIR / "model_card.json").read_bytes()
    with pytest.raises(ValueError, match="is the bundled default model; .* calibrate the copy"):
        calibrate_model(bundled, tmp_path, tmp_path)
    assert (DEFAULT_MODEL_DIR / "model_card.json").read_bytes() == before


def test_the_model_of_an_unfinished_run_is_refused_before_scoring(tmp_path):
    """Its card would be written with nothing but the trust layer, then lost on --resume."""
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "model.keras").write_bytes(b"best epoch so far")
    with pytest.raises(ValueError, match=r"has not finished .* --resume; then calibrate"):
        calibrate_model(tmp_path / "model.keras", tmp_path, tmp_path)
    assert not (tmp_path / "model_card.json").exists()


def test_a_patient_whose_cells_are_all_not_a_cell_is_still_counted():
    """Left out, a donor with only rejected cells made the report read "0/0 negative"."""
    patients = np.array(["P1", "P1", "D1", "D1"])
    usable = np.array([True, True, False, False])
    probabilities, infected = _by_patient(
        patients, np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0]), usable
    )
    assert infected == {"P1": True, "D1": False}
    assert probabilities["D1"].size == 0
    assert verdict_for(probabilities["D1"], VerdictRule(0.5, 1, 1)) == ("indeterminate", None)
    np.testing.assert_allclose(probabilities["P1"], [0.9, 0.8])
