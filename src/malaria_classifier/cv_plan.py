"""The plan of a cross-validation, checked before any fold trains.

:func:`plan_folds` assigns the patient-grouped, stratified folds
(:func:`splits.assign_folds`) and checks every pending fold's split, so a late fold
cannot stop a long run. ``cv_plan.json`` (:func:`write_plan`) records the folds, the
recipe, a digest of any cell list (:func:`digest_cells`) and the data fingerprint; a
resumed cross-validation is refused when its settings (:func:`read_plan`) or its data
(:func:`check_same_data`) differ, rather than mixing incomparable folds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from malaria_classifier.config import TrainingConfig, save_config
from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.data import DatasetReport
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.splits import (
    ManifestRow,
    assign_folds,
    fold_manifest,
    leave_out_of_training,
)

PLAN_FILE = "cv_plan.json"
# The plan's entry for the fingerprint of the data (``DatasetReport.fingerprint``).
DATA_KEY = "data_sha256"
DATA_REPORT_FILE = "data_report.json"


def plan_folds(
    report: DatasetReport,
    folds: int,
    pending: Sequence[int],
    config: TrainingConfig,
    exclude_cells: Mapping[int | None, set[str]] | None = None,
) -> dict[int, list[ManifestRow]]:
    """Assign the folds and check each pending fold's split before any training.

    A fold that cannot be trained (no test patients, too few other patients for
    training and validation, no cells of a class left to train on) would otherwise
    stop the cross-validation only when its turn comes, after hours of training the
    folds before it.

    Args:
        report: The checked data.
        folds: Number of folds.
        pending: The folds (from 0) still to train.
        config: The recipe; its ``seed`` and ``validation_fraction`` make the split.
        exclude_cells: Cells to leave out of training, as for :func:`cross_validate`.

    Returns:
        The manifest of each pending fold (its patients are ``test``).

    Raises:
        ValueError: Naming the fold (from 1, like ``fold_1``) and what to change.
    """
    fold_of_record = assign_folds(report.records, report.hashes, folds, config.seed)
    manifests = {}
    for fold in pending:
        rows = fold_manifest(
            report.records,
            report.hashes,
            fold_of_record,
            fold,
            report.root,
            config.validation_fraction,
            config.seed,
        )
        _check_training_classes(rows, cells_of_fold(exclude_cells or {}, fold), fold, folds)
        manifests[fold] = rows
    return manifests


def cells_of_fold(cells: Mapping[int | None, set[str]], fold: int) -> set[str]:
    """The cells fold ``fold`` (from 0) leaves out: the common list and its own."""
    return cells.get(None, set()) | cells.get(fold + 1, set())


def _check_training_classes(
    rows: Sequence[ManifestRow], cells: set[str], fold: int, folds: int
) -> None:
    """Refuse a fold whose training cells would lack a class.

    ``train_model`` refuses a cell list that empties a class only when the fold
    starts; checked here for every fold so a late fold cannot stop a long run.
    """
    training = [row for row in rows if row.split == "train"]
    left_out = leave_out_of_training(rows, cells)[0] if cells else []
    left = {(row.path, row.sha256) for row in left_out}
    kept = {row.label for row in training if (row.path, row.sha256) not in left}
    missing = " or ".join(label for label in CLASS_NAMES if label not in kept)
    if not missing:
        return
    if {row.label for row in training} >= set(CLASS_NAMES):
        raise ValueError(
            f"Fold {fold + 1} of {folds}: the cell list leaves no {missing} cell in its "
            f"training split. Leave fewer cells out."
        )
    raise ValueError(
        f"Fold {fold + 1} of {folds}: its training patients have no {missing} cells, so "
        f"its model could not learn that class. Use fewer folds or add images from more "
        f"patients."
    )


def check_cell_folds(
    cells: Mapping[int | None, set[str]], folds: int
) -> Mapping[int | None, set[str]]:
    beyond = sorted(fold for fold in cells if fold is not None and fold > folds)
    if beyond:
        raise ValueError(
            f"The cell list names fold(s) {beyond}, but there are only {folds} folds. "
            f"Use the --folds the list was made for."
        )
    return cells


def digest_cells(cells: Mapping[int | None, set[str]]) -> str | None:
    """A fingerprint of a cell list, so a resumed cross-validation uses the same one."""
    if not cells:
        return None
    lines = sorted(f"{fold or ''}:{cell}" for fold, members in cells.items() for cell in members)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def read_plan(
    run_dir: Path, config: TrainingConfig, folds: int, cells_digest: str | None = None
) -> dict[str, Any] | None:
    """The plan of a cross-validation begun in ``run_dir``, if it matches; else refuse.

    Mixing folds trained with different recipes, fold assignments or cell lists would
    average incomparable numbers, so a changed plan is refused rather than silently
    merged. Plans without a cell list have no ``excluded_cells`` entry. Reads only:
    the plan is written by :func:`write_plan` once every check has passed.

    Returns:
        The earlier plan, or None if ``run_dir`` holds none.
    """
    plan_path = run_dir / PLAN_FILE
    if not plan_path.is_file():
        return None
    earlier = json.loads(plan_path.read_text(encoding="utf-8"))
    if earlier["folds"] != folds or earlier["config"] != config.to_dict():
        raise ValueError(
            f"{run_dir} holds a cross-validation with other settings ({earlier['folds']} "
            f"folds; recipe in {run_dir / 'config.yaml'}). Resume it with the same "
            f"--folds and --config, or choose another --output folder."
        )
    if earlier.get("excluded_cells") != cells_digest:
        raise ValueError(
            f"{run_dir} holds a cross-validation made with another --exclude-cells list "
            f"(or none). Resume it with the list it started with, or choose another "
            f"--output folder."
        )
    return earlier


def check_same_data(
    run_dir: Path, plan: Mapping[str, Any], fingerprint: str, data_dir: str | Path
) -> None:
    """Refuse to resume on other data: its folds would mix two data sets' patients.

    Plans written before data fingerprints were recorded carry none and are accepted.
    """
    recorded = plan.get(DATA_KEY)
    if recorded is None or recorded == fingerprint:
        return
    raise ValueError(
        f"{run_dir} holds a cross-validation of other data: the cells in --data {data_dir} "
        f"differ from those it started with (data fingerprint {fingerprint[:12]}, "
        f"{run_dir / PLAN_FILE} records {recorded[:12]}). Resume it with the --data "
        f"folder it started with, or choose another --output folder for these data."
    )


def write_plan(
    run_dir: Path,
    config: TrainingConfig,
    folds: int,
    cells_digest: str | None,
    report: DatasetReport | None,
) -> None:
    """Record folds, recipe, cell list and data, so a resumed run can be checked.

    The data report (``data_report.json``, as a training run has) is written once,
    here, for all folds: they share one data check. ``report`` is None only when every
    fold is finished but the plan is missing; the plan then has no data fingerprint.
    """
    plan: dict[str, Any] = {"folds": folds, "config": config.to_dict()}
    if cells_digest is not None:
        plan["excluded_cells"] = cells_digest
    if report is not None:
        plan[DATA_KEY] = report.fingerprint()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / "config.yaml")
    if report is not None:
        write_json_atomically(report.to_dict(), run_dir / DATA_REPORT_FILE)
    # The plan last: its presence marks a cross-validation as begun.
    write_json_atomically(plan, run_dir / PLAN_FILE)
