"""Metrics with patient-level confidence intervals, and the per-patient table.

Cells of one patient are not independent (same slide, same stain), so confidence
intervals come from a bootstrap over *patients*: patients are resampled with
replacement and all their cells come along. The positive class is Parasitized.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS
from malaria_classifier.data import FIELD_PREFIX

METRIC_NAMES: tuple[str, ...] = (
    "accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "mcc",
    "roc_auc",
)

# Coverage of the intervals in metrics.json (their key is ``ci95``).
CONFIDENCE = 0.95

# Below this many patients a patient bootstrap has too few distinct resamples to give
# a trustworthy interval (with 3 patients there are only 10 distinct resamples).
FEW_PATIENTS = 10


def interval_caveat(block: dict) -> str | None:
    """A warning for intervals that cannot be trusted, or None.

    A split with a handful of patients gives intervals that look precise but are not:
    the bootstrap can only redraw those few patients, and an interval of zero width
    means every redraw gave the same figure, not that the figure is certain. One
    patient gives no interval at all. An interval drawn from only some resamples (the
    others had no value, e.g. patients of one class only) says from how many; "patients"
    that are source field images (file names outside the NIH patient rule) are named,
    since cells of one patient on several images are not independent.
    """
    patients = block["patients"]
    bootstrap = block.get("bootstrap", {})
    flat = sorted(
        name
        for name, values in block["metrics"].items()
        if values["value"] is not None
        and None not in values["ci95"]
        and values["ci95"][0] == values["ci95"][1]
    )
    parts = []
    if patients < 2:
        parts.append(
            f"the {block['split']} split has {patients} patient: a bootstrap over patients "
            f"cannot show any spread, so no interval is given; evaluate on at least "
            f"{FEW_PATIENTS} patients"
        )
    elif patients < FEW_PATIENTS:
        parts.append(
            f"the {block['split']} split has only {patients} patient(s): intervals from a "
            f"bootstrap over so few patients are rough and often too narrow; evaluate on at "
            f"least {FEW_PATIENTS} patients"
        )
    if flat:
        parts.append(
            f"{', '.join(flat)} have zero-width intervals: every resample of the patients "
            f"gave the same figure, which is not certainty (more patients would show the spread)"
        )
    # Older blocks (model cards written before the count was kept) have no counts.
    usable = bootstrap.get("usable_resamples", {}) if patients >= 2 else {}
    by_count: dict[int, list[str]] = {}
    for name, count in usable.items():
        if block["metrics"][name]["value"] is not None and count < bootstrap["resamples"]:
            by_count.setdefault(count, []).append(name)
    for count, names in sorted(by_count.items(), reverse=True):
        parts.append(
            f"{', '.join(names)}: interval from {count} of {bootstrap['resamples']} "
            f"resamples; the others had no value (among the patients drawn: no "
            f"{POSITIVE_CLASS} cell, no {CLASS_NAMES[0]} cell or no cell called "
            f"{POSITIVE_CLASS})"
            if count
            else f"{', '.join(names)}: no interval, no resample had a value"
        )
    fields = block.get("source_field_images", 0)
    if fields:
        parts.append(
            f"{fields} of the {patients} patients are source field images, not patients "
            f"(ids starting {FIELD_PREFIX!r}: file names outside the NIH patient rule): "
            f"the bootstrap treats them as independent, but cells of one patient on several "
            f"images are not, so the intervals may be too narrow; name files "
            f"C<slide>P<patient>_... (healthy donors C<slide>_...) to group them by patient"
        )
    return "; ".join(parts) + "." if parts else None


def checked_inputs(
    y_true: Sequence[int] | np.ndarray,
    y_score: Sequence[float] | np.ndarray,
    groups: Sequence[str] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Labels as 0/1 ints, scores as floats in [0, 1], groups as an array, all one length.

    Every function here takes these three, and a wrong one (labels 1/2 or class names,
    scores in percent, a patient list of another length) would otherwise give wrong
    metrics or a numpy message about shapes.

    Raises:
        ValueError: Naming what is wrong and what to pass.
    """
    labels = np.asarray(y_true)
    scores = np.asarray(y_score)
    if labels.ndim != 1 or scores.ndim != 1 or len(labels) != len(scores) or not len(labels):
        raise ValueError(
            f"y_true and y_score must be 1-D and of one length, at least one cell; got "
            f"shapes {labels.shape} and {scores.shape}."
        )
    if labels.dtype.kind not in "biuf" or not np.isin(labels, (0, 1)).all():
        found = sorted({str(value) for value in labels.tolist()})[:5]
        raise ValueError(
            f"y_true must hold 1 for {POSITIVE_CLASS} and 0 for {CLASS_NAMES[0]}, got values "
            f"such as {', '.join(found)}."
        )
    if scores.dtype.kind not in "biuf" or not ((scores >= 0) & (scores <= 1)).all():
        raise ValueError(
            f"y_score must hold P({POSITIVE_CLASS}) between 0 and 1 for every cell (no NaN)."
        )
    patients = None
    if groups is not None:
        if isinstance(groups, str | bytes):
            raise ValueError("groups must list the patient of each cell, not be one string.")
        patients = np.asarray(groups)
        if patients.shape != labels.shape:
            raise ValueError(
                f"groups must give one patient per cell: {len(labels)} cells, groups of "
                f"shape {patients.shape}."
            )
    return labels.astype(int), scores.astype(float), patients


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, threshold: float = 0.5) -> dict:
    """Cell-level metrics for binary labels (1 = Parasitized) and scores P(Parasitized).

    Returns:
        A dict with the metrics in METRIC_NAMES (``recall`` is sensitivity), the
        confusion counts ``tp, fp, tn, fn`` and ``cells``. A metric whose denominator
        is zero (e.g. precision with no positive calls) is ``nan``.
    """
    y_true, y_score, _ = checked_inputs(y_true, y_score)
    y_pred = (y_score >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    metrics = _metrics_from_counts(np.array([tp]), np.array([fp]), np.array([tn]), np.array([fn]))
    result = {name: float(values[0]) for name, values in metrics.items()}
    result["roc_auc"] = _safe_auc(y_true, y_score)
    result.update(
        {"tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn), "cells": len(y_true)}
    )
    return result


def _metrics_from_counts(tp: np.ndarray, fp: np.ndarray, tn: np.ndarray, fn: np.ndarray) -> dict:
    """Vectorized threshold metrics, so thousands of bootstrap samples cost little."""
    tp, fp, tn, fn = (np.asarray(v, dtype=float) for v in (tp, fp, tn, fn))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = tp / (tp + fp)
        recall = tp / (tp + fn)
        specificity = tn / (tn + fp)
        mcc_denominator = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        return {
            "accuracy": (tp + tn) / (tp + tn + fp + fn),
            "precision": precision,
            "recall": recall,
            "specificity": specificity,
            "f1": 2 * tp / (2 * tp + fp + fn),
            "mcc": np.where(mcc_denominator > 0, (tp * tn - fp * fn) / mcc_denominator, np.nan),
        }


def _safe_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    if len(np.unique(y_true)) < 2:
        return float("nan")
    return float(roc_auc_score(y_true, y_score))


def bootstrap_intervals(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence[str],
    threshold: float = 0.5,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile confidence intervals from resampling whole patients.

    Args:
        y_true: 1 for Parasitized, 0 for Uninfected, per cell.
        y_score: P(Parasitized) per cell.
        groups: The patient of each cell.
        threshold: Decision threshold for the threshold metrics.
        n_resamples: Bootstrap samples.
        confidence: Coverage of the interval.
        seed: Makes the intervals reproducible.

    Returns:
        ``{metric: (low, high)}`` for every name in METRIC_NAMES, from the resamples
        where the metric has a value (a resample of healthy donors only has no recall
        or AUC; :func:`summarize` says how many had one); ``nan`` bounds when none has,
        or with one patient only (every resample would be that patient: no spread).

    Raises:
        ValueError: For inputs :func:`checked_inputs` refuses, a ``confidence`` outside
            (0, 1) (e.g. 95 for 0.95) or fewer than one resample.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, e.g. 0.95; got {confidence!r}.")
    samples = _bootstrap_samples(y_true, y_score, groups, threshold, n_resamples, seed)
    return _percentile_intervals(samples, confidence)


def _percentile_intervals(
    samples: dict[str, np.ndarray], confidence: float
) -> dict[str, tuple[float, float]]:
    """Percentile interval of each metric over the resamples where it has a value."""
    alpha = (1 - confidence) / 2
    intervals = {}
    for name in METRIC_NAMES:
        values = samples[name][np.isfinite(samples[name])]
        if len(values) == 0:
            intervals[name] = (float("nan"), float("nan"))
        else:
            low, high = np.quantile(values, [alpha, 1 - alpha])
            intervals[name] = (float(low), float(high))
    return intervals


def _bootstrap_samples(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence[str],
    threshold: float,
    n_resamples: int,
    seed: int,
) -> dict[str, np.ndarray]:
    """Every metric on every resample of the patients; ``nan`` where it has no value."""
    y_true, y_score, groups = checked_inputs(y_true, y_score, groups)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}.")
    patient_names, patient_index = np.unique(groups, return_inverse=True)
    n_patients = len(patient_names)
    if n_patients < 2:
        return {name: np.full(n_resamples, np.nan) for name in METRIC_NAMES}
    y_pred = y_score >= threshold
    counts = np.zeros((n_patients, 4))  # tp, fp, tn, fn per patient
    np.add.at(counts, (patient_index, 0), y_pred & (y_true == 1))
    np.add.at(counts, (patient_index, 1), y_pred & (y_true == 0))
    np.add.at(counts, (patient_index, 2), ~y_pred & (y_true == 0))
    np.add.at(counts, (patient_index, 3), ~y_pred & (y_true == 1))
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_patients, size=(n_resamples, n_patients))
    # How often each patient is drawn in each resample, then summed confusion counts.
    multiplicity = np.zeros((n_resamples, n_patients))
    np.add.at(multiplicity, (np.arange(n_resamples)[:, None], draws), 1)
    totals = multiplicity @ counts
    samples = _metrics_from_counts(totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3])
    samples["roc_auc"] = _bootstrap_auc(y_true, y_score, patient_index, multiplicity)
    return samples


