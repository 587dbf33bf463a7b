"""Patient-grouped, stratified k-fold cross-validation of a training recipe.

One split of 160 patients gives test figures from about 23 patients, with intervals
too wide to tell recipes apart; Rajaraman et al. (2018) report patient-level 5-fold
cross-validation. Here every fold's patients are the test set of one training run
(``RUN/fold_<k>/``, a complete run folder), the other patients are split into train
and validation for early stopping, and the folds' test metrics are summarized as
mean ± standard deviation. A fold is finished when its ``metrics.json`` exists, so a
killed cross-validation resumes where it stopped (an interrupted fold continues from
its last epoch). ``cv_plan.json`` (:mod:`cv_plan`) records the folds, the recipe, any
cell list and a fingerprint of the data, so a resumed run refuses other settings or
other data rather than mixing them; it is written only once every fold has been
checked, so a refused call leaves nothing behind.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.config import TrainingConfig, load_config
from malaria_classifier.cv_plan import (
    cells_of_fold,
    check_cell_folds,
    check_same_data,
    digest_cells,
    plan_folds,
    read_plan,
    write_plan,
)
from malaria_classifier.data import DatasetReport, check_dataset
from malaria_classifier.evaluate import PATIENT_TABLE, write_rows_csv
from malaria_classifier.evaluation import METRIC_NAMES
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.outputs import check_output_folder, open_output
from malaria_classifier.run_folder import is_run_finished
from malaria_classifier.splits import ManifestRow
from malaria_classifier.training import train_model

RESULTS_CSV = "cv_results.csv"
RESULTS_JSON = "cv_results.json"
PATIENTS_CSV = "cv_per_patient.csv"
METRICS_FILE = "metrics.json"
# Where ``run_report.evaluate_run`` leaves each fold's per-patient table of its test patients.
FOLD_PATIENT_TABLE = Path("evaluation") / PATIENT_TABLE


@dataclass
class CrossValidationResult:
    """Per-fold test metrics, their mean and standard deviation, per-patient rows.

    ``patients`` has one row per test patient of every fold (``fold`` added to the
    columns of :class:`malaria_classifier.evaluation.PatientRow`): each patient is
    tested once, so these are the out-of-fold results patient by patient. Folds
    trained before per-patient tables were written are listed in
    ``folds_without_patient_table``.
    """

    run_dir: Path
    folds: list[dict[str, Any]]
    mean: dict[str, float]
    sd: dict[str, float]
    seconds: float
    patients: list[dict[str, Any]] = field(default_factory=list)
    folds_without_patient_table: list[int] = field(default_factory=list)


def fold_dir(run_dir: Path, fold: int) -> Path:
    """The run folder of fold ``fold`` (numbered from 1 in folder names)."""
    return run_dir / f"fold_{fold + 1}"


def is_fold_finished(run_dir: Path, fold: int) -> bool:
    """A fold is finished once its run is (model card and test metrics on disk).

    ``metrics.json`` alone is not enough: the card comes after it, and a fold's model
    without a card has no record of its split (``malaria evaluate`` would then score
    its training patients too).
    """
    return is_run_finished(fold_dir(run_dir, fold))


def cross_validate(
    data_dir: str | Path,
    config: TrainingConfig,
    run_dir: str | Path,
    folds: int = 5,
    verbose: int | str = "auto",
    progress: bool = True,
    exclude_cells: Mapping[int | None, set[str]] | None = None,
) -> CrossValidationResult:
    """Train and test one model per fold; skip folds that are already finished.

    Everything that can refuse the cross-validation is checked before anything is
    written or trained: the plan of a resumed run, the data (the same cells as the
    run started with), the fold assignment and every fold's split. So a refused
    call leaves no half-made run folder behind, and a doomed call never trains
    k-1 folds first. ``cv_plan.json``, ``config.yaml`` and ``data_report.json`` are
    written only when training is about to start.

    Example:
        >>> result = cross_validate("cell_images", TrainingConfig(), "runs/cv")  # doctest: +SKIP
        >>> result.mean["accuracy"], result.sd["accuracy"]  # doctest: +SKIP

    Args:
        data_dir: A folder in the NIH layout.
        config: The recipe; ``validation_fraction`` is the share of each fold's
            training patients' cells kept for validation, ``seed`` fixes the folds.
        run_dir: Output folder; holds ``cv_plan.json``, ``fold_<k>/`` and the results.
        folds: Number of folds (each fold's patients are tested once).
        verbose: Keras verbosity for each fold's training.
        progress: Show the data check's progress bar.
        exclude_cells: Cells (SHA-256 or manifest path) to leave out of training, per
            fold number (1, 2, ...), as :func:`malaria_classifier.splits.read_cell_list`
            reads them; key ``None`` applies to every fold. A fold's own test cells
            are never left out of anything. For an honest estimate, a fold's list must
            not come from models that saw that fold's test patients (nested folds,
            ``bench/noise_flags.py``).

    Returns:
        The per-fold metrics and their mean and standard deviation (over the folds
        where each metric is defined, see :func:`summarize_folds`).

    Raises:
        ValueError: If ``run_dir`` holds a cross-validation with other settings or of
            other data, the data folder is missing or not in the NIH layout, there are
            fewer patients than folds, or a fold's other patients cannot be split into
            training and validation with cells of both classes in training.
    """
    started = time.monotonic()
    run_dir = Path(run_dir)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"--folds must be an integer of at least 2, got {folds!r}.")
    check_output_folder(run_dir, Path(data_dir), "a cross-validation's run folders")
    exclude_cells = check_cell_folds(exclude_cells or {}, folds)
    cells_digest = digest_cells(exclude_cells)
    earlier = read_plan(run_dir, config, folds, cells_digest)
    if earlier is not None:
        config = load_config(run_dir / "config.yaml")
    pending = [fold for fold in range(folds) if not is_fold_finished(run_dir, fold)]
    report: DatasetReport | None = None
    manifests: dict[int, list[ManifestRow]] = {}
    if pending:
        report = check_dataset(data_dir, progress=progress)
        if earlier is not None:
            check_same_data(run_dir, earlier, report.fingerprint(), data_dir)
        manifests = plan_folds(report, folds, pending, config, exclude_cells)
    if earlier is None:
        # Only now, with every check passed, does the run folder come into being.
        write_plan(run_dir, config, folds, cells_digest, report)
    if report is not None and report.unreadable:
        _say(
            f"Skipping {len(report.unreadable)} unreadable image(s), e.g. {report.unreadable[0][1]}"
        )
    for fold in range(folds):
        where = fold_dir(run_dir, fold)
        if fold not in pending:
            _say(f"Fold {fold + 1}/{folds}: finished earlier ({where / METRICS_FILE}); skipped.")
            continue
        # A fold folder with a manifest was started: continue it from its last epoch.
        resume = (where / "manifest.csv").is_file()
        _say(f"Fold {fold + 1}/{folds}: {'resuming' if resume else 'training'} in {where}")
        fold_started = time.monotonic()
        result = train_model(
            data_dir,
            config,
            where,
            resume=resume,
            verbose=verbose,
            manifest=manifests[fold],
            exclude_cells=cells_of_fold(exclude_cells, fold),
        )
        test = result.metrics["test"]["metrics"]
        _say(
            f"Fold {fold + 1}/{folds} done in {(time.monotonic() - fold_started) / 60:.1f} min: "
            f"accuracy {test['accuracy']['value']:.4f}, AUC {test['roc_auc']['value']:.4f}"
        )
    fold_rows = [_fold_row(run_dir, fold) for fold in range(folds)]
    mean, sd = summarize_folds(fold_rows)
    patients, without_table = collect_patient_rows(run_dir, folds)
    result = CrossValidationResult(
        run_dir, fold_rows, mean, sd, time.monotonic() - started, patients, without_table
    )
    write_results(result)
    return result


def collect_patient_rows(run_dir: Path, folds: int) -> tuple[list[dict[str, Any]], list[int]]:
    """Every fold's per-patient table of its test patients, with the fold number.

    Returns:
        The rows (fold order, then patient order) and the folds (numbered from 1)
        whose run folder has no table.
    """
    rows: list[dict[str, Any]] = []
    missing = []
    for fold in range(folds):
        path = fold_dir(run_dir, fold) / FOLD_PATIENT_TABLE
        if not path.is_file():
            missing.append(fold + 1)
            continue
        with open(path, newline="", encoding="utf-8") as handle:
            rows.extend(_patient_row(fold + 1, row) for row in csv.DictReader(handle))
    return rows, missing


def _patient_row(fold: int, row: dict[str, str]) -> dict[str, Any]:
    """One table row with numbers as numbers; ``errors`` from the accuracy if absent.

    Tables written before the ``errors`` column existed (``malaria evaluate``'s, say,
    copied into a fold) still count: their accuracy is an exact share of the cells.
    """
    cells = int(row["cells"])
    accuracy = float(row["accuracy"])
    errors = int(row["errors"]) if row.get("errors") else round(cells * (1.0 - accuracy))
    return {
        "fold": fold,
        "patient": row["patient"],
        "cells": cells,
        "parasitized_cells": int(row["parasitized_cells"]),
        "predicted_parasitized": int(row["predicted_parasitized"]),
        "errors": errors,
        "accuracy": accuracy,
    }


def most_errors(patients: list[dict[str, Any]], count: int = 3) -> str:
    """The patients with the most wrong cells, e.g. ``P77 (fold 2): 107 of 482 cells``."""
    ranked = sorted(patients, key=lambda row: -row["errors"])[:count]
    return ", ".join(
        f"{row['patient']} (fold {row['fold']}): {row['errors']} of {row['cells']} cells"
        for row in ranked
        if row["errors"] > 0
    )


def _fold_row(run_dir: Path, fold: int) -> dict[str, Any]:
    metrics = json.loads((fold_dir(run_dir, fold) / METRICS_FILE).read_text(encoding="utf-8"))
    test = metrics["test"]
    row: dict[str, Any] = {"fold": fold + 1, "patients": test["patients"], "cells": test["cells"]}
    # An undefined metric is null in metrics.json; NaN here, so means and sds stay numeric.
    row.update(
        {
            name: math.nan
            if test["metrics"][name]["value"] is None
            else test["metrics"][name]["value"]
            for name in METRIC_NAMES
        }
    )
    return row


def summarize_folds(rows: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """Mean and sample standard deviation (ddof 1) of each metric over the folds where
    it is defined.

    A metric with no value in a fold (NaN: precision when that fold's model called no
    cell Parasitized, AUC on a fold without infected patients) is left out of that
    metric's mean and sd. Averaging the NaN in would make the whole figure NaN and hide
    what the other folds measured; how many folds each figure covers is given by
    :func:`count_defined_folds`, written beside the means (``folds_defined`` in
    ``cv_results.json``) and noted under the table, so a mean over fewer folds is not
    taken for one over all of them. With no defined fold the mean is NaN; with fewer
    than two the sd is NaN. Both become null in the JSON.
    """
    mean, sd = {}, {}
    for name in METRIC_NAMES:
        values = np.array([row[name] for row in rows], dtype=float)
        defined = values[~np.isnan(values)]
        mean[name] = float(np.mean(defined)) if defined.size else math.nan
        sd[name] = float(np.std(defined, ddof=1)) if defined.size > 1 else math.nan
    return mean, sd


def count_defined_folds(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many folds have a value of each metric: what each mean of
    :func:`summarize_folds` covers."""
    return {name: sum(not math.isnan(float(row[name])) for row in rows) for name in METRIC_NAMES}


