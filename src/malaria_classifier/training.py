"""Train a model into a run folder that can be resumed and reproduced.

A run folder holds: ``config.yaml`` (resolved settings), ``data_report.json``,
``manifest.csv`` (the patient-level split), ``model.keras`` (best epoch by validation
loss, weights only, no optimizer) and its serving copy (``model.serving.*``),
``model_card.json``, ``history.json``, ``metrics.json``, ``evaluation/`` (test-split
figures, ``per_patient.csv``), ``tensorboard/`` and ``checkpoint/`` (for ``--resume``:
``state.json``, the epoch-named checkpoint it names with optimizer state, and the best
epoch's model); with ``--exclude-cells``, also ``left_out_of_training.csv`` (the training
cells not trained on). Every file is written to a temporary name and renamed, so a killed
run never leaves a corrupt model where a good one was; ``state.json`` is written after the
files it names, so a kill at any moment resumes from one consistent epoch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from malaria_classifier.config import TrainingConfig, load_config, save_config
from malaria_classifier.constants import CLASS_NAMES, DEFAULT_THRESHOLD, POSITIVE_CLASS
from malaria_classifier.data import check_dataset, find_class_root
from malaria_classifier.distribute import (
    Distribution,
    describe,
    keras_fit_fixes,
    make_distribution,
    scale_for_replicas,
    workers_disagree,
)
from malaria_classifier.evaluation import per_patient_table, roc_points, summarize
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model import build_model, compile_model, count_weight_bytes, load_model
from malaria_classifier.model_card import CARD_FILE, MODEL_FILE, write_json_atomically
from malaria_classifier.outputs import check_output_folder
from malaria_classifier.pipeline import make_dataset
from malaria_classifier.splits import (
    SPLITS,
    ManifestRow,
    build_manifest,
    check_no_leakage,
    leave_out_of_training,
    missing_cells,
    read_manifest,
    split_by_patient,
    split_summary,
    write_manifest,
)

LOGGER = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
# Run folders from before epoch-named checkpoints keep theirs under this name.
LEGACY_CHECKPOINT = "last.keras"
LEFT_OUT_FILE = "left_out_of_training.csv"
METRICS_FILE = "metrics.json"
# Where a multi-worker run's other workers write (in the temporary folder; removed at
# the end, left behind only by a killed worker).
WORKER_SCRATCH_PREFIX = "malaria-worker-"
WORKER_RESUME_HINT = (
    "A worker other than the chief resumes from the run folder at its own --output: a "
    "folder shared with the chief, or a copy of the chief's whole run folder made after "
    "all workers stopped, before every --resume (docs/distributed.md)."
)


class RunFolderError(ValueError):
    """A run folder cannot be used as asked (e.g. it exists and --resume was not given)."""


@dataclass
class TrainingResult:
    """What a finished training run produced."""

    run_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    seconds: float


def save_model_atomically(model: keras.Model, path: Path, include_optimizer: bool) -> None:
    """Save to a temporary file, then rename over ``path``.

    Without the optimizer the file is about three times smaller; that is what gets
    shipped. The checkpoint keeps it so a resumed run continues Adam's state.
    """
    if not include_optimizer and getattr(model, "optimizer", None) is not None:
        model = _uncompiled_copy(model)
    temporary = path.with_name(f".{path.stem}.partial.keras")
    model.save(temporary)
    temporary.replace(path)


def _uncompiled_copy(model: keras.Model) -> keras.Model:
    # keras.models.clone_model would carry the compiled optimizer along in Keras 3.
    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


class RunCheckpoint(keras.callbacks.Callback):
    """Keeps the best model, the last checkpoint and the history on disk every epoch.

    It also does early stopping, because its state (best loss, epochs without
    improvement) must survive an interruption together with the checkpoint.

    Each epoch's files get new, epoch-named paths and ``state.json`` names them; it is
    renamed into place last, so it is the single commit point. A kill before it leaves
    the previous epoch's state with the previous epoch's checkpoint (the new files are
    removed on resume); a kill after it leaves this epoch complete, and ``model.keras``
    is brought up to date from the checkpoint folder if the kill came before that.
    """

    def __init__(
        self, run_dir: Path, patience: int, state: dict[str, Any], session_started: float
    ) -> None:
        super().__init__()
        self.run_dir = run_dir
        self.patience = patience
        self.state = state
        # Seconds of earlier sessions, so a resumed run's card reports all its training.
        self.earlier_seconds = float(state.get("seconds", 0.0))
        self.session_started = session_started

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        logs = {key: float(value) for key, value in (logs or {}).items()}
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        checkpoint_dir = self.run_dir / CHECKPOINT_DIR
        # A copy: the state on disk must change only when state.json is renamed.
        state = json.loads(json.dumps(self.state))
        state["history"].append({"epoch": epoch + 1, **logs})
        validation_loss = logs.get("val_loss", math.inf)
        improved = validation_loss < state["best_val_loss"]
        if improved:
            state.update(best_val_loss=validation_loss, best_epoch=epoch + 1, wait=0)
            state["best_checkpoint"] = f"best-epoch-{epoch + 1:03d}.keras"
            save_model_atomically(
                self.model, checkpoint_dir / state["best_checkpoint"], include_optimizer=False
            )
        else:
            state["wait"] += 1
        state["checkpoint"] = f"epoch-{epoch + 1:03d}.keras"
        save_model_atomically(self.model, checkpoint_dir / state["checkpoint"], True)
        state["epoch"] = epoch + 1
        state["seconds"] = self.earlier_seconds + time.monotonic() - self.session_started
        write_json_atomically(state, checkpoint_dir / STATE_FILE)  # the commit point
        self.state.clear()
        self.state.update(state)
        if improved:
            publish_best_model(self.run_dir, state)
        remove_uncommitted_checkpoints(self.run_dir, state)
        write_json_atomically(state["history"], self.run_dir / "history.json")
        if state["wait"] >= self.patience:
            self.model.stop_training = True


def publish_best_model(run_dir: Path, state: dict[str, Any]) -> None:
    """Copy the best epoch's model, as ``state.json`` names it, to ``model.keras``.

    Called after each improvement and on resume, so a kill between the commit of
    ``state.json`` and this copy costs nothing.
    """
    name = state.get("best_checkpoint")
    if name is None:
        return  # a run folder from before epoch-named checkpoints wrote model.keras itself
    source = run_dir / CHECKPOINT_DIR / name
    target = run_dir / MODEL_FILE
    if target.is_file() and sha256_of_file(target) == sha256_of_file(source):
        return
    temporary = target.with_name(f".{target.stem}.partial.keras")
    shutil.copyfile(source, temporary)
    temporary.replace(target)


def remove_uncommitted_checkpoints(run_dir: Path, state: dict[str, Any]) -> None:
    """Delete checkpoint files that ``state.json`` does not name.

    They are the previous epochs' (superseded) or an epoch killed before its commit.
    """
    keep = {state.get("checkpoint", LEGACY_CHECKPOINT), state.get("best_checkpoint")}
    for path in (run_dir / CHECKPOINT_DIR).glob("*.keras"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def cosine_learning_rate(config: TrainingConfig):
    """Learning rate by epoch (a pure function of the epoch, so resuming is exact)."""

    def schedule(epoch: int, _current: float) -> float:
        return 0.5 * config.learning_rate * (1 + math.cos(math.pi * epoch / config.epochs))

    return schedule


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


def _open_run(
    data_dir: Path,
    config: TrainingConfig,
    run_dir: Path,
    resume: bool,
    manifest: Sequence[ManifestRow] | None = None,
    exclude_cells: Collection[str] = (),
) -> tuple[TrainingConfig, Path, list[ManifestRow], dict[str, Any]]:
    manifest_path = run_dir / "manifest.csv"
    state_path = run_dir / CHECKPOINT_DIR / STATE_FILE
    fresh_state = {"epoch": 0, "best_val_loss": math.inf, "best_epoch": 0, "wait": 0, "history": []}
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
        state = _read_state(state_path) if state_path.is_file() else fresh_state
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


def _training_rows(rows: list[ManifestRow], run_dir: Path) -> list[ManifestRow]:
    """The manifest without the training cells a run leaves out (if any)."""
    left_out_path = run_dir / LEFT_OUT_FILE
    if not left_out_path.is_file():
        return rows
    left_keys = {(row.path, row.sha256) for row in read_manifest(left_out_path)}
    return [row for row in rows if (row.path, row.sha256) not in left_keys]


def _read_state(path: Path) -> dict[str, Any]:
    state = json.loads(path.read_text(encoding="utf-8"))
    best = state["best_val_loss"]  # null: no epoch had a validation loss yet
    state["best_val_loss"] = math.inf if best is None else float(best)
    return state


def train_model(
    data_dir: str | Path,
    config: TrainingConfig,
    run_dir: str | Path,
    resume: bool = False,
    verbose: int | str = "auto",
    strategy: str = "none",
    manifest: Sequence[ManifestRow] | None = None,
    exclude_cells: Collection[str] = (),
) -> TrainingResult:
    """Train a CNN on ``data_dir`` and write everything into ``run_dir``.

    Example:
        >>> config = TrainingConfig(epochs=3)
        >>> result = train_model("cell_images", config, "runs/demo")  # doctest: +SKIP
        >>> result.metrics["test"]["metrics"]["accuracy"]["value"]  # doctest: +SKIP

    Args:
        data_dir: A folder in the NIH layout (``Parasitized/``, ``Uninfected/``).
        config: Training settings (ignored when resuming: the run's own are used).
        run_dir: Output folder; created if needed.
        resume: Continue an interrupted run in ``run_dir`` from its last epoch. A
            finished run (card and metrics written) is returned as it is: nothing is
            trained, evaluated or rewritten.
        verbose: Keras verbosity; ``"auto"`` shows a progress bar on a terminal.
        strategy: ``none``, ``mirrored`` or ``multiworker`` (see
            :mod:`malaria_classifier.distribute`); batch size and learning rate are
            per replica and scaled by the number of replicas.
        manifest: Use this split (e.g. a cross-validation fold's) instead of checking
            the data and splitting it; ``path`` is relative to the data root.
        exclude_cells: SHA-256 digests or manifest paths of cells to leave out of the
            training split (e.g. suspected label errors); recorded in
            ``left_out_of_training.csv`` when the run starts and kept on ``resume``.
            Validation and test cells are never left out.

    Returns:
        A :class:`TrainingResult` with the model path and its metrics (empty on a
        multi-worker run's non-chief workers, which leave the run folder to the chief).

    Raises:
        RunFolderError: If ``run_dir`` holds a run and ``resume`` is False, or the reverse;
            or, on every worker of a multi-worker run, if the workers' run folders, settings
            or cells differ (checked before anything is trained).
        DataLayoutError: If ``data_dir`` is not in the expected layout.
        ValueError: For an unknown strategy or a bad ``TF_CONFIG``
            (:class:`~malaria_classifier.distribute.WorkerLostError` when another worker
            stopped before training).
    """
    started = time.monotonic()
    if isinstance(exclude_cells, str | os.PathLike):
        # A file name would be taken letter by letter and leave nothing out, silently.
        raise ValueError(
            f"exclude_cells takes the digests or paths of the cells themselves, got the "
            f"file name {str(exclude_cells)!r}. Read it first with "
            f"malaria_classifier.splits.read_cell_list({str(exclude_cells)!r})[None] (its "
            f"cells for a list without a fold column)."
        )
    run_dir = Path(run_dir)
    check_output_folder(run_dir, Path(data_dir), "a run folder")
    finished = resume and is_run_finished(run_dir)
    if finished and strategy != "multiworker":
        return _finished_result(run_dir)
    # Then: a multi-worker strategy must configure TensorFlow before anything runs.
    distribution = make_distribution(strategy)
    if resume:
        # A worker that returned alone would leave the others waiting for it for ever.
        _check_workers_agree(distribution, {"finished": int(finished)}, run_dir, resume)
        if finished:
            result = _finished_result(run_dir)
            if distribution.is_chief:
                return result
            return TrainingResult(run_dir, result.model_path, {}, result.seconds)
    # Only the chief writes the run folder; other workers write into a scratch folder
    # (their copy of the model is identical) and read the run folder only to resume.
    write_dir = (
        run_dir if distribution.is_chief else Path(tempfile.mkdtemp(prefix=WORKER_SCRATCH_PREFIX))
    )
    try:
        opened_dir = run_dir if resume else write_dir
        try:
            config, root, rows, state = _open_run(
                Path(data_dir), config, opened_dir, resume, manifest, exclude_cells
            )
        except RunFolderError as error:
            if distribution.is_chief or not resume:
                raise
            raise RunFolderError(f"{error} {WORKER_RESUME_HINT}") from None
        training_rows = _training_rows(rows, opened_dir)
        # Before the chief changes anything: a refused start leaves the run as it was.
        facts = _training_facts(config, training_rows, state)
        _check_workers_agree(distribution, facts, run_dir, resume)
        if resume and distribution.is_chief:
            _retire_stale_results(run_dir)
            publish_best_model(run_dir, state)  # killed after its commit, before the copy
            remove_uncommitted_checkpoints(run_dir, state)
        (write_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        earlier_seconds = float(state.get("seconds", 0.0))
        _fit(distribution, config, root, training_rows, state, run_dir, write_dir, verbose, started)
        if distribution.is_chief:
            # history.json is written after state.json each epoch; a kill between the two
            # would otherwise leave the last epoch out of it for good.
            write_json_atomically(state["history"], run_dir / "history.json")
        # This session's time (data check and split included) plus earlier sessions' epochs.
        training_seconds = earlier_seconds + time.monotonic() - started
        if not distribution.is_chief:
            return TrainingResult(run_dir, run_dir / MODEL_FILE, {}, training_seconds)
    finally:
        if not distribution.is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)
    # The serving copy first: the evaluation then scores with exactly what
    # `malaria predict` runs, and the model is converted once, not twice.
    _write_serving_copy(run_dir / MODEL_FILE)
    by_split = {split: [row for row in rows if row.split == split] for split in SPLITS}
    metrics = evaluate_run(run_dir, root, by_split)
    card = build_model_card(config, run_dir, root, rows, state, metrics, training_seconds)
    card["training"]["cells_left_out"] = len(rows) - len(training_rows)
    card["distribution"] = describe(distribution, config)
    write_json_atomically(card, run_dir / CARD_FILE)
    return TrainingResult(run_dir, run_dir / MODEL_FILE, metrics, training_seconds)


def _training_facts(
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


def _check_workers_agree(
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
    state = _read_state(state_path)
    config = load_config(run_dir / "config.yaml")
    return state["epoch"] >= config.epochs or state["wait"] >= config.early_stopping_patience


def _retire_stale_results(run_dir: Path) -> None:
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


def _finished_result(run_dir: Path) -> TrainingResult:
    """What a finished run produced, read back without touching any of its files.

    Resuming a finished run must not train, re-evaluate or rewrite its card: a card
    extended by ``malaria calibrate`` (threshold, calibration) would lose all of that.
    """
    print(
        f"{run_dir} holds a finished run (model card and metrics written); nothing to "
        f"resume. Its files are unchanged. To train longer, raise epochs in "
        f"{run_dir / 'config.yaml'} and resume; to train anew, choose another --output folder.",
        file=sys.stderr,
    )
    metrics = json.loads((run_dir / METRICS_FILE).read_text(encoding="utf-8"))
    card = json.loads((run_dir / CARD_FILE).read_text(encoding="utf-8"))
    seconds = float(card.get("training", {}).get("seconds", 0.0))
    return TrainingResult(run_dir, run_dir / MODEL_FILE, metrics, seconds)


def _write_serving_copy(model_path: Path) -> None:
    """Write the TensorFlow-free copy that lets `malaria predict` start in a second.

    Optional: without it prediction converts the model in memory, so a conversion
    failure is reported and training still succeeds.
    """
    from malaria_classifier.serving import write_serving_copy

    try:
        write_serving_copy(load_model(str(model_path)), model_path)
    except Exception as error:  # tf2onnx raises many types
        LOGGER.warning(
            "No serving copy written for %s (%s); prediction will convert it.", model_path, error
        )


def _fit(
    distribution: Distribution,
    config: TrainingConfig,
    root: Path,
    rows: list[ManifestRow],
    state: dict[str, Any],
    read_dir: Path,
    write_dir: Path,
    verbose: int | str,
    session_started: float,
) -> None:
    """Run the remaining epochs under the strategy, with global batch and scaled rate."""
    keras.utils.set_random_seed(config.randomness_seed)
    scaled = scale_for_replicas(config, distribution.replicas)
    datasets = make_split_datasets(root, rows, scaled)
    if distribution.workers > 1:
        # Every worker reads the same files in the same seeded order and keeps its
        # share of the batches (there are no separate input files to hand out).
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        datasets = {split: data.with_options(options) for split, data in datasets.items()}
    if state["epoch"] >= config.epochs or state["wait"] >= config.early_stopping_patience:
        return
    with distribution.strategy.scope(), keras_fit_fixes(distribution):
        model = _model_for_run(scaled, read_dir, state)
        model.fit(
            datasets["train"],
            validation_data=datasets["validation"],
            epochs=config.epochs,
            initial_epoch=state["epoch"],
            shuffle=False,  # the tf.data pipeline reshuffles the training split itself
            callbacks=[
                keras.callbacks.LearningRateScheduler(cosine_learning_rate(scaled)),
                RunCheckpoint(write_dir, config.early_stopping_patience, state, session_started),
                keras.callbacks.TensorBoard(log_dir=str(write_dir / "tensorboard")),
            ],
            verbose=_keras_verbosity(verbose),
        )


def _keras_verbosity(verbose: int | str) -> int | str:
    if verbose == "auto":
        return 1 if sys.stdout.isatty() else 2
    return verbose


def _model_for_run(config: TrainingConfig, run_dir: Path, state: dict[str, Any]) -> keras.Model:
    if state["epoch"] > 0:
        name = state.get("checkpoint", LEGACY_CHECKPOINT)
        checkpoint = run_dir / CHECKPOINT_DIR / name
        if not checkpoint.is_file():
            raise RunFolderError(
                f"Cannot resume {run_dir}: its {STATE_FILE} records epoch {state['epoch']} "
                f"but the checkpoint it names, {checkpoint}, is missing. Start a new run "
                f"in another --output folder."
            )
        print(f"Resuming from epoch {state['epoch']} ({checkpoint}).", file=sys.stderr)
        return keras.saving.load_model(checkpoint, compile=True, safe_mode=True)
    return compile_model(
        build_model(config),
        config.learning_rate,
        config.label_smoothing,
        config.loss_drop_fraction,
    )


def evaluate_run(
    run_dir: Path, root: Path, by_split: dict[str, list[ManifestRow]]
) -> dict[str, Any]:
    """Score the best model on validation and test patients; save test figures.

    The test patients' figures and per-patient table go to ``RUN/evaluation/``: a
    cross-validation collects the tables of its folds from there.
    """
    from malaria_classifier.evaluate import PATIENT_TABLE, write_patient_table
    from malaria_classifier.plots import save_figures
    from malaria_classifier.prediction import Predictor

    predictor = Predictor(run_dir / MODEL_FILE)
    metrics: dict[str, Any] = {}
    for split in ("validation", "test"):
        split_rows = by_split[split]
        predictions = list(predictor.predict_paths([root / row.path for row in split_rows]))
        y_true = np.array([CLASS_NAMES.index(row.label) for row in split_rows])
        y_score = np.array([row.probability for row in predictions])
        groups = [row.patient for row in split_rows]
        metrics[split] = summarize(y_true, y_score, groups, split, predictor.threshold)
        if split == "test":
            output_dir = run_dir / "evaluation"
            output_dir.mkdir(exist_ok=True)
            save_figures(
                output_dir,
                metrics[split]["confusion_matrix"]["counts"],
                roc_points(y_true, y_score),
                metrics[split]["metrics"]["roc_auc"]["value"],
                split,
                predictor.threshold,
            )
            write_patient_table(
                per_patient_table(y_true, y_score, groups, predictor.threshold, split),
                output_dir / PATIENT_TABLE,
            )
    write_json_atomically(metrics, run_dir / METRICS_FILE)
    return metrics


def build_model_card(
    config: TrainingConfig,
    run_dir: Path,
    root: Path,
    rows: list[ManifestRow],
    state: dict[str, Any],
    metrics: dict[str, Any],
    training_seconds: float,
) -> dict[str, Any]:
    """The JSON model card: data, split, config, metrics with CIs, versions, date."""
    model = keras.saving.load_model(run_dir / MODEL_FILE, compile=False, safe_mode=True)
    patients = {
        split: sorted({row.patient for row in rows if row.split == split}) for split in SPLITS
    }
    return {
        "model": MODEL_FILE,
        # Which model.keras this card describes: a resumed run compares it.
        "model_sha256": sha256_of_file(run_dir / MODEL_FILE),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "Classify a single red-blood-cell crop from a Giemsa-stained thin blood smear.",
        "class_order": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "probability": f"softmax output {CLASS_NAMES.index(POSITIVE_CLASS)} = P({POSITIVE_CLASS})",
        "decision_threshold": DEFAULT_THRESHOLD,
        "input": {
            "shape": [config.image_size, config.image_size, 3],
            "dtype": "uint8",
            "pixels": "raw RGB 0-255; normalization is inside the model",
            "resize": "longer side scaled to image_size (antialiased bilinear), padded with black",
        },
        "weights": {"parameters": int(model.count_params()), "bytes": count_weight_bytes(model)},
        "data": {
            "folder": str(root),
            "cells": {label: sum(row.label == label for row in rows) for label in CLASS_NAMES},
            "patients": len({row.patient for row in rows}),
        },
        "split": {
            "unit": "patient",
            "seed": config.seed,
            "fractions": {
                "train": round(1 - config.validation_fraction - config.test_fraction, 4),
                "validation": config.validation_fraction,
                "test": config.test_fraction,
            },
            "summary": split_summary(rows),
            "patients": patients,
        },
        "config": config.to_dict(),
        "training": {
            "epochs_run": state["epoch"],
            "best_epoch": state["best_epoch"],
            "best_val_loss": state["best_val_loss"],
            "seconds": round(training_seconds, 1),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        },
        "metrics": metrics,
        "versions": {
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
            "python": platform.python_version(),
        },
    }


def make_split_datasets(
    root: Path, rows: list[ManifestRow], config: TrainingConfig
) -> dict[str, Any]:
    """The training (augmented) and validation datasets of a manifest's rows."""
    return {
        split: make_dataset(
            [root / row.path for row in rows if row.split == split],
            [row.label for row in rows if row.split == split],
            config,
            training=split == "train",
        )
        for split in ("train", "validation")
    }
