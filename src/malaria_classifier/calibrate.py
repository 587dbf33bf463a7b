"""Fit the trust layer of a trained model on its validation patients; report on test.

``malaria calibrate`` runs :func:`calibrate_model`. After the checks of
:mod:`calibration_inputs`, it scores the cells of each split of the run's manifest once
(:mod:`split_scoring`), then fits, **on validation patients only** (and the
training cells for the feature density of the "Not a cell" check):

1. the temperature (:mod:`calibration`), then the operating threshold and the
   "Uncertain" band on the calibrated scale;
2. the out-of-distribution limits (:mod:`ood`): strict ones on training and
   validation cells as imaged (``ood.json``, the default), and, unless asked not
   to, an other-labs set also fitted on a copy of each cell changed the way other
   laboratories' images differ (:func:`stress.draw_lab_variant`: smaller, softer,
   other stain, smear background; ``ood_other_labs.json``), which does not call
   such cells "Not a cell" but catches fewer non-cells;
3. the patient verdict rule (:mod:`verdict`).

It writes them into the model card and the ``ood*.json`` files beside the model, and adds a
``calibration_report`` with the same quantities measured on the *test* patients, which
were never used to choose anything.
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.calibration import (
    DEFAULT_MIN_SPECIFICITY,
    apply_temperature,
    choose_threshold,
    choose_uncertain_margin,
    fit_temperature,
    reliability_bins,
)
from malaria_classifier.calibration_inputs import check_calibration_target, check_run_finished
from malaria_classifier.decision import DecisionRule
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model_card import card_path_for, read_model_card, write_json_atomically
from malaria_classifier.ood import (
    OOD_FILE,
    OOD_OTHER_LABS_FILE,
    OodCheck,
    combine_signals,
    final_layer_weights,
    fit_feature_density,
    fit_ood_check,
    save_ood_check,
)
from malaria_classifier.serving import read_serving_copy, write_serving_copy
from malaria_classifier.split_scoring import SplitScores, score_run_splits
from malaria_classifier.stress import LAB_VARIANTS_SUMMARY
from malaria_classifier.verdict import VerdictRule, choose_verdict_rule, verdict_for


def fit_trust_layer(
    model: Any, scores: dict[str, SplitScores], min_specificity: float
) -> dict[str, Any]:
    """Fit temperature, threshold, Uncertain band, OOD check and verdict rule.

    Only ``scores["train"]`` and ``scores["validation"]`` are used; the "Not a cell"
    check of the rule is the strict one, fitted on the cells as imaged (the
    ``"_variants"`` scores, when present, are for :func:`fit_ood_layer`'s other-labs
    check, fitted separately by :func:`calibrate_model`).
    """
    validation = scores["validation"]
    temperature = fit_temperature(validation.labels, validation.probabilities)
    calibrated = apply_temperature(validation.probabilities, temperature)
    choice = choose_threshold(validation.labels, calibrated, min_specificity)
    margin = choose_uncertain_margin(validation.labels, calibrated, choice.threshold)
    as_imaged = {split: part for split, part in scores.items() if not split.endswith("_variants")}
    ood = fit_ood_layer(model, as_imaged)
    kept = _accepted(ood, model, validation)
    verdict_rule = choose_verdict_rule(
        *_by_patient(validation.patients[kept], calibrated[kept], validation.labels[kept])
    )
    rule = DecisionRule(choice.threshold, temperature, margin, ood)
    return {"rule": rule, "threshold_choice": choice, "verdict_rule": verdict_rule}


def fit_ood_layer(model: Any, scores: dict[str, SplitScores]) -> OodCheck:
    """The "Not a cell" check: feature density on training cells, limits on all fitting cells.

    The density describes the cells the model was trained on, so it uses the
    unchanged training cells only; the limits also cover the other-laboratory
    variants when ``scores`` has them (``score_run_splits(..., ood_variants=True)``).
    ``fitted_on`` says which cells, how many, and which changes they carried.
    """
    train, validation = scores["train"], scores["validation"]
    density = fit_feature_density(train.features, train.labels)

    def signals(split: str) -> np.ndarray | None:
        part = scores.get(split)
        if part is None:
            return None
        return combine_signals(part.statistics, part.features, density, final_layer_weights(model))

    ood = fit_ood_check(
        signals("train"),
        signals("validation"),
        density,
        train_variant_signals=signals("train_variants"),
        validation_variant_signals=signals("validation_variants"),
    )
    ood.fitted_on.update(
        train_cells=len(train.labels),
        validation_cells=len(validation.labels),
        feature_density_fitted_on="training cells as imaged",
        variants=LAB_VARIANTS_SUMMARY if "train_variants" in scores else "none: cells as imaged",
    )
    for split in ("train_variants", "validation_variants"):
        if split in scores:
            ood.fitted_on[f"{split}_cells"] = len(scores[split].labels)
            ood.fitted_on[f"{split}_changes"] = _change_counts(scores[split].variants)
    return ood


def _change_counts(variants: np.ndarray | None) -> dict[str, int]:
    """How many varied cells carried each change ("hue", "smear background", ...)."""
    counts = Counter(
        name
        for variant in (variants if variants is not None else [])
        for name in variant.split(" + ")
    )
    return dict(sorted(counts.items()))


def _accepted(ood: Any, model: Any, scores: SplitScores) -> np.ndarray:
    signals = combine_signals(
        scores.statistics, scores.features, ood.density, final_layer_weights(model)
    )
    return np.array([not reason for reason in ood.reasons(signals)], dtype=bool)


def _by_patient(
    patients: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    usable: np.ndarray | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
    """Per patient: the calibrated scores of the usable cells, and whether any cell is
    parasitized.

    With ``usable`` (a mask of cells that passed the "Not a cell" check), every patient
    is listed, also one whose cells were all "Not a cell": that patient gets no usable
    score and so an indeterminate verdict, and still counts among the infected
    patients or healthy donors (else the report reads "0/0 healthy negative").
    """
    names = sorted(set(patients.tolist()))
    usable = np.ones(len(patients), dtype=bool) if usable is None else usable
    return (
        {name: probabilities[(patients == name) & usable] for name in names},
        {name: bool(labels[patients == name].any()) for name in names},
    )


def report_split(
    model: Any, scores: SplitScores, rule: DecisionRule, verdict_rule: VerdictRule
) -> dict[str, Any]:
    """Calibration, operating point, abstention, OOD and verdict figures for one split."""
    calibrated = rule.calibrate(scores.probabilities)
    predicted = calibrated >= rule.threshold
    signals = combine_signals(
        scores.statistics, scores.features, rule.ood.density, final_layer_weights(model)
    )
    reasons = rule.ood.reasons(signals)
    decisions, _ = rule.decide(calibrated, reasons)
    decisions = np.array(decisions)
    kept = decisions != "Not a cell"
    probabilities, infected = _by_patient(scores.patients, calibrated, scores.labels, kept)
    verdicts = {name: verdict_for(p, verdict_rule)[0] for name, p in probabilities.items()}
    clear = np.isin(decisions, ["Parasitized", "Uninfected"])
    return {
        "cells": len(scores.labels),
        "patients": len(set(scores.patients.tolist())),
        "reliability_uncalibrated": reliability_bins(
            scores.labels, scores.probabilities, 0.5
        ).to_dict(),
        "reliability_calibrated": reliability_bins(
            scores.labels, calibrated, rule.threshold
        ).to_dict(),
        "sensitivity": _share_or_none(predicted[scores.labels == 1]),
        "specificity": _share_or_none(~predicted[scores.labels == 0]),
        "uncertain_fraction": float(np.mean(decisions == "Uncertain")),
        "error_rate_all": float(np.mean(predicted != scores.labels)),
        "error_rate_clear_decisions": _share_or_none((predicted != scores.labels)[clear]),
        "not_a_cell_fraction": float(np.mean(~kept)),
        "verdicts": {
            "infected_patients": sum(infected.values()),
            "infected_called_positive": sum(
                verdicts[p] == "positive" for p in verdicts if infected[p]
            ),
            "healthy_donors": sum(not v for v in infected.values()),
            "healthy_called_negative": sum(
                verdicts[p] == "negative" for p in verdicts if not infected[p]
            ),
            "indeterminate": sum(verdict == "indeterminate" for verdict in verdicts.values()),
            "per_patient": verdicts,
        },
    }


def _share_or_none(flags: np.ndarray) -> float | None:
    """The share of True flags; None (JSON null, not NaN) when there are none to count,
    e.g. the sensitivity of a split without parasitized cells."""
    return float(np.mean(flags)) if flags.size else None


def calibrate_model(
    model_path: str | Path,
    run_dir: str | Path,
    data_dir: str | Path,
    min_specificity: float = DEFAULT_MIN_SPECIFICITY,
    ood_variants: bool = True,
) -> dict[str, Any]:
    """Fit the trust layer for ``model_path`` and store it beside the model.

    A model whose serving copy is missing or stale (converted by an older version of
    this package, or before the ``.keras`` file changed) gets a fresh one too, so
    ``malaria predict`` on it starts without TensorFlow again.

    Example:
        >>> calibrate_model("runs/r1/model.keras", "runs/r1", "cell_images")  # doctest: +SKIP

    Args:
        model_path: The ``.keras`` model; its ``model_card.json`` is updated and
            ``ood.json`` (strict "Not a cell" limits) written next to it.
        run_dir: The training run folder (for ``manifest.csv``: which patients are which).
        data_dir: The data folder the manifest's paths are relative to.
        min_specificity: Cell-level specificity the threshold must keep on validation.
        ood_variants: Also fit a second, "other-labs" set of "Not a cell" limits
            (``ood_other_labs.json``) on one other-laboratory variant of each training
            and validation cell as well (about twice the scoring time), which accepts
            smaller, softer, differently stained cells and crops that keep the smear
            background; ``Predictor(not_a_cell="other-labs")`` applies it.

    Returns:
        The updated model card.
    """
    model_path = Path(model_path)
    check_calibration_target(model_path, min_specificity)
    check_run_finished(model_path, Path(run_dir))
    model, scores = score_run_splits(
        model_path, Path(run_dir), Path(data_dir), ood_variants=ood_variants
    )
    fitted = fit_trust_layer(model, scores, min_specificity)
    if read_serving_copy(model_path) is None:
        write_serving_copy(model, model_path)
    rule, choice, verdict_rule = fitted["rule"], fitted["threshold_choice"], fitted["verdict_rule"]
    other_labs = fit_ood_layer(model, scores) if ood_variants else None
    # One id in every file of this fit, and the model it was fitted on: a calibrate killed
    # between its writes, or a model trained further, is refused at load time
    # (decision.check_same_fit) instead of mixing fits.
    model_sha256 = sha256_of_file(model_path)
    fit_id = f"{model_sha256[:16]}-{uuid.uuid4().hex[:16]}"
    for check in (rule.ood, other_labs):
        if check is not None:
            check.fitted_on["fit_id"] = fit_id
    card = read_model_card(model_path)
    card["decision_threshold"] = rule.threshold
    card["calibration"] = {
        "method": "temperature scaling of the log-odds log(p1) - log(p0)",
        "temperature": rule.temperature,
        "fitted_on": "validation patients (cells of the manifest's validation split)",
        "operating_point": {
            "target": choice.target,
            "threshold": choice.threshold,
            "validation_sensitivity": choice.sensitivity,
            "validation_specificity": choice.specificity,
        },
        "uncertain_margin_logit": rule.uncertain_margin,
        "uncertain_rule": "Uncertain when |logit(p) - logit(threshold)| < margin: the "
        "smallest band leaving <= 2% errors among the other validation cells, at most 10% "
        "of cells",
        "out_of_distribution_file": OOD_FILE,
        "out_of_distribution_file_other_labs": OOD_OTHER_LABS_FILE if ood_variants else None,
        "fit_id": fit_id,
        "model_sha256": model_sha256,
    }
    card["verdict_rule"] = {
        **verdict_rule.to_dict(),
        "rule": "positive if at least min_suspicious_cells usable cells have calibrated "
        "P(Parasitized) >= cell_threshold; else negative, or indeterminate with fewer "
        "than min_cells usable cells",
        "fitted_on": "validation patients",
    }
    card["calibration_report"] = {
        split: report_split(model, scores[split], rule, verdict_rule)
        for split in ("validation", "test")
    }
    # Everything is computed: the files change one right after the other, card last
    # (it is what says which files belong to the fit).
    save_ood_check(rule.ood, model_path.parent / OOD_FILE)
    other_labs_path = model_path.parent / OOD_OTHER_LABS_FILE
    if other_labs is not None:
        save_ood_check(other_labs, other_labs_path)
    else:
        other_labs_path.unlink(missing_ok=True)  # never leave limits of an older fit
    write_json_atomically(card, card_path_for(model_path))
    return card
