"""A training run's folder: started new or opened to resume, finished or not.

A new run writes its settings (``config.yaml``), data check (``data_report.json``),
patient-level split (``manifest.csv``) and, with ``--exclude-cells``, the training cells
it leaves out (``left_out_of_training.csv``) before its first epoch; a resumed run reads
them back with its checkpoint state (:mod:`malaria_classifier.checkpoints`). A run is
finished once its model card and metrics describe its ``model.keras``. The workers of a
multi-worker run each open their own run folder and must have read the same.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

from malaria_classifier.checkpoints import CHECKPOINT_DIR, STATE_FILE, new_state, read_state
from malaria_classifier.config import TrainingConfig, load_config, save_config
from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.data import check_dataset, find_class_root
from malaria_classifier.distribute import Distribution, workers_disagree
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model_card import CARD_FILE, MODEL_FILE, write_json_atomically
from malaria_classifier.run_report import METRICS_FILE
from malaria_classifier.splits import (
    ManifestRow,
    build_manifest,
    check_no_leakage,
    leave_out_of_training,
    missing_cells,
    read_manifest,
    split_by_patient,
    write_manifest,
)

LEFT_OUT_FILE = "left_out_of_training.csv"
WORKER_RESUME_HINT = (
    "A worker other than the chief resumes from the run folder at its own --output: a "
    "folder shared with the chief, or a copy of the chief's whole run folder made after "
    "all workers stopped, before every --resume (docs/distributed.md)."
)


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (e.g. it exists and --resume was not given)."""


def prepare_split(
    data_dir: Path, config: TrainingConfig, run_dir: Path, progress: bool = True
) -> tuple[Path, list[ManifestRow]]:
    """Check every image, split by patient, guard against leakage, write the manifest.

    Unreadable images are left out and listed in ``data_report.json``.
    """
    report = check_dataset(data_dir, progress=progress)
    for _path, error in report.unreadable:
        print(f"Skipping unreadable image: {error}", file=sys.stderr)
    splits = split_by_patient(
        report.records, report.hashes, config.validation_fraction, config.test_fraction, config.seed
    )
    rows = build_manifest(report.records, report.hashes, splits, report.root)
    check_no_leakage(rows)
    write_manifest(rows, run_dir / "manifest.csv")
    write_json_atomically(report.to_dict(), run_dir / "data_report.json")
    return report.root, rows


def open_run(
    data_dir: Path,
    config: TrainingConfig,
    run_dir: Path,
    resume: bool,
    manifest: Sequence[ManifestRow] | None = None,
    exclude_cells: Collection[str] = (),
) -> tuple[TrainingConfig, Path, list[ManifestRow], dict[str, Any]]:
    """Start a new run in ``run_dir``, or read back the one there to resume it.

    Returns:
        The run's settings (its own when resuming), the data root, the manifest rows
        and the checkpoint state (:func:`malaria_classifier.checkpoints.new_state` for
        a run that has finished no epoch).

    Raises:
        RunFolderError: If ``run_dir`` holds a run and ``resume`` is False, or holds no
            run (or lacks its settings or cells in ``data_dir``) and ``resume`` is True.
    """
    manifest_path = run_dir / "manifest.csv"
    state_path = run_dir / CHECKPOINT_DIR / STATE_FILE
    fresh_state = new_state()
    if resume:
        if not manifest_path.is_file():
            raise RunFolderError(
                f"Cannot resume: {run_dir} has no manifest.csv. Start a new run without --resume."
            )
        if not (run_dir / "config.yaml").is_file():
            raise RunFolderError(
                f"Cannot resume: {run_dir} has no config.yaml (the run's settings, written "
                f"when it started)."
            )
        config = load_config(run_dir / "config.yaml")
        rows = read_manifest(manifest_path)
        check_no_leakage(rows)
        root = find_class_root(data_dir)
        _check_manifest_files(rows, root, run_dir)
        state = read_state(state_path) if state_path.is_file() else fresh_state
        return config, root, rows, state
    if (run_dir / MODEL_FILE).exists() or state_path.exists():
        raise RunFolderError(
            f"{run_dir} already holds a training run. Pass --resume to continue it, or "
            f"choose another --output folder."
        )
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
    stale_left_out = run_dir / LEFT_OUT_FILE
    if stale_left_out.exists():
        # Left by an earlier start that ended before its first epoch: this run decides
        # its own cells, and a stale list would silently shrink its training split.
        stale_left_out.unlink()
        print(
            f"Replacing {stale_left_out} of an earlier start of this run that finished no epoch.",
            file=sys.stderr,
        )
    save_config(config, run_dir / "config.yaml")
    if manifest is None:
        root, rows = prepare_split(data_dir, config, run_dir)
    else:
        rows = list(manifest)
        check_no_leakage(rows)
        write_manifest(rows, manifest_path)
        root = find_class_root(data_dir)
    if exclude_cells:
        _record_left_out(rows, set(exclude_cells), run_dir)
    return config, root, rows, fresh_state


def _check_manifest_files(rows: Sequence[ManifestRow], root: Path, run_dir: Path) -> None:
    """Refuse to resume on data that lacks the run's cells (another --data, say).

    Otherwise the first missing file would stop training deep inside the input
    pipeline, minutes later, with TensorFlow's message instead of ours.
    """
    missing = missing_cells(rows, root)
    if missing:
        raise RunFolderError(
            f"Cannot resume {run_dir}: {len(missing)} of its {len(rows)} cells are not in "
            f"{root} (e.g. {missing[0]}). Pass the --data folder the run started with."
        )


