"""Evaluate a model on a data folder: choose the cells, score them, write the report.

Which cells are scored: the model card lists the patients of each split. With
``split="test"`` the cells of the model's test patients are scored, together with
cells of any patient the model never saw (they are unseen too). When none of the
folder's patients are in the card (another hospital's data, held-out patients), all
cells are scored. Training or validation patients are only scored when asked for.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.constants import CLASS_NAMES, DEFAULT_THRESHOLD, POSITIVE_CLASS
from malaria_classifier.data import ImageRecord, discover_images
from malaria_classifier.evaluation import PatientRow, per_patient_table, roc_points, summarize
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.outputs import check_output_folder, open_output
from malaria_classifier.plots import save_figures
from malaria_classifier.prediction import Predictor
from malaria_classifier.splits import SPLITS

PATIENT_TABLE = "per_patient.csv"


def select_records(
    records: list[ImageRecord], card: dict[str, Any], split: str
) -> tuple[list[ImageRecord], str]:
    """Pick the records to evaluate and describe the choice in one sentence.

    Raises:
        ValueError: If ``split`` is unknown or selects no cell.
    """
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}.")
    split_patients = card.get("split", {}).get("patients", {})
    known = {patient for members in split_patients.values() for patient in members}
    folder_patients = {record.patient for record in records}
    if not known or not folder_patients & known:
        reason = "the model has no split record" if not known else "none was used by the model"
        if split != "test":
            # Reported as "train" figures they would pass for what the model has seen.
            raise ValueError(
                f"--split {split}: none of this folder's {len(folder_patients)} patients is "
                f"among the model's {split} patients ({reason}), so there is no {split} "
                f"cell to score. To score these cells as unseen patients, use --split test "
                f"(the default)."
            )
        return records, (
            f"Evaluating all {len(records)} cells of {len(folder_patients)} patients ({reason})."
        )
    wanted = set(split_patients.get(split, []))
    chosen = [
        r for r in records if r.patient in wanted or (split == "test" and r.patient not in known)
    ]
    if not chosen:
        found = [name for name in SPLITS if set(split_patients.get(name, [])) & folder_patients]
        unseen = " or of a patient the model never saw" if split == "test" else ""
        raise ValueError(
            f"No cell of the model's {split} patients{unseen} is in this folder: its "
            f"{len(folder_patients)} patient(s) are all the model's {' and '.join(found)} "
            f"patients. Pass a folder that holds {split} patients (the one the model was "
            f"trained on, say), or --split {found[0]} to score those patients knowingly."
        )
    unseen = sum(record.patient not in known for record in chosen)
    return chosen, (
        f"Evaluating {len(chosen)} cells: {len(chosen) - unseen} of the model's {split} "
        f"patients and {unseen} of patients the model never saw; "
        f"{len(records) - len(chosen)} cells of other splits left out."
    )


def evaluate_model(
    predictor: Predictor,
    data_dir: str | Path,
    split: str = "test",
    output_dir: str | Path = "evaluation",
    n_resamples: int = 1000,
) -> dict[str, Any]:
    """Score the chosen cells and write ``metrics.json``, ``per_patient.csv`` and figures.

    Unreadable images (and folders that cannot be listed) are listed in the report and
    left out; they never stop it. Images outside the class folders and files that are
    not images are named in ``selection``.

    Example:
        >>> from malaria_classifier import Predictor  # doctest: +SKIP
        >>> report = evaluate_model(Predictor(), "cell_images", output_dir="ev")  # doctest: +SKIP
        >>> report["metrics"]["accuracy"]  # value and 95% CI over patients  # doctest: +SKIP
        {'value': 0.96..., 'ci95': [0.95..., 0.97...]}

    Returns:
        The metrics block (see :func:`malaria_classifier.evaluation.summarize`) with
        ``threshold_rule`` (:func:`describe_threshold`), ``selection``, ``model`` and
        ``unreadable`` added.

    Raises:
        ValueError: If ``predictor`` is not a Predictor, the split selects no cell
            (:func:`select_records`) or none of the selected images can be read.
    """
    if not isinstance(predictor, Predictor):
        raise ValueError(
            f"predictor must be a loaded Predictor, e.g. Predictor({str(predictor)!r}), got "
            f"{type(predictor).__name__}."
        )
    output_dir = Path(output_dir)
    check_output_folder(output_dir, Path(data_dir), "a folder of reports")
    # One class is a fair test too (healthy donors only: specificity).
    discovery = discover_images(data_dir, allow_one_class=True)
    chosen, description = select_records(discovery.records, predictor.card, split)
    predictions = list(predictor.predict_paths([record.path for record in chosen]))
    scored = [(r, p) for r, p in zip(chosen, predictions, strict=True) if not p.error]
    if not scored:
        raise ValueError(
            f"None of the {len(chosen)} selected images in {data_dir} could be read (first: "
            f"{predictions[0].error}). Check that they are cell images (`malaria data "
            f"check {data_dir}` lists every unreadable file)."
        )
    y_true = np.array([CLASS_NAMES.index(record.label) for record, _ in scored])
    y_score = np.array([prediction.probability for _, prediction in scored])
    groups = [record.patient for record, _ in scored]
    report = summarize(y_true, y_score, groups, split, predictor.threshold, n_resamples)
    report["threshold_rule"] = describe_threshold(predictor.card, predictor.threshold)
    outside = [str(path) for path in discovery.outside_class_folders]
    not_images = [str(path) for path in discovery.skipped_files]
    report["selection"] = {
        "description": description + _left_out_note(len(outside), len(not_images)),
        "data": str(data_dir),
        "outside_class_folders": outside,
        "not_image_files": not_images,
    }
    report["model"] = str(predictor.model_path)
    # Folders that could not be listed hid their images: as left out as unreadable ones.
    report["unreadable"] = [
        {"path": str(path), "error": error} for path, error in discovery.unreadable_folders
    ] + [
        {"path": p.path, "label": r.label, "patient": r.patient, "error": p.error}
        for r, p in zip(chosen, predictions, strict=True)
        if p.error
    ]
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a failed run leaves no folder
    # metrics.json last and removed first: a report killed half-way never shows new
    # metrics beside an earlier report's table and figures.
    (output_dir / "metrics.json").unlink(missing_ok=True)
    write_patient_table(
        per_patient_table(y_true, y_score, groups, predictor.threshold, split),
        output_dir / PATIENT_TABLE,
    )
    save_figures(
        output_dir,
        report["confusion_matrix"]["counts"],
        roc_points(y_true, y_score),
        report["metrics"]["roc_auc"]["value"],
        split,
        predictor.threshold,
    )
    write_json_atomically(report, output_dir / "metrics.json")
    return report


def describe_threshold(card: dict[str, Any], threshold: float) -> str:
    """Say which threshold the threshold metrics used and where it comes from.

    The same cells give other counts at 0.5 than at a calibrated model's operating
    threshold, so a report must say which one it used, and on which probability.
    """
    calibration = card.get("calibration") or {}
    operating = calibration.get("operating_point") or {}
    probability = (
        f"calibrated P({POSITIVE_CLASS})" if calibration else f"uncalibrated P({POSITIVE_CLASS})"
    )
    from_card = card.get("decision_threshold", DEFAULT_THRESHOLD)
    if threshold == from_card and operating:
        source = (
            f"the model's operating threshold ({operating.get('target', 'see its card')}, "
            f"chosen on validation patients by `malaria calibrate`)"
        )
    elif threshold == from_card:
        source = (
            f"the default {DEFAULT_THRESHOLD}: the model has not been through `malaria "
            f"calibrate`, which chooses an operating threshold on validation patients"
        )
    else:
        source = f"set by the caller, not the model card's {from_card:.4g}"
    return f"Cells are called {POSITIVE_CLASS} at {probability} >= {threshold:.4g}: {source}."


def _left_out_note(outside: int, not_images: int) -> str:
    """What discovery found but could not score, so no file vanishes without a word."""
    notes = []
    if outside:
        notes.append(
            f"{outside} image(s) outside the Parasitized/ and Uninfected/ folders have no "
            f"label and were not scored"
        )
    if not_images:
        notes.append(f"{not_images} file(s) in the class folders are not images (by suffix)")
    if not notes:
        return ""
    return " " + "; ".join(notes) + " (listed in metrics.json under 'selection')."


def write_patient_table(rows: list[PatientRow], path: Path) -> None:
    """Write the per-patient table as CSV (see :func:`write_rows_csv`)."""
    columns = [field.name for field in fields(PatientRow)]
    write_rows_csv([asdict(row) for row in rows], columns, path)


def write_rows_csv(rows: list[dict[str, Any]], columns: list[str], path: Path) -> None:
    """Write rows as CSV all at once or not at all (:func:`outputs.open_output`)."""
    with open_output(path) as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
