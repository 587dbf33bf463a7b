"""From scores to a decision per cell: Parasitized, Uninfected, Uncertain or Not a cell.

The rule has three fitted parts, all read from the model card and ``ood.json``
(written by ``malaria calibrate``):

1. the calibrated probability is compared with the operating threshold;
2. a cell is **Uncertain** when its log-odds lie within ``uncertain_margin`` of the
   threshold's, or (when test-time views are on) when flipped/rotated copies of it
   fall on different sides of the threshold;
3. an image is **Not a cell** when the out-of-distribution check rejects it; this
   wins over everything else, because a score for a non-cell means nothing.

A model without calibration (an old run folder) still gets Parasitized/Uninfected
decisions from its threshold, so nothing breaks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.calibration import apply_temperature, logits_from_probabilities
from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS, POSITIVE_INDEX
from malaria_classifier.ood import (
    NOT_A_CELL_FILES,
    OodCheck,
    describe_signals,
    load_ood_check,
    not_a_cell_advice,
)

PARASITIZED = POSITIVE_CLASS
UNINFECTED = CLASS_NAMES[1 - POSITIVE_INDEX]
UNCERTAIN = "Uncertain"
NOT_A_CELL = "Not a cell"
DECISIONS: tuple[str, ...] = (PARASITIZED, UNINFECTED, UNCERTAIN, NOT_A_CELL)


@dataclass
class DecisionRule:
    """Everything needed to turn a model's raw scores into decisions."""

    threshold: float
    temperature: float = 1.0
    uncertain_margin: float = 0.0
    ood: OodCheck | None = None

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """Calibrated P(Parasitized) for raw softmax outputs."""
        if self.temperature == 1.0:
            return np.asarray(probabilities, dtype=np.float64)
        return apply_temperature(probabilities, self.temperature)

    def uncertain_band(self) -> tuple[float, float]:
        """The calibrated probabilities between which a cell is Uncertain.

        The margin is in log-odds, so the band is not symmetric in probability (for
        the default model, 0.165-0.882 around 0.549): saying so explains why 0.84
        still counts as too close to call.
        """
        centre = logits_from_probabilities(self.threshold)
        low, high = centre - self.uncertain_margin, centre + self.uncertain_margin
        return float(1.0 / (1.0 + np.exp(-low))), float(1.0 / (1.0 + np.exp(-high)))

    def decide(
        self,
        calibrated: np.ndarray,
        ood_reasons: list[str] | None = None,
        view_probabilities: np.ndarray | None = None,
    ) -> tuple[list[str], list[str]]:
        """A decision and a short reason (empty for clear calls) per cell.

        Args:
            calibrated: Calibrated P(Parasitized), shape ``(n,)``.
            ood_reasons: Per cell, the out-of-distribution signals that tripped ("" if none).
            view_probabilities: Calibrated P(Parasitized) of transformed copies, shape
                ``(n, views)``; disagreement with the threshold makes a cell Uncertain.
        """
        calibrated = np.asarray(calibrated, dtype=np.float64)
        distance = np.abs(
            logits_from_probabilities(calibrated) - logits_from_probabilities(self.threshold)
        )
        unstable = np.zeros(len(calibrated), dtype=bool)
        if view_probabilities is not None and view_probabilities.size:
            above = np.asarray(view_probabilities) >= self.threshold
            unstable = above.any(axis=1) != above.all(axis=1)
        decisions, reasons = [], []
        for index, probability in enumerate(calibrated):
            ood_reason = ood_reasons[index] if ood_reasons else ""
            if ood_reason:
                decisions.append(NOT_A_CELL)
                reasons.append(
                    f"unlike the training cells in {describe_signals(ood_reason)}. "
                    f"{not_a_cell_advice(ood_reason)}"
                )
            elif distance[index] < self.uncertain_margin:
                decisions.append(UNCERTAIN)
                low, high = self.uncertain_band()
                reasons.append(
                    f"P(Parasitized) {probability:.3f} lies in the Uncertain band "
                    f"{low:.3f}-{high:.3f} around the decision threshold {self.threshold:.3f}"
                )
            elif unstable[index]:
                decisions.append(UNCERTAIN)
                reasons.append("flipped or rotated copies disagree")
            else:
                decisions.append(PARASITIZED if probability >= self.threshold else UNINFECTED)
                reasons.append("")
        return decisions, reasons