def write_results(result: CrossValidationResult) -> None:
    """``cv_results.csv`` (one row per fold, then mean and sd) and ``cv_results.json``."""
    columns = ["fold", "patients", "cells", *METRIC_NAMES]
    with open_output(result.run_dir / RESULTS_CSV) as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in result.folds:
            writer.writerow([row[column] for column in columns])
        for label, values in (("mean", result.mean), ("sd", result.sd)):
            writer.writerow([label, "", "", *(values[name] for name in METRIC_NAMES)])
    if result.patients:
        columns = list(result.patients[0])
        write_rows_csv(result.patients, columns, result.run_dir / PATIENTS_CSV)
    write_json_atomically(
        {
            "unit": "cell metrics on each fold's test patients, threshold 0.5; "
            "mean and sample sd (ddof 1) over the folds where the metric is defined "
            "(their number in folds_defined)",
            "positive_class": "Parasitized",
            "folds": [_nulls_for_nan(row) for row in result.folds],
            "mean": _nulls_for_nan(result.mean),
            "sd": _nulls_for_nan(result.sd),
            "folds_defined": count_defined_folds(result.folds),
            "seconds_this_session": round(result.seconds, 1),
            "folds_without_patient_table": result.folds_without_patient_table,
        },
        result.run_dir / RESULTS_JSON,
    )