def _bootstrap_auc(
    y_true: np.ndarray, y_score: np.ndarray, patient_index: np.ndarray, multiplicity: np.ndarray
) -> np.ndarray:
    """AUC per resample, with each cell weighted by how often its patient was drawn."""
    aucs = np.full(len(multiplicity), np.nan)
    for sample, weights_per_patient in enumerate(multiplicity):
        weights = weights_per_patient[patient_index]
        mask = weights > 0
        if len(np.unique(y_true[mask])) < 2:
            continue
        aucs[sample] = roc_auc_score(y_true[mask], y_score[mask], sample_weight=weights[mask])
    return aucs


@dataclass
class PatientRow:
    """How the model did on one patient's cells (columns of ``per_patient.csv``).

    ``parasitized_cells`` are the patient's cells labelled Parasitized (the positive
    class), ``predicted_parasitized`` those called Parasitized at ``threshold``
    (P(Parasitized) at or above it), ``errors`` the cells called wrong and
    ``accuracy`` the share called right; ``split`` is the split the patient was scored in.
    """

    patient: str
    cells: int
    parasitized_cells: int
    predicted_parasitized: int
    errors: int
    accuracy: float
    split: str = ""
    threshold: float = 0.5


def per_patient_table(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence[str],
    threshold: float = 0.5,
    split: str = "",
) -> list[PatientRow]:
    """One row per patient, sorted by patient id; ``split`` and ``threshold`` on every row,
    so the table read alone still says what it measured."""
    y_true, y_score, groups = checked_inputs(y_true, y_score, groups)
    y_pred = (y_score >= threshold).astype(int)
    rows = []
    for patient in sorted(set(groups.tolist())):
        mask = groups == patient
        right = y_true[mask] == y_pred[mask]
        rows.append(
            PatientRow(
                patient=str(patient),
                cells=int(mask.sum()),
                parasitized_cells=int(y_true[mask].sum()),
                predicted_parasitized=int(y_pred[mask].sum()),
                errors=int((~right).sum()),
                accuracy=float(right.mean()),
                split=split,
                threshold=float(threshold),
            )
        )
    return rows


