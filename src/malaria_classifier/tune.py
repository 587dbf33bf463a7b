"""Hyper-parameter search with Optuna, scored on validation patients only.

Every trial trains on the training patients of the usual patient-level split (the
config's seed) and is scored by its best validation-patient ROC AUC; test patients
are never loaded, so the test figures of a model trained with the chosen recipe stay
honest. Trials report their validation AUC after every epoch, and a median pruner
stops those that trail the trials before them. The study lives in an SQL database
(SQLite by default), so a killed search continues with every finished trial kept.

The best trial's recipe is written as ``best_config.yaml``, which ``malaria train
--config`` accepts, with Optuna's Plotly figures of the search beside it.
"""

from __future__ import annotations

import csv
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras

from malaria_classifier.config import TrainingConfig, save_config
from malaria_classifier.data import DatasetReport, check_dataset
from malaria_classifier.model import build_model, compile_model
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.outputs import (
    check_output_folder,
    missing_folders,
    open_output,
    remove_empty_folders,
    written_in_full,
)
from malaria_classifier.splits import (
    ManifestRow,
    build_manifest,
    check_no_leakage,
    split_by_patient,
    write_manifest,
)
from malaria_classifier.training import cosine_learning_rate, make_split_datasets

BEST_CONFIG_FILE = "best_config.yaml"
SEED_VALUES = "validation_auc_by_seed"  # trial attribute: each seed's best AUC
SEEDS_PER_TRIAL = "seeds_per_trial"  # study attribute: the seeds every trial is scored on
# Study attribute: the settings not searched and the epoch budget, as the study began.
FIXED_SETTINGS = "fixed_settings"
# Study attribute: which images (relative path and content) the study's trials use.
DATA_FINGERPRINT = "data_fingerprint"
STUDY_FILE = "study.db"  # the default SQLite storage, in the output folder
FIGURES_DIR = "figures"
# Augmentation at strength 1.0: the robustness recipe of docs/benchmarks.md section 9.
# A trial's strength scales every range and probability (probabilities capped at 1).
AUGMENTATION_AT_STRENGTH_ONE: dict[str, float] = {
    "zoom_range": 0.15,
    "shift_range": 0.05,
    "brightness_delta": 0.1,
    "contrast_range": 0.2,
    "saturation_range": 0.4,
    "hue_delta": 0.04,
    "channel_gain_range": 0.12,
    "low_resolution_probability": 0.3,
    "blur_probability": 0.2,
    "background_probability": 0.3,
}


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose. Defaults suit the NIH cells on a CPU.

    Attributes:
        image_sizes: Model input sides to try (px).
        base_filters: Widths of the first conv block to try.
        conv_blocks: Smallest and largest depth (capped so the input is at least
            ``2**blocks`` px).
        convs_per_block: Smallest and largest number of convolutions per block.
        residual_separable_blocks: Smallest and largest number of last blocks given a
            depthwise-separable residual layer (capped at the trial's depth).
        dense_units: Widths of the dense layer to try.
        colour_normalizations: Input scalings to try (see ``TrainingConfig``).
        batch_sizes: Batch sizes to try.
        learning_rate: Range of Adam's initial rate (searched on a log scale).
        dropout_rate: Range of the dropout rate.
        label_smoothing: Range of label smoothing.
        max_epochs: Budget: a trial chooses its cosine-schedule length up to this, and
            early stopping (the config's patience) may end it sooner.
        augmentation_strength: Range of the factor on AUGMENTATION_AT_STRENGTH_ONE.
    """

    image_sizes: tuple[int, ...] = (48, 64, 80, 96)
    base_filters: tuple[int, ...] = (8, 12, 16, 24)
    conv_blocks: tuple[int, int] = (3, 5)
    convs_per_block: tuple[int, int] = (1, 2)
    residual_separable_blocks: tuple[int, int] = (0, 2)
    dense_units: tuple[int, ...] = (32, 64, 128)
    colour_normalizations: tuple[str, ...] = ("fixed", "per_cell")
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    learning_rate: tuple[float, float] = (3e-4, 3e-3)
    dropout_rate: tuple[float, float] = (0.0, 0.5)
    label_smoothing: tuple[float, float] = (0.0, 0.1)
    max_epochs: int = 20
    augmentation_strength: tuple[float, float] = (0.0, 1.5)


def suggest_config(trial: Any, base: TrainingConfig, space: SearchSpace) -> TrainingConfig:
    """The recipe of one trial: ``base`` with the searched settings drawn by ``trial``."""
    image_size = trial.suggest_categorical("image_size", list(space.image_sizes))
    deepest = min(space.conv_blocks[1], int(math.log2(image_size)))
    strength = trial.suggest_float("augmentation_strength", *space.augmentation_strength)
    conv_blocks = trial.suggest_int("conv_blocks", space.conv_blocks[0], deepest)
    changes: dict[str, Any] = {
        "image_size": image_size,
        "base_filters": trial.suggest_categorical("base_filters", list(space.base_filters)),
        "conv_blocks": conv_blocks,
        "convs_per_block": trial.suggest_int("convs_per_block", *space.convs_per_block),
        "residual_separable_blocks": trial.suggest_int(
            "residual_separable_blocks",
            min(space.residual_separable_blocks[0], conv_blocks),
            min(space.residual_separable_blocks[1], conv_blocks),
        ),
        "dense_units": trial.suggest_categorical("dense_units", list(space.dense_units)),
        "colour_normalization": trial.suggest_categorical(
            "colour_normalization", list(space.colour_normalizations)
        ),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "dropout_rate": trial.suggest_float("dropout_rate", *space.dropout_rate),
        "label_smoothing": trial.suggest_float("label_smoothing", *space.label_smoothing),
        "epochs": trial.suggest_int("epochs", max(1, space.max_epochs // 3), space.max_epochs),
        "augment": True,
    }
    changes.update(scaled_augmentation(strength))
    return base.replace(**changes)


def scaled_augmentation(strength: float) -> dict[str, float]:
    """Augmentation settings at ``strength`` x AUGMENTATION_AT_STRENGTH_ONE."""
    return {
        name: min(1.0, value * strength) if name.endswith("probability") else value * strength
        for name, value in AUGMENTATION_AT_STRENGTH_ONE.items()
    }


class BestValidationAuc(keras.callbacks.Callback):
    """Keep the best validation AUC over the epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.best = -math.inf
        self.last = math.nan

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        self.last = float((logs or {}).get("val_auc", math.nan))
        if math.isfinite(self.last):
            self.best = max(self.best, self.last)


class ReportToTrial(BestValidationAuc):
    """Also report validation AUC to Optuna after each epoch; stop the trial if pruned."""

    def __init__(self, trial: Any) -> None:
        super().__init__()
        self.trial = trial

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        import optuna

        super().on_epoch_end(epoch, logs)
        self.trial.report(self.last, step=epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation AUC {self.last:.4f} at epoch {epoch + 1}")


def seed_configs(config: TrainingConfig, seeds: int) -> list[TrainingConfig]:
    """The recipe once per training seed: the config's own, then the next ``seeds - 1``.

    Only weights, shuffling and augmentation change (``training_seed``); the split
    stays the one of ``config.seed``, so every run is scored on the same patients.
    """
    first = config.randomness_seed
    return [config] + [config.replace(training_seed=first + k) for k in range(1, seeds)]


def score_trial(
    config: TrainingConfig, root: Path, rows: list[ManifestRow], trial: Any, seeds: int = 1
) -> float:
    """Train a trial's recipe with ``seeds`` training seeds; return the mean best AUC.

    One training cannot tell recipes apart whose difference is smaller than the
    spread between seeds (docs/benchmarks.md 9.2 and 9.9: 0.002-0.005 AUC on the
    same patients), so the objective can average several. The first seed's epochs are
    reported to the pruner; a trial it prunes trains no further seeds. Each seed's
    best AUC is kept in the trial's ``validation_auc_by_seed`` attribute.
    """
    values: list[float] = []
    for index, seed_config in enumerate(seed_configs(config, seeds)):
        values.append(train_trial(seed_config, root, rows, trial, report=index == 0))
        trial.set_user_attr(SEED_VALUES, values)
    return sum(values) / len(values)


def train_trial(
    config: TrainingConfig, root: Path, rows: list[ManifestRow], trial: Any, report: bool = True
) -> float:
    """Train one trial's recipe; return its best validation AUC (test never loaded).

    With ``report`` False the epochs are not reported to Optuna (a trial reports each
    epoch once), so this training cannot be pruned.
    """
    keras.utils.set_random_seed(config.randomness_seed)
    datasets = make_split_datasets(root, rows, config)
    model = compile_model(
        build_model(config), config.learning_rate, config.label_smoothing, config.loss_drop_fraction
    )
    reporter = ReportToTrial(trial) if report else BestValidationAuc()
    try:
        model.fit(
            datasets["train"],
            validation_data=datasets["validation"],
            epochs=config.epochs,
            shuffle=False,
            callbacks=[
                keras.callbacks.LearningRateScheduler(cosine_learning_rate(config)),
                keras.callbacks.EarlyStopping(
                    "val_auc", mode="max", patience=config.early_stopping_patience
                ),
                reporter,
            ],
            verbose=0,
        )
    finally:
        # Free the graph and weights even when the trial is pruned (an exception).
        keras.backend.clear_session()
    return reporter.best


@dataclass
class TuningResult:
    """Where the search left its files and what it found."""

    output_dir: Path
    best_config_path: Path
    best_value: float
    best_trial: int
    finished_trials: int
    figures: list[Path]


def tune(
    data_dir: str | Path,
    trials: int,
    output_dir: str | Path,
    base: TrainingConfig | None = None,
    storage: str | None = None,
    study_name: str = "malaria",
    timeout: float | None = None,
    space: SearchSpace | None = None,
    progress: bool = True,
    seeds_per_trial: int = 1,
) -> TuningResult:
    """Run (or continue) a search until ``trials`` trials have finished.

    Example:
        >>> result = tune("cell_images", trials=20, output_dir="runs/tune")  # doctest: +SKIP
        >>> result.best_config_path  # doctest: +SKIP
        PosixPath('runs/tune/best_config.yaml')

    Args:
        data_dir: A folder in the NIH layout.
        trials: Finished (completed or pruned) trials wanted in the study in all; a
            resumed search runs only the missing ones, with new parameters. A trial
            stopped by Ctrl+C is marked failed (Optuna's rule for an exception in the
            objective) and does not count: the resumed search draws a new trial in its
            place. One whose process was killed is retried with its parameters (see
            :func:`open_study`).
        output_dir: Where the manifest, best config, trial table and figures go.
        base: Settings not searched (split fractions, seed, patience); defaults if None.
        storage: Optuna storage URL; default the SQLite file ``OUTPUT/study.db``
            (see :func:`sqlite_url`).
        study_name: Name of the study within the storage.
        timeout: Stop starting new trials after this many seconds (None: no limit).
        space: The search space; :class:`SearchSpace` defaults if None.
        progress: Print a line per finished trial.
        seeds_per_trial: Train each recipe with this many training seeds (same
            patients) and score the mean of their best validation AUCs: slower by that
            factor, but able to tell apart recipes that one seed's noise would hide.
            A study keeps the number it started with.

    Returns:
        A :class:`TuningResult`.

    Raises:
        ValueError: If ``trials`` or ``seeds_per_trial`` is below 1, a resumed study
            was scored with another ``seeds_per_trial``, other fixed settings or other
            data, or no trial has completed (e.g. every trial failed or was pruned):
            the message says what to change. A refusal before the first trial leaves
            no output folder that did not exist before.
    """
    if trials < 1:
        raise ValueError(f"--trials must be at least 1, got {trials}.")
    if seeds_per_trial < 1:
        raise ValueError(f"--seeds-per-trial must be at least 1, got {seeds_per_trial}.")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"--timeout must be a positive number of seconds, got {timeout}.")
    base = base or TrainingConfig()
    space = space or SearchSpace()
    if space.max_epochs < 1:
        raise ValueError(f"--max-epochs must be at least 1, got {space.max_epochs}.")
    output_dir = Path(output_dir)
    check_output_folder(output_dir, Path(data_dir), "the study's outputs")
    default_file = output_dir / STUDY_FILE
    created = missing_folders(output_dir)
    data: tuple[DatasetReport, list[ManifestRow]] | None = None
    try:
        if storage is None and not default_file.exists():
            # A new study reads the data anyway: reading them before the study file is
            # created leaves nothing behind when they are refused.
            data = _read_and_split(data_dir, base, progress)
        output_dir.mkdir(parents=True, exist_ok=True)
        study = open_study(storage or sqlite_url(default_file), study_name, base.seed)
        _check_seeds_per_trial(study, seeds_per_trial)
        _check_fixed_settings(study, base, space)
        done = _finished(study)
        if done < trials:
            data = data or _read_and_split(data_dir, base, progress)
            _check_data_fingerprint(study, data[0], data_dir)
    except BaseException:
        # A refused (or interrupted) start leaves no empty folder of ours behind.
        remove_empty_folders(created)
        raise
    if data is not None and done < trials:
        report, manifest = data
        write_manifest(manifest, output_dir / "manifest.csv")
        # Test patients are dropped here so no trial can ever score them.
        root, rows = report.root, [row for row in manifest if row.split != "test"]
        started = time.monotonic()

        def objective(trial: Any) -> float:
            config = suggest_config(trial, base, space)
            return score_trial(config, root, rows, trial, seeds_per_trial)

        study.optimize(
            objective,
            n_trials=trials - done,
            timeout=timeout,
            callbacks=[_progress_printer(trials, started)] if progress else None,
            gc_after_trial=True,
        )
    return write_outputs(study, base, space, output_dir)


def _check_seeds_per_trial(study: Any, seeds_per_trial: int) -> None:
    """Record the study's seeds per trial, or refuse to mix objectives in one study."""
    recorded = study.user_attrs.get(SEEDS_PER_TRIAL)
    if recorded is None:
        if study.get_trials(deepcopy=False):  # a study from before the setting: one seed
            recorded = 1
        else:
            study.set_user_attr(SEEDS_PER_TRIAL, seeds_per_trial)
            return
    if recorded != seeds_per_trial:
        raise ValueError(
            f"Study {study.study_name!r} scores each trial on {recorded} training seed(s), "
            f"not {seeds_per_trial}: their values cannot be compared. Pass "
            f"--seeds-per-trial {recorded} to continue it, or a new --study-name or --output."
        )


def _check_fixed_settings(study: Any, base: TrainingConfig, space: SearchSpace) -> None:
    """Record what the study holds fixed, or refuse to resume it with other settings.

    Trials run on another split seed, other split shares or another epoch budget score
    other patients or another search, so one study must not mix them.
    """
    fixed = {"config": base.to_dict(), "max_epochs": space.max_epochs}
    recorded = study.user_attrs.get(FIXED_SETTINGS)
    if recorded is None:  # a new study (or one from before the record was kept)
        study.set_user_attr(FIXED_SETTINGS, fixed)
        return
    if recorded == fixed:
        return
    changed = sorted(
        name
        for name in set(recorded["config"]) | set(fixed["config"])
        if recorded["config"].get(name) != fixed["config"].get(name)
    )
    if recorded["max_epochs"] != fixed["max_epochs"]:
        changed.append(f"--max-epochs (was {recorded['max_epochs']})")
    raise ValueError(
        f"Study {study.study_name!r} was started with other fixed settings "
        f"({', '.join(changed)}); its trials could not be compared with new ones. Resume it "
        f"with the --config and --max-epochs it started with, or pass a new --study-name "
        f"or --output."
    )


def _check_data_fingerprint(study: Any, report: DatasetReport, data_dir: str | Path) -> None:
    """Record the data a study's trials use, or refuse to resume it on other data.

    Trials scored on other images score other patients, so their values cannot be
    compared. A study without trials (new, or whose first start was refused) and one
    from before the record was kept record the data they now get.
    """
    current = {
        "sha256": report.fingerprint(),
        "images": len(report.records),
        "folder": str(report.root),
    }
    recorded = study.user_attrs.get(DATA_FINGERPRINT)
    if recorded is None or not study.get_trials(deepcopy=False):
        study.set_user_attr(DATA_FINGERPRINT, current)
        return
    if recorded["sha256"] == current["sha256"]:
        return
    raise ValueError(
        f"Study {study.study_name!r} was scored on other data: its trials used the "
        f"{recorded['images']} images of {recorded['folder']} as they were then, and "
        f"--data {data_dir} ({current['images']} images) differs from them, so new trials "
        f"would score other patients. Pass the --data it started with to continue it, "
        f"or a new --study-name or --output for a study on these data."
    )


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite database file ``path``, whatever its characters.

    Pasted into ``sqlite:///...`` as they are, a ``?`` would start URL options, ``#``
    is a fragment and ``%20`` is decoded to a space, so the study would be kept
    elsewhere or not opened; SQLAlchemy escapes them and decodes them back.
    """
    from sqlalchemy.engine import URL

    return URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


def open_study(storage: str, study_name: str, seed: int) -> Any:
    """Create or load the study: TPE sampler, median pruner, heartbeats in the database.

    A trial whose process was killed stops beating; after the grace period the next
    session marks it failed and queues its parameters again, so nothing is lost but
    the killed trial's partial epochs.

    The sampler is seeded with ``seed`` plus the number of trials the study already
    holds: a new study draws exactly what ``seed`` alone gives, and a resumed one
    does not replay the first session's random start-up parameters.
    """
    import optuna
    import sqlalchemy.exc

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        # Heartbeats have been "experimental" since Optuna 2.8; the warning is noise.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            rdb = optuna.storages.RDBStorage(
                storage,
                heartbeat_interval=60,
                grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            )
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ValueError(
                f"--storage {storage!r} could not be opened ({reason}). Give a database URL "
                f"such as sqlite:///runs/tune/study.db whose folder exists, or leave "
                f"--storage out to keep the study in the --output folder."
            ) from None
    study = optuna.create_study(
        storage=rdb,
        study_name=study_name,
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
        load_if_exists=True,
    )
    earlier = len(study.get_trials(deepcopy=False))
    # NumPy seeds are below 2**32 (a config's seed may be 2**32 - 1).
    study.sampler = optuna.samplers.TPESampler(seed=(seed + earlier) % 2**32, n_startup_trials=5)
    return study


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _read_and_split(
    data_dir: str | Path, base: TrainingConfig, progress: bool
) -> tuple[DatasetReport, list[ManifestRow]]:
    """The data's report and its usual patient split (same seed as training), as the
    rows of ``manifest.csv``: test patients included, for the record."""
    report = check_dataset(data_dir, progress=progress)
    splits = split_by_patient(
        report.records, report.hashes, base.validation_fraction, base.test_fraction, base.seed
    )
    rows = build_manifest(report.records, report.hashes, splits, report.root)
    check_no_leakage(rows)
    return report, rows


def _progress_printer(trials: int, started: float):
    def report(study: Any, trial: Any) -> None:
        import optuna

        minutes = (time.monotonic() - started) / 60
        finished = _finished(study)
        if trial.state == optuna.trial.TrialState.PRUNED:
            what = f"pruned after epoch {max(trial.intermediate_values, default=0)}"
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            what = f"validation AUC {trial.value:.4f}"
            by_seed = trial.user_attrs.get(SEED_VALUES, [])
            if len(by_seed) > 1:
                what += f" (mean of seeds: {', '.join(f'{value:.4f}' for value in by_seed)})"
        else:
            what = f"{trial.state.name.lower()}"
        best = _best_or_none(study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no best yet"
        print(
            f"Trial {trial.number}: {what}; {finished}/{trials} finished, {best_text}, "
            f"{minutes:.1f} min",
            file=sys.stderr,
            flush=True,
        )

    return report


def _best_or_none(study: Any) -> Any:
    try:
        return study.best_trial
    except ValueError:  # no completed trial yet
        return None


def write_outputs(
    study: Any, base: TrainingConfig, space: SearchSpace, output_dir: Path
) -> TuningResult:
    """``best_config.yaml``, ``best_trial.json``, ``trials.csv`` and the figures."""
    best = _best_or_none(study)
    if best is None:
        raise ValueError(
            f"No trial of study {study.study_name!r} has completed (all failed or were "
            f"pruned). Run more --trials, or check the data with `malaria data check`."
        )
    config = base.replace(**_params_to_settings(best.params))
    best_path = output_dir / BEST_CONFIG_FILE
    save_config(config, best_path)
    write_json_atomically(
        {
            "trial": best.number,
            "objective": "best validation-patient ROC AUC over epochs (Keras AUC), "
            "mean over the training seeds",
            "seeds_per_trial": study.user_attrs.get(SEEDS_PER_TRIAL, 1),
            "value": best.value,
            "value_by_seed": best.user_attrs.get(SEED_VALUES, [best.value]),
            "params": best.params,
            "finished_trials": _finished(study),
            "search_space": asdict(space),
        },
        output_dir / "best_trial.json",
    )
    write_trials_csv(study, output_dir / "trials.csv")
    figures = save_figures(study, output_dir / FIGURES_DIR)
    return TuningResult(output_dir, best_path, best.value, best.number, _finished(study), figures)


def write_trials_csv(study: Any, path: Path) -> None:
    """One row per trial: number, state, value (and per seed), last epoch, parameters."""
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    with open_output(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["number", "state", "value", "validation_auc_by_seed", "last_epoch", "seconds", *names]
        )
        for trial in trials:
            seconds = (
                (trial.datetime_complete - trial.datetime_start).total_seconds()
                if trial.datetime_complete and trial.datetime_start
                else ""
            )
            writer.writerow(
                [
                    trial.number,
                    trial.state.name,
                    "" if trial.value is None else trial.value,
                    " ".join(f"{value:.6f}" for value in trial.user_attrs.get(SEED_VALUES, [])),
                    max(trial.intermediate_values, default=""),
                    seconds,
                    *(trial.params.get(name, "") for name in names),
                ]
            )


def _params_to_settings(params: dict[str, Any]) -> dict[str, Any]:
    settings = {key: value for key, value in params.items() if key != "augmentation_strength"}
    settings.update(scaled_augmentation(params.get("augmentation_strength", 1.0)))
    settings["augment"] = True
    return settings


def save_figures(study: Any, folder: Path) -> list[Path]:
    """Optuna's Plotly figures as JSON (for the dashboard) and HTML (for a browser).

    The HTML files share one ``plotly.min.js`` in the folder, so they open offline.
    A figure Optuna cannot draw yet (e.g. parameter importances before two trials
    completed) is skipped with a note.
    """
    from optuna import visualization

    folder.mkdir(parents=True, exist_ok=True)
    makers = {
        "optimization_history": visualization.plot_optimization_history,
        "intermediate_values": visualization.plot_intermediate_values,
        "param_importances": visualization.plot_param_importances,
        "parallel_coordinate": visualization.plot_parallel_coordinate,
        "slice": visualization.plot_slice,
    }
    import optuna

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(completed) < 2:  # Optuna would draw every parameter as equally important
        del makers["param_importances"]
        print("Figure param_importances skipped: needs two completed trials.", file=sys.stderr)
    written: list[Path] = []
    for name, make in makers.items():
        try:
            figure = make(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as error:
            print(f"Figure {name} skipped: {error}", file=sys.stderr)
            continue
        with open_output(folder / f"{name}.json") as handle:
            handle.write(figure.to_json())
        with written_in_full(folder / f"{name}.html") as temporary:
            figure.write_html(temporary, include_plotlyjs="directory")
        written.extend([folder / f"{name}.json", folder / f"{name}.html"])
    return written