def _nulls_for_nan(values: Mapping[str, Any]) -> dict[str, Any]:
    """Undefined figures (NaN: a metric with no value in a fold, the sd of one fold)
    as JSON null: strict JSON readers refuse NaN."""
    return {
        name: None if isinstance(value, float) and math.isnan(value) else value
        for name, value in values.items()
    }


def format_table(result: CrossValidationResult) -> str:
    """A plain-text table: one line per fold, then mean ± sd.

    A mean over fewer folds than all (a metric undefined in some) is noted under the
    table, with the folds it leaves out.
    """
    header = f"{'fold':>5} {'patients':>8} {'cells':>6} " + " ".join(
        f"{name:>13}" for name in METRIC_NAMES
    )
    lines = [header]
    for row in result.folds:
        lines.append(
            f"{row['fold']:>5} {row['patients']:>8} {row['cells']:>6} "
            + " ".join(f"{row[name]:>13.4f}" for name in METRIC_NAMES)
        )
    lines.append(
        f"{'mean':>5} {'':>8} {'':>6} "
        + " ".join(
            f"{result.mean[name]:.4f}±{result.sd[name]:.4f}".rjust(13) for name in METRIC_NAMES
        )
    )
    defined = count_defined_folds(result.folds)
    partial = [
        f"{name} {count} of {len(result.folds)} (undefined in fold "
        f"{', '.join(str(row['fold']) for row in result.folds if math.isnan(float(row[name])))})"
        for name, count in defined.items()
        if count < len(result.folds)
    ]
    if partial:
        lines.append(f"Means over the folds where a metric is defined: {'; '.join(partial)}")
    errors = sum(row["errors"] for row in result.patients)
    if errors:
        # A fold far below the others is often one patient (label noise, a bad slide).
        lines.append(f"Most wrong cells ({errors} in all): {most_errors(result.patients)}")
    if result.folds_without_patient_table:
        folds = ", ".join(str(fold) for fold in result.folds_without_patient_table)
        lines.append(f"Folds without a per-patient table (trained by an older version): {folds}")
    return "\n".join(lines)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
