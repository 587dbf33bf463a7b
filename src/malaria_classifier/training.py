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

This module runs a training; the run folder is opened in :mod:`~malaria_classifier.run_folder`,
checkpointed in :mod:`~malaria_classifier.checkpoints` and reported on in
:mod:`~malaria_classifier.run_report`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from malaria_classifier.checkpoints import (
    CHECKPOINT_DIR,
    LEGACY_CHECKPOINT,
    STATE_FILE,
    RunCheckpoint,
    publish_best_model,
    remove_uncommitted_checkpoints,
)
from malaria_classifier.config import TrainingConfig
from malaria_classifier.distribute import (
    Distribution,
    describe,
    keras_fit_fixes,
    make_distribution,
    scale_for_replicas,
)
from malaria_classifier.model import build_model, compile_model
from malaria_classifier.model_card import CARD_FILE, MODEL_FILE, write_json_atomically
from malaria_classifier.outputs import check_output_folder
from malaria_classifier.pipeline import make_dataset
from malaria_classifier.run_folder import (
    WORKER_RESUME_HINT,
    RunFolderError,
    check_workers_agree,
    drop_left_out_cells,
    is_run_finished,
    open_run,
    retire_stale_results,
    training_facts,
)
from malaria_classifier.run_report import (
    METRICS_FILE,
    build_model_card,
    evaluate_run,
    write_serving_copy_or_warn,
)
from malaria_classifier.splits import SPLITS, ManifestRow

# Where a multi-worker run's other workers write (in the temporary folder; removed at
# the end, left behind only by a killed worker).
WORKER_SCRATCH_PREFIX = "malaria-worker-"


@dataclass
class TrainingResult:
    """What a finished training run produced."""

    run_dir: Path
    model_path: Path
    metrics: dict[str, Any]
    seconds: float


def cosine_learning_rate(config: TrainingConfig):
    """Learning rate by epoch (a pure function of the epoch, so resuming is exact)."""

    def schedule(epoch: int, _current: float) -> float:
        return 0.5 * config.learning_rate * (1 + math.cos(math.pi * epoch / config.epochs))

    return schedule


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
        check_workers_agree(distribution, {"finished": int(finished)}, run_dir, resume)
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
            config, root, rows, state = open_run(
                Path(data_dir), config, opened_dir, resume, manifest, exclude_cells
            )
        except RunFolderError as error:
            if distribution.is_chief or not resume:
                raise
            raise RunFolderError(f"{error} {WORKER_RESUME_HINT}") from None
        training_rows = drop_left_out_cells(rows, opened_dir)
        # Before the chief changes anything: a refused start leaves the run as it was.
        facts = training_facts(config, training_rows, state)
        check_workers_agree(distribution, facts, run_dir, resume)
        if resume and distribution.is_chief:
            retire_stale_results(run_dir)
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
    write_serving_copy_or_warn(run_dir / MODEL_FILE)
    by_split = {split: [row for row in rows if row.split == split] for split in SPLITS}
    metrics = evaluate_run(run_dir, root, by_split)
    card = build_model_card(config, run_dir, root, rows, state, metrics, training_seconds)
    card["training"]["cells_left_out"] = len(rows) - len(training_rows)
    card["distribution"] = describe(distribution, config)
    write_json_atomically(card, run_dir / CARD_FILE)
    return TrainingResult(run_dir, run_dir / MODEL_FILE, metrics, training_seconds)


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
