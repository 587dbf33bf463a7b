"""Temperature scaling, ECE and reliability bins, threshold and Uncertain-band choice."""

import numpy as np
import pytest

from malaria_classifier.calibration import (
    apply_temperature,
    choose_threshold,
    choose_uncertain_margin,
    expected_calibration_error,
    fit_temperature,
    logits_from_probabilities,
    reliability_bins,
    sigmoid,
)


def _overconfident_scores(true_temperature: float, n: int = 20000, seed: int = 0):
    """Labels drawn from sigmoid(z / T) but reported as sigmoid(z): over-confident by T."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 4.0, size=n)
    labels = (rng.random(n) < sigmoid(logits / true_temperature)).astype(int)
    return labels, sigmoid(logits)


def test_logits_invert_the_sigmoid_and_stay_finite_at_0_and_1():
    z = np.array([-5.0, -0.3, 0.0, 2.0, 7.0])
    assert logits_from_probabilities(sigmoid(z)) == pytest.approx(z, abs=1e-6)
    assert np.isfinite(logits_from_probabilities(np.array([0.0, 1.0]))).all()


def test_fit_temperature_recovers_a_known_over_confidence():
    labels, probabilities = _overconfident_scores(3.0)
    assert fit_temperature(labels, probabilities) == pytest.approx(3.0, rel=0.1)


def test_temperature_scaling_lowers_ece_and_keeps_the_order():
    labels, probabilities = _overconfident_scores(3.0)
    temperature = fit_temperature(labels[:10000], probabilities[:10000])
    before = expected_calibration_error(labels[10000:], probabilities[10000:])
    calibrated = apply_temperature(probabilities[10000:], temperature)
    after = expected_calibration_error(labels[10000:], calibrated)
    assert before > 0.05 and after < 0.02
    assert (np.argsort(calibrated) == np.argsort(probabilities[10000:])).all()


def test_fit_temperature_refuses_one_class_and_mismatched_lengths():
    with pytest.raises(
        ValueError, match="^Calibration needs cells of both classes; the validation split has one"
    ):
        fit_temperature(np.ones(5), np.full(5, 0.8))
    with pytest.raises(
        ValueError, match="^Need one label per probability, got 2 labels and 1 probabilities"
    ):
        fit_temperature(np.array([0, 1]), np.array([0.5]))


def test_ece_exact_value_on_a_small_example():
    # labels chosen 1,1,1,0 with confidence 0.9 each; 3 of 4 are right
    bins = reliability_bins(np.array([1, 1, 0, 0]), np.array([0.9, 0.9, 0.9, 0.1]))
    assert bins.expected_calibration_error == pytest.approx(0.15)
    assert sum(bins.counts) == 4
    assert bins.counts[-2] == 4  # 0.9 falls in the (0.8667, 0.9333] bin of 15


def test_choose_threshold_gives_highest_sensitivity_at_the_specificity_target():
    negatives = np.linspace(0.0, 0.5, 100)  # 100 healthy cells
    positives = np.linspace(0.3, 1.0, 100)
    labels = np.r_[np.zeros(100), np.ones(100)].astype(int)
    scores = np.r_[negatives, positives]
    choice = choose_threshold(labels, scores, min_specificity=0.97)
    assert choice.specificity >= 0.97
    # lowering the threshold to the next score would break the target
    lower = scores[scores < choice.threshold].max()
    assert ((negatives >= lower).sum()) / 100 > 0.03
    assert choice.sensitivity == pytest.approx((positives >= choice.threshold).mean())


def test_choose_threshold_validates_its_target():
    with pytest.raises(ValueError, match=r"^min_specificity must be in \(0, 1\], got 1\.5"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), min_specificity=1.5)


def test_uncertain_margin_covers_the_errors_next_to_the_threshold():
    # 90 easy right answers far from 0.5, 10 wrong ones right next to it
    scores = np.r_[np.full(45, 0.02), np.full(45, 0.98), np.linspace(0.45, 0.55, 10)]
    labels = np.r_[np.zeros(45), np.ones(45), (np.linspace(0.45, 0.55, 10) < 0.5)].astype(int)
    margin = choose_uncertain_margin(labels, scores, 0.5, max_error_rate=0.0, max_abstention=0.2)
    distance = np.abs(logits_from_probabilities(scores))
    assert (distance[90:] < margin).all() and (distance[:90] > margin).all()


def test_uncertain_margin_is_zero_when_nothing_needs_it():
    labels = np.array([0, 0, 1, 1])
    assert choose_uncertain_margin(labels, np.array([0.1, 0.2, 0.8, 0.9]), 0.5) == 0.0
