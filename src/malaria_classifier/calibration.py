"""Make scores mean what they say: temperature scaling, the operating threshold, ECE.

The model ends in a softmax, so its logit for Parasitized is ``log p1 - log p0``.
Temperature scaling divides that logit by one number ``T`` fitted on *validation
patients* (Guo et al., 2017): it changes how confident the scores are without
changing their order, so ROC AUC is untouched and only the probabilities move.
The decision threshold and the "Uncertain" band are then chosen on the same
validation patients, on the calibrated scale that users see.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

# Probabilities are clipped this far from 0 and 1 so log-odds stay finite (float32
# softmax outputs reach exactly 1.0 for very confident cells).
PROBABILITY_EPSILON = 1e-7
DEFAULT_BINS = 15
DEFAULT_MIN_SPECIFICITY = 0.97
# Temperatures are searched in [1/MAX, MAX] (log scale): e^4 either way.
MAX_TEMPERATURE = math.exp(4.0)


def logits_from_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """Log-odds of P(Parasitized): equal to the pre-softmax logit difference."""
    clipped = np.clip(np.asarray(probabilities, dtype=np.float64), PROBABILITY_EPSILON, 1.0)
    complement = np.clip(1.0 - clipped, PROBABILITY_EPSILON, 1.0)
    return np.log(clipped) - np.log(complement)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """The logistic function, written so large logits never overflow."""
    logits = np.asarray(logits, dtype=np.float64)
    return np.where(
        logits >= 0,
        1.0 / (1.0 + np.exp(-np.abs(logits))),
        np.exp(-np.abs(logits)) / (1.0 + np.exp(-np.abs(logits))),
    )


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Calibrated P(Parasitized): the log-odds divided by ``temperature``."""
    return sigmoid(logits_from_probabilities(probabilities) / temperature)


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature that minimizes the negative log-likelihood of ``y_true``.

    Args:
        y_true: 1 for Parasitized, 0 for Uninfected, per cell (validation patients).
        probabilities: The model's uncalibrated P(Parasitized) for the same cells.

    Returns:
        ``T`` > 0; ``T`` > 1 means the model was over-confident.

    Raises:
        ValueError: If the inputs are empty, of different lengths, or hold one class only.
    """
    y_true = np.asarray(y_true, dtype=np.float64)
    logits = logits_from_probabilities(probabilities)
    if len(y_true) == 0 or len(y_true) != len(logits):
        raise ValueError(
            f"Need one label per probability, got {len(y_true)} labels and {len(logits)} "
            f"probabilities. Pass the scores of the validation cells."
        )
    if len(np.unique(y_true)) < 2:
        raise ValueError("Calibration needs cells of both classes; the validation split has one.")

    def negative_log_likelihood(log_temperature: float) -> float:
        scaled = logits / np.exp(log_temperature)
        # log(1 + exp(-y*z)) with y in {-1, +1}, computed stably
        signs = 2.0 * y_true - 1.0
        return float(np.mean(np.logaddexp(0.0, -signs * scaled)))

    bound = math.log(MAX_TEMPERATURE)
    result = minimize_scalar(negative_log_likelihood, bounds=(-bound, bound), method="bounded")
    return float(np.exp(result.x))


@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin confidence and accuracy of the predicted label (for ECE and the diagram)."""

    edges: list[float]
    counts: list[int]
    mean_confidence: list[float]
    accuracy: list[float]
    expected_calibration_error: float

    def to_dict(self) -> dict:
        """Plain JSON-ready values; empty bins become None (JSON has no NaN)."""
        values = asdict(self)
        for key in ("mean_confidence", "accuracy"):
            values[key] = [None if math.isnan(value) else value for value in values[key]]
        return values