def load_decision_rule(
    model_path: Path,
    card: dict[str, Any],
    threshold: float | None = None,
    not_a_cell: str = "strict",
) -> DecisionRule:
    """The rule stored with a model; ``threshold`` overrides the card's.

    Args:
        model_path: The ``.keras`` file; its trust-layer files sit beside it.
        card: Its model card.
        threshold: Calibrated P(Parasitized) for Parasitized; None: the card's.
        not_a_cell: Which "Not a cell" limits: ``strict`` (``ood.json``) or
            ``other-labs`` (``ood_other_labs.json``, for other laboratories' crops).

    Raises:
        ValueError: If the threshold is not strictly between 0 and 1, the profile is
            unknown, or a calibrated model lacks the other-labs limits asked for.
    """
    from malaria_classifier.constants import DEFAULT_THRESHOLD

    if threshold is None:
        threshold = float(card.get("decision_threshold", DEFAULT_THRESHOLD))
    if not 0.0 < threshold < 1.0:
        raise ValueError(
            f"threshold must be between 0 and 1, got {threshold}. It is a calibrated "
            f"P(Parasitized) above which a cell is called Parasitized."
        )
    if not_a_cell not in NOT_A_CELL_FILES:
        raise ValueError(
            f"Unknown Not-a-cell limits {not_a_cell!r}; use one of {', '.join(NOT_A_CELL_FILES)}."
        )
    ood_path = Path(model_path).parent / NOT_A_CELL_FILES[not_a_cell]
    strict_path = Path(model_path).parent / NOT_A_CELL_FILES["strict"]
    if not_a_cell != "strict" and strict_path.is_file() and not ood_path.is_file():
        raise ValueError(
            f"{model_path} has no {not_a_cell} Not-a-cell limits ({ood_path.name}). Run "
            f"`malaria calibrate --ood-variants` on it, or use the strict limits."
        )
    calibration = card.get("calibration", {})
    ood = load_ood_check(ood_path)
    check_same_fit(Path(model_path), calibration, ood_path, ood)
    return DecisionRule(
        threshold=threshold,
        temperature=float(calibration.get("temperature", 1.0)),
        uncertain_margin=float(calibration.get("uncertain_margin_logit", 0.0)),
        ood=ood,
    )


def check_same_fit(
    model_path: Path, calibration: dict[str, Any], ood_path: Path, ood: OodCheck | None
) -> None:
    """Refuse trust-layer files that do not belong together or to this model.

    ``malaria calibrate`` writes ``ood*.json`` and then the model card, each with the
    same ``fit_id``, and records the SHA-256 of the ``.keras`` file it fitted. A calibrate
    killed between those writes, or a model trained further after it, would otherwise
    mix one fit's Not-a-cell limits with another's threshold and temperature, or apply
    them to another model: wrong decisions, with nothing to show it. Files written
    before fit ids existed carry none and are taken as they are.

    Raises:
        ValueError: Naming the files and saying to run ``malaria calibrate`` again.
    """
    from malaria_classifier.images import sha256_of_file

    fitted_model = calibration.get("model_sha256")
    changed = fitted_model is not None and model_path.is_file()
    if changed and sha256_of_file(model_path) != fitted_model:
        raise ValueError(
            f"{model_path} has changed since it was calibrated (trained further?): its "
            f"threshold, temperature and Not-a-cell limits were fitted on another model. "
            f"Run `malaria calibrate` on it again."
        )
    ood_fit = None if ood is None else ood.fitted_on.get("fit_id")
    if ood_fit is not None and ood_fit != calibration.get("fit_id"):
        raise ValueError(
            f"{ood_path} and the model card beside it come from different `malaria calibrate` "
            f"runs (one was interrupted between its writes?). Run `malaria calibrate` on "
            f"{model_path} again."
        )


def transformed_views(batch: np.ndarray) -> np.ndarray:
    """Three transformed copies of each image (horizontal flip, vertical flip, transpose).

    A cell has no up, down, left or right, so a trustworthy score must not change
    under these; the result has shape ``(3 * n, size, size, 3)``, grouped by view.
    """
    return np.concatenate(
        [batch[:, :, ::-1], batch[:, ::-1, :], np.transpose(batch, (0, 2, 1, 3))], axis=0
    )
