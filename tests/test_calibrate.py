"""Fitting the "Not a cell" part of the trust layer from scored splits (no model needed)."""

import numpy as np

from malaria_classifier.calibrate import SplitScores, fit_ood_layer
from malaria_classifier.ood import STATISTIC_NAMES


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
