"""From many cells to one verdict per patient, slide or folder.

A patient is called **positive** when at least ``min_suspicious_cells`` of their
cells have a calibrated P(Parasitized) of ``cell_threshold`` or more. The cell
threshold is much stricter than the per-cell operating threshold on purpose: a
healthy donor's ~70 cells always include a few that look a little parasitized, while
an infected patient almost always has at least one cell that looks *very*
parasitized. Both numbers are chosen on validation patients
(:func:`choose_verdict_rule`): every healthy validation donor must come out negative,
and as many infected validation patients as possible positive.

Fewer than ``min_cells`` usable cells (not failed, not "Not a cell") give
**indeterminate**: too few cells to rule malaria out.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from malaria_classifier.calibration import logits_from_probabilities, sigmoid
from malaria_classifier.data import FIELD_PREFIX, patient_id_from_name
from malaria_classifier.decision import NOT_A_CELL, PARASITIZED
from malaria_classifier.images import sha256_of_file

SUMMARY_COLUMNS: tuple[str, ...] = (
    "group",
    "cells",
    "parasitized_cells",
    "parasitemia",
    "verdict",
    "confidence",
)
GROUPINGS: tuple[str, ...] = ("patient", "slide", "folder", "all")
POSITIVE, NEGATIVE, INDETERMINATE = "positive", "negative", "indeterminate"
# Below this many usable cells a negative call is not safe (thin-smear practice reads
# far more); not fitted, a floor.
DEFAULT_MIN_CELLS = 20
_SLIDE = re.compile(r"^C(\d+)")


@dataclass(frozen=True)
class VerdictRule:
    """When a group of cells is called positive (see the module docstring)."""

    cell_threshold: float
    min_suspicious_cells: int = 1
    min_cells: int = DEFAULT_MIN_CELLS

    def __post_init__(self) -> None:
        if not 0.0 < self.cell_threshold < 1.0:
            raise ValueError(
                f"cell_threshold must be a probability between 0 and 1 (exclusive), got "
                f"{self.cell_threshold!r}."
            )
        for name in ("min_suspicious_cells", "min_cells"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for the model card."""
        return asdict(self)

    @classmethod
    def from_card(cls, card: Mapping[str, Any]) -> VerdictRule | None:
        """The rule in a model card, or None for a model without one."""
        data = card.get("verdict_rule")
        if not data:
            return None
        return cls(
            cell_threshold=float(data["cell_threshold"]),
            min_suspicious_cells=int(data["min_suspicious_cells"]),
            min_cells=int(data.get("min_cells", DEFAULT_MIN_CELLS)),
        )


@dataclass(frozen=True)
class GroupSummary:
    """One row of the summary CSV."""

    group: str
    cells: int
    parasitized_cells: int
    parasitemia: float | None
    verdict: str
    confidence: float | None


def verdict_for(probabilities: np.ndarray, rule: VerdictRule) -> tuple[str, float | None]:
    """Verdict and its confidence for one group's usable cells.

    Confidence is the calibrated P(Parasitized) of the weakest cell the positive call
    rests on (the ``min_suspicious_cells``-th most suspicious); for a negative call,
    one minus that of the most suspicious cell; none for indeterminate.
    """
    ranked = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
    needed = rule.min_suspicious_cells
    if len(ranked) >= needed and ranked[needed - 1] >= rule.cell_threshold:
        return POSITIVE, float(ranked[needed - 1])
    if len(ranked) < rule.min_cells:
        return INDETERMINATE, None
    return NEGATIVE, float(1.0 - ranked[0]) if len(ranked) else None


def group_name(path: str, group_by: str) -> str:
    """The group of one image: its patient (NIH naming), slide (``C<n>``), folder (its
    real path, links resolved), or all.

    Raises:
        ValueError: For an unknown ``group_by``.
    """
    if group_by == "patient":
        return patient_id_from_name(Path(path).name)
    if group_by == "slide":
        match = _SLIDE.match(Path(path).name)
        return f"C{int(match.group(1))}" if match else patient_id_from_name(Path(path).name)
    if group_by == "folder":
        # The folder as it is on disk: `cells/`, its absolute path and a link to it
        # must be one group, not three partial ones.
        return os.path.realpath(Path(path).parent)
    if group_by == "all":
        return "all"
    raise ValueError(f"--group-by must be one of {', '.join(GROUPINGS)}, got {group_by!r}.")


def groups_without_a_patient(summaries: Iterable[GroupSummary]) -> list[str]:
    """Groups named after a file, not a patient: names outside the NIH rule.

    ``--group-by patient`` (and ``slide``) fall back to each file's source field
    image, so a folder of one patient's cells named ``cell1.png``, ``cell2.png`` ...
    becomes one "patient" per cell, each indeterminate. The CLI names them and
    suggests ``--group-by folder`` rather than quietly giving per-cell verdicts.
    """
    return [summary.group for summary in summaries if summary.group.startswith(FIELD_PREFIX)]


def drop_repeated_pictures(
    rows: Sequence[Any], content_keys: Iterable[str | None] | None = None
) -> tuple[list[Any], int]:
    """The rows without those whose file repeats an earlier file's bytes, and how many
    were dropped.

    A copy of one cell under another name (or in another folder) is still one cell: left
    in, one suspicious cell copied three times would meet a three-cell positive rule.

    Args:
        rows: Prediction rows (``PredictionRow``-like).
        content_keys: One key per row saying what its picture is (e.g. a SHA-256), None
            for a row to keep as it is; by default each file's SHA-256, read now (failed
            rows and files that cannot be read again are kept: they count as no cell or
            as their own).
    """
    if content_keys is None:
        content_keys = (_file_key(row) for row in rows)
    seen: set[str] = set()
    kept: list[Any] = []
    for row, key in zip(rows, content_keys, strict=True):
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        kept.append(row)
    return kept, len(rows) - len(kept)