def reliability_bins(
    y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5, bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    """Reliability of the *confidence* users see: the probability of the chosen label.

    Cells are binned by confidence (equal-width bins on [0.5, 1] when the threshold is
    0.5); ECE is the cell-weighted mean gap between accuracy and mean confidence.
    Empty bins have ``nan`` confidence and accuracy and weigh nothing.

    Args:
        y_true: 1 for Parasitized, 0 for Uninfected.
        probabilities: P(Parasitized) per cell.
        threshold: The decision threshold that picks each cell's label.
        bins: Number of equal-width confidence bins on [0, 1].
    """
    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    predicted = (probabilities >= threshold).astype(int)
    confidence = np.where(predicted == 1, probabilities, 1.0 - probabilities)
    correct = (predicted == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(index, confidence, minlength=bins) / counts
        accuracy = np.bincount(index, correct, minlength=bins) / counts
    gaps = np.where(counts > 0, np.abs(accuracy - mean_confidence), 0.0)
    ece = float(np.sum(gaps * counts) / max(1, counts.sum()))
    return ReliabilityBins(
        edges=edges.tolist(),
        counts=counts.astype(int).tolist(),
        mean_confidence=mean_confidence.tolist(),
        accuracy=accuracy.tolist(),
        expected_calibration_error=ece,
    )


def expected_calibration_error(
    y_true: np.ndarray, probabilities: np.ndarray, threshold: float = 0.5, bins: int = DEFAULT_BINS
) -> float:
    """ECE of the chosen label's confidence (see :func:`reliability_bins`)."""
    return reliability_bins(y_true, probabilities, threshold, bins).expected_calibration_error


@dataclass(frozen=True)
class ThresholdChoice:
    """An operating threshold and how it did on the cells it was chosen on."""

    threshold: float
    sensitivity: float
    specificity: float
    target: str


def choose_threshold(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
) -> ThresholdChoice:
    """The threshold with the highest sensitivity whose specificity is ≥ ``min_specificity``.

    Sensitivity only falls as the threshold rises, so this is the lowest threshold that
    keeps specificity at the target. It is placed halfway between two neighbouring
    scores (not on a score), so a tiny change in a score does not flip its cell.

    Raises:
        ValueError: If ``min_specificity`` is outside (0, 1] or a class is missing.
    """
    if not 0.0 < min_specificity <= 1.0:
        raise ValueError(f"min_specificity must be in (0, 1], got {min_specificity}.")
    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    negatives = np.sort(probabilities[y_true == 0])
    if len(negatives) == 0 or not (y_true == 1).any():
        raise ValueError("Choosing a threshold needs validation cells of both classes.")
    # At most this many negatives may score at or above the threshold.
    allowed = int(np.floor((1.0 - min_specificity) * len(negatives) + 1e-9))
    cut = len(negatives) - allowed  # negatives[cut:] may be called positive
    highest_rejected = negatives[cut - 1] if cut > 0 else 0.0
    above = probabilities[probabilities > highest_rejected]
    next_score = float(above.min()) if len(above) else 1.0
    threshold = float((highest_rejected + next_score) / 2.0)
    threshold = float(np.clip(threshold, PROBABILITY_EPSILON, 1.0 - PROBABILITY_EPSILON))
    predicted = probabilities >= threshold
    return ThresholdChoice(
        threshold=threshold,
        sensitivity=float(predicted[y_true == 1].mean()),
        specificity=float((~predicted[y_true == 0]).mean()),
        target=f"highest sensitivity with specificity >= {min_specificity}",
    )


def choose_uncertain_margin(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    threshold: float,
    max_error_rate: float = 0.02,
    max_abstention: float = 0.1,
) -> float:
    """Half-width, in log-odds, of the band around the threshold called "Uncertain".

    The smallest margin for which the cells *outside* the band have an error rate of at
    most ``max_error_rate``, but never abstaining on more than ``max_abstention`` of the
    cells: a classifier that abstains on everything is useless.

    Returns:
        The margin ``m``: a cell is Uncertain when ``|logit(p) - logit(threshold)| < m``.
    """
    y_true = np.asarray(y_true).astype(int)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    distance = np.abs(
        logits_from_probabilities(probabilities) - logits_from_probabilities(threshold)
    )
    wrong = (probabilities >= threshold).astype(int) != y_true
    order = np.argsort(distance)
    sorted_distance, sorted_wrong = distance[order], wrong[order]
    # errors remaining among cells from position k onwards, if the first k abstain
    errors_after = np.concatenate([np.cumsum(sorted_wrong[::-1])[::-1], [0]])
    kept = len(y_true) - np.arange(len(y_true) + 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        error_rate = np.where(kept > 0, errors_after / kept, 0.0)
    largest_abstention = int(np.floor(max_abstention * len(y_true)))
    feasible = np.nonzero(error_rate[: largest_abstention + 1] <= max_error_rate)[0]
    abstain = int(feasible[0]) if len(feasible) else largest_abstention
    if abstain == 0:
        return 0.0
    upper = sorted_distance[abstain] if abstain < len(y_true) else sorted_distance[-1] + 1e-6
    return float((sorted_distance[abstain - 1] + upper) / 2.0)