def _record_left_out(rows: list[ManifestRow], cells: set[str], run_dir: Path) -> None:
    """Write the training rows named in ``cells`` to the run folder, and say what matched.

    Written once, when the run starts, so ``--resume`` leaves out the same cells.
    """
    left_out, counts = leave_out_of_training(rows, cells)
    left_keys = {(row.path, row.sha256) for row in left_out}
    remaining = {
        row.label
        for row in rows
        if row.split == "train" and (row.path, row.sha256) not in left_keys
    }
    if remaining != set(CLASS_NAMES):
        raise ValueError(
            f"The cell list leaves no {' or '.join(sorted(set(CLASS_NAMES) - remaining))} "
            f"cell in the training split. Leave fewer cells out."
        )
    write_manifest(left_out, run_dir / LEFT_OUT_FILE)
    by_label = ", ".join(
        f"{sum(row.label == label for row in left_out)} {label}" for label in CLASS_NAMES
    )
    print(
        f"Leaving {counts['left_out']} training cells out of training ({by_label}; listed in "
        f"{run_dir / LEFT_OUT_FILE}). Listed but kept: {counts['not_training']} validation or "
        f"test cells (always scored); not in this data: {counts['not_found']}.",
        file=sys.stderr,
    )


def drop_left_out_cells(rows: list[ManifestRow], run_dir: Path) -> list[ManifestRow]:
    """The manifest without the training cells a run leaves out (if any)."""
    left_out_path = run_dir / LEFT_OUT_FILE
    if not left_out_path.is_file():
        return rows
    left_keys = {(row.path, row.sha256) for row in read_manifest(left_out_path)}
    return [row for row in rows if (row.path, row.sha256) not in left_keys]


def is_run_finished(run_dir: Path) -> bool:
    """A run is finished once its model card and metrics are written (they come last)
    and its config asks for no more epochs.

    Raising ``epochs`` in the run's ``config.yaml`` makes a finished run unfinished
    again: ``--resume`` then trains the extra epochs and writes a new card.
    """
    if not ((run_dir / CARD_FILE).is_file() and (run_dir / METRICS_FILE).is_file()):
        return False
    card = json.loads((run_dir / CARD_FILE).read_text(encoding="utf-8"))
    described = card.get("model_sha256")  # cards from before this record have none
    model_path = run_dir / MODEL_FILE
    if described is not None and (
        not model_path.is_file() or sha256_of_file(model_path) != described
    ):
        return False  # the card describes an earlier model.keras: evaluate again
    state_path = run_dir / CHECKPOINT_DIR / STATE_FILE
    if not state_path.is_file():
        return True
    state = read_state(state_path)
    config = load_config(run_dir / "config.yaml")
    return state["epoch"] >= config.epochs or state["wait"] >= config.early_stopping_patience


def retire_stale_results(run_dir: Path) -> None:
    """Remove what described the model before this resumed session trains on.

    A finished run given more epochs (or one killed after its card was written) is
    about to change ``model.keras``; its card, metrics and ``malaria calibrate``'s
    Not-a-cell limits would then describe another model. They are written anew at the
    end of training (calibrate must be run again).
    """
    from malaria_classifier.ood import NOT_A_CELL_FILES

    stale = [run_dir / CARD_FILE, run_dir / METRICS_FILE]
    stale += [run_dir / name for name in NOT_A_CELL_FILES.values()]
    removed = [path.name for path in stale if path.is_file()]
    for name in removed:
        (run_dir / name).unlink()
    if removed:
        print(
            f"Training {run_dir} further: removed {', '.join(removed)} (they describe the "
            f"model before these epochs; the card and metrics are written again at the end, "
            f"then run `malaria calibrate` again).",
            file=sys.stderr,
        )


def training_facts(
    config: TrainingConfig, training_rows: list[ManifestRow], state: dict[str, Any]
) -> dict[str, Any]:
    """What every worker of a multi-worker run must have alike before training."""
    state_facts = ("checkpoint", "best_checkpoint", "best_epoch", "wait")
    return {
        "epoch": state["epoch"],
        "training state (checkpoint/state.json)": {key: state.get(key) for key in state_facts},
        "settings (config.yaml)": config.to_dict(),
        "cells (manifest.csv, left_out_of_training.csv)": [
            (row.path, row.label, row.split, row.sha256) for row in training_rows
        ],
    }


def check_workers_agree(
    distribution: Distribution, facts: dict[str, Any], run_dir: Path, resume: bool
) -> None:
    """Refuse, on every worker at once, to train when the workers would not train one model.

    Each worker reads its own run folder (to resume) and its own data: a copy of the run
    folder left from an earlier session would start that worker from an older epoch, and
    the workers would train in step on different weights and learning rates without any
    error; one whose copy is finished would return alone and leave the others waiting.
    No-op with one worker; every worker must call it at the same point.

    Raises:
        RunFolderError: Naming what differs and how to make the workers agree.
    """
    differ = workers_disagree(distribution, facts)
    if not differ:
        return
    if "epoch" in differ:
        what = (
            f"they would resume from different epochs ({', '.join(map(str, differ['epoch']))}; "
            f"this worker from epoch {facts['epoch']} of {run_dir})"
        )
    elif "finished" in differ:
        mine = "finished" if facts["finished"] else "not finished"
        what = (
            f"the run is finished in some of their run folders and not in others (this "
            f"worker's, {run_dir}, is {mine})"
        )
    else:
        what = f"their {' and '.join(differ)} differ"
    advice = (
        WORKER_RESUME_HINT
        if resume
        else "Run the same command on every machine, with the same data (docs/distributed.md)."
    )
    raise RunFolderError(
        f"The {distribution.workers} workers would not train the same model: {what}. "
        f"{advice} Nothing was trained."
    )