def _file_key(row: Any) -> str | None:
    if row.error:
        return None
    try:
        return sha256_of_file(row.path)
    except OSError:
        return None


def summarize_group(group: str, rows: Sequence[Any], rule: VerdictRule) -> GroupSummary:
    """Aggregate prediction rows (``PredictionRow``-like) of one group into a verdict.

    Rows that failed or were judged "Not a cell" are not counted as cells.
    """
    usable = [row for row in rows if not row.error and row.decision != NOT_A_CELL]
    probabilities = np.array([row.probability for row in usable], dtype=np.float64)
    parasitized = sum(row.decision == PARASITIZED for row in usable)
    verdict, confidence = verdict_for(probabilities, rule)
    return GroupSummary(
        group=group,
        cells=len(usable),
        parasitized_cells=parasitized,
        parasitemia=parasitized / len(usable) if usable else None,
        verdict=verdict,
        confidence=confidence,
    )


def summarize_rows(
    rows: Iterable[Any], rule: VerdictRule, group_by: str = "patient"
) -> list[GroupSummary]:
    """One :class:`GroupSummary` per group, sorted by group name.

    Every row counts: drop repeated pictures first (:func:`drop_repeated_pictures`, as
    ``malaria predict --summary`` does), so that a copied cell does not count twice.

    Raises:
        ValueError: For a rule that is not a :class:`VerdictRule` (e.g. None: the model
            was not calibrated) or an unknown ``group_by``.

    Example:
        >>> rows = list(predictor.predict_paths(["slide_folder/"]))  # doctest: +SKIP
        >>> rows, repeated = drop_repeated_pictures(rows)  # doctest: +SKIP
        >>> summarize_rows(rows, predictor.verdict_rule, "folder")  # doctest: +SKIP
    """
    if not isinstance(rule, VerdictRule):
        raise ValueError(
            f"rule must be a VerdictRule, got {rule!r}. A model without one (not calibrated, "
            f"e.g. a fresh `malaria train` run) cannot give verdicts: run `malaria calibrate` "
            f"on it first."
        )
    groups: dict[str, list[Any]] = {}
    for row in rows:
        groups.setdefault(group_name(row.path, group_by), []).append(row)
    return [summarize_group(name, groups[name], rule) for name in sorted(groups)]


def write_summary(
    summaries: Iterable[GroupSummary], handle: TextIO, output_format: str = "csv"
) -> None:
    """Write the summary as CSV, or as a JSON list of objects (``SUMMARY_COLUMNS`` each;
    an undefined parasitemia or confidence is null)."""
    if output_format == "json":
        rows = [
            {column: getattr(summary, column) for column in SUMMARY_COLUMNS}
            for summary in summaries
        ]
        handle.write(json.dumps(rows, indent=2, allow_nan=False) + "\n")
        return
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for summary in summaries:
        writer.writerow(
            [
                summary.group,
                summary.cells,
                summary.parasitized_cells,
                "" if summary.parasitemia is None else f"{summary.parasitemia:.4f}",
                summary.verdict,
                "" if summary.confidence is None else f"{summary.confidence:.4f}",
            ]
        )


def choose_verdict_rule(
    patient_probabilities: Mapping[str, np.ndarray],
    infected: Mapping[str, bool],
    max_suspicious_cells: int = 3,
    min_cells: int = DEFAULT_MIN_CELLS,
) -> VerdictRule:
    """Pick ``cell_threshold`` and ``min_suspicious_cells`` on validation patients.

    For each count ``k`` the threshold must lie above every healthy donor's ``k``-th
    highest score (so all are negative); it is put halfway, in log-odds, between the
    highest such healthy score and the next infected patient's score above it. The
    ``k`` that calls the most infected patients positive wins; ties go to the wider
    gap (the rule least sensitive to a shift in scores), then to the smaller ``k``.

    Raises:
        ValueError: Without both healthy and infected patients.
    """
    healthy = [p for p in patient_probabilities if not infected[p]]
    sick = [p for p in patient_probabilities if infected[p]]
    if not healthy or not sick:
        raise ValueError(
            "Choosing a verdict rule needs both healthy and infected patients among the "
            "usable cells (the Not-a-cell check may have rejected a whole patient's cells)."
        )
    candidates = []
    for k in range(1, max_suspicious_cells + 1):
        healthy_top = max(_kth_highest(patient_probabilities[p], k) for p in healthy)
        sick_top = np.array([_kth_highest(patient_probabilities[p], k) for p in sick])
        above = sick_top[sick_top > healthy_top]
        upper = float(above.min()) if len(above) else min(1.0, healthy_top + 1e-6)
        low_logit, high_logit = logits_from_probabilities(np.array([healthy_top, upper]))
        threshold = float(sigmoid((low_logit + high_logit) / 2.0))
        candidates.append((len(above), float(high_logit - low_logit), -k, threshold))
    _, _, negative_k, threshold = max(candidates, key=lambda candidate: candidate[:3])
    return VerdictRule(
        cell_threshold=threshold, min_suspicious_cells=-negative_k, min_cells=min_cells
    )


def _kth_highest(values: np.ndarray, k: int) -> float:
    ranked = np.sort(np.asarray(values, dtype=np.float64))[::-1]
    return float(ranked[k - 1]) if len(ranked) >= k else 0.0