def roc_points(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, list[float]] | None:
    """False/true positive rates and thresholds of the ROC curve; None with one class
    only, where the curve does not exist."""
    if len(set(np.asarray(y_true).astype(int).tolist())) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(np.asarray(y_true).astype(int), np.asarray(y_score))
    return {
        "false_positive_rate": fpr.tolist(),
        "true_positive_rate": tpr.tolist(),
        "thresholds": np.nan_to_num(thresholds, posinf=1.0).tolist(),
    }


def summarize(
    y_true: np.ndarray,
    y_score: np.ndarray,
    groups: Sequence[str],
    split: str,
    threshold: float = 0.5,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """The full metrics block written to ``metrics.json`` and the model card.

    Metrics are over cells; their ``ci95`` come from a bootstrap over patients (``seed``
    makes it reproducible). ``bootstrap.usable_resamples`` says from how many resamples
    each interval comes, ``source_field_images`` how many of the patients are field
    images of files named outside the NIH rule, and ``caveat`` (or None) why the
    intervals may not be trusted (:func:`interval_caveat`). Strict JSON: a figure
    without a value is null, with its reason under ``undefined``.
    """
    point = compute_metrics(y_true, y_score, threshold)
    samples = _bootstrap_samples(y_true, y_score, groups, threshold, n_resamples, seed)
    intervals = _percentile_intervals(samples, CONFIDENCE)
    classes = {int(label) for label in np.asarray(y_true)}
    patients = sorted({str(group) for group in groups})
    fields = [patient for patient in patients if patient.startswith(FIELD_PREFIX)]
    unit = "patient"
    if fields:
        every = len(fields) == len(patients)
        unit = "source field image" if every else "patient or source field image"
    block = {
        "split": split,
        "unit": f"cell (metrics over cells; confidence intervals from a bootstrap over {unit}s)",
        "positive_class": POSITIVE_CLASS,
        "class_order": list(CLASS_NAMES),
        "threshold": threshold,
        "cells": point["cells"],
        "patients": len(patients),
        "source_field_images": len(fields),
        "confusion_matrix": {
            "rows_true_columns_predicted": list(CLASS_NAMES),
            "counts": [[point["tn"], point["fp"]], [point["fn"], point["tp"]]],
        },
        "metrics": {
            name: {
                "value": _defined(point[name]),
                "ci95": [_defined(bound) for bound in intervals[name]],
            }
            for name in METRIC_NAMES
        },
        "undefined": {
            name: _why_undefined(name, classes) for name in METRIC_NAMES if _nan(point[name])
        },
        "bootstrap": {
            "resamples": n_resamples,
            "unit": unit,
            "method": "percentile",
            "confidence": CONFIDENCE,
            "seed": seed,
            "usable_resamples": {
                name: int(np.isfinite(samples[name]).sum()) for name in METRIC_NAMES
            },
        },
    }
    block["caveat"] = interval_caveat(block)
    return block


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _defined(value: float) -> float | None:
    """``None`` (JSON null) for a metric that has no value: strict JSON has no NaN."""
    return None if _nan(float(value)) else float(value)


def _why_undefined(name: str, classes: set[int]) -> str:
    if name == "precision":
        # Precision needs a Parasitized call, not both classes: all-Parasitized cells
        # with some called Parasitized have a precision (1.0).
        return "no cell was called Parasitized at this threshold, so precision divides by zero"
    if len(classes) < 2:
        only = CLASS_NAMES[next(iter(classes))] if classes else "no"
        return f"all cells are {only}; {name} needs cells of both classes"
    return f"every cell was called the same label at this threshold, so {name} divides by zero"
