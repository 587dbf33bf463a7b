"""What ``malaria calibrate`` is given, checked before minutes of scoring.

The setting and where results go (:func:`check_calibration_target`), a run that has
finished (:func:`check_run_finished`), a model trained on the run's manifest
(:func:`check_model_matches_run`), validation and test splits fit to choose and report
on (:func:`check_splits`), and their cells present in ``--data``
(:func:`check_cells_present`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from malaria_classifier.constants import POSITIVE_CLASS
from malaria_classifier.model_card import DEFAULT_MODEL_DIR, MODEL_FILE, read_model_card
from malaria_classifier.splits import missing_cells


def check_model_matches_run(model_path: Path, rows: Sequence[Any], manifest: Path) -> None:
    """Refuse a model trained on another split than the run's manifest.

    Calibrating on "validation" cells the model was trained on, and reporting on
    "test" cells it saw, would give an honest-looking card with leaked figures. The
    model card lists the patients of each of the model's own splits; a model without
    them (trained elsewhere) is taken as it is.
    """
    own = read_model_card(model_path).get("split", {}).get("patients", {})
    if not own:
        return
    split_of = {patient: split for split, patients in own.items() for patient in patients}
    for row in rows:
        model_split = split_of.get(row.patient)
        if model_split is not None and model_split != row.split:
            raise ValueError(
                f"{model_path} was trained on another split than {manifest}: patient "
                f"{row.patient} is {model_split} for the model but {row.split} in the "
                f"manifest. Pass the --run folder the model was trained in."
            )


def check_splits(rows: Sequence[Any], manifest: Path) -> None:
    """Before any scoring: validation needs both classes and both kinds of patient
    (the threshold and the verdict rule are chosen there); test needs cells to report."""
    by_split: dict[str, list[Any]] = {}
    for row in rows:
        by_split.setdefault(row.split, []).append(row)
    for split in ("validation", "test"):
        if not by_split.get(split):
            raise ValueError(
                f"{manifest} has no {split} cells (splits found: "
                f"{', '.join(sorted(by_split)) or 'none'}). Calibrate the run folder of a "
                f"`malaria train` run, whose manifest has train, validation and test splits."
            )
    validation = by_split["validation"]
    labels = {row.label for row in validation}
    infected = {row.patient for row in validation if row.label == POSITIVE_CLASS}
    healthy = {row.patient for row in validation} - infected
    if len(labels) < 2 or not healthy or not infected:
        raise ValueError(
            f"The validation split of {manifest} needs cells of both classes from both "
            f"infected patients and healthy donors (it has {len(infected)} infected and "
            f"{len(healthy)} healthy patients). Train again with another --seed or on more "
            f"patients, then calibrate that run."
        )


def check_cells_present(rows: Sequence[Any], root: Path, manifest: Path) -> None:
    """Refuse to fit on part of the validation or test cells (another --data, say)."""
    needed = [row for row in rows if row.split in ("validation", "test")]
    missing = missing_cells(needed, root)
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(needed)} validation and test cells of {manifest} "
            f"are not in {root} (e.g. {missing[0]}): calibration would be fitted and "
            f"reported on part of them. Pass the --data folder the run was trained on."
        )


def check_calibration_target(model_path: Path, min_specificity: float) -> None:
    """Cheap checks before minutes of scoring: the setting, and where results go."""
    if not (isinstance(min_specificity, float | int) and 0.0 < min_specificity < 1.0):
        raise ValueError(
            f"--min-specificity must be a number between 0 and 1 (exclusive), e.g. 0.97, "
            f"got {min_specificity}."
        )
    if not model_path.is_file():
        raise ValueError(
            f"{model_path} does not exist. Pass --model MODEL.keras, or --run RUN for the "
            f"model.keras of a `malaria train` run folder."
        )
    if not os.access(model_path.parent, os.W_OK | os.X_OK):
        raise ValueError(
            f"{model_path.parent} is not writable; calibrate writes model_card.json and "
            f"ood.json beside the model. Copy the model's folder somewhere you can write."
        )
    if model_path.resolve().parent == DEFAULT_MODEL_DIR.resolve():
        raise ValueError(
            f"{model_path} is the bundled default model; calibrate writes its files beside "
            f"the model and would change every prediction made without --model. Copy the "
            f"folder (cp -r {model_path.parent} my-model) and calibrate the copy."
        )


def check_run_finished(model_path: Path, run_dir: Path) -> None:
    """Refuse the model of a run that is still training or was interrupted.

    Its ``model.keras`` is only the best epoch so far, it has no model card to extend
    (calibrate would write a card with nothing but the trust layer), and finishing
    the run later rewrites the card without the calibration.
    """
    from malaria_classifier.checkpoints import CHECKPOINT_DIR
    from malaria_classifier.run_folder import is_run_finished

    is_runs_model = model_path.resolve() == (run_dir / MODEL_FILE).resolve()
    if is_runs_model and (run_dir / CHECKPOINT_DIR).is_dir() and not is_run_finished(run_dir):
        raise ValueError(
            f"The run in {run_dir} has not finished (no model_card.json or metrics.json "
            f"yet). Finish it first: malaria train --data DATA --output {run_dir} --resume; "
            f"then calibrate it."
        )
