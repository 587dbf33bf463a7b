"""Hyper-parameter search with Optuna, scored on validation patients only.

Every trial trains on the training patients of the usual patient-level split (the
config's seed) and is scored by its best validation-patient ROC AUC; test patients
are never loaded, so the test figures of a model trained with the chosen recipe stay
honest. Trials report their validation AUC after every epoch, and a median pruner
stops those that trail the trials before them. The study lives in an SQL database
(SQLite by default), so a killed search continues with every finished trial kept.

The best trial's recipe is written as ``best_config.yaml``, which ``malaria train
--config`` accepts, with Optuna's Plotly figures of the search beside it.

This module runs the search and writes its outputs; what a trial may choose is in
:mod:`malaria_classifier.search_space`, how it is scored in
:mod:`malaria_classifier.trial_objective`, and how the study is kept and resumed in
:mod:`malaria_classifier.study_storage`.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from malaria_classifier import trial_objective
from malaria_classifier.config import TrainingConfig, save_config
from malaria_classifier.data import DatasetReport, check_dataset
from malaria_classifier.model_card import write_json_atomically
from malaria_classifier.outputs import (
    check_output_folder,
    missing_folders,
    open_output,
    remove_empty_folders,
    written_in_full,
)
from malaria_classifier.search_space import SearchSpace, params_to_settings, suggest_config
from malaria_classifier.splits import (
    ManifestRow,
    build_manifest,
    check_no_leakage,
    split_by_patient,
    write_manifest,
)
from malaria_classifier.study_storage import (
    SEED_VALUES,
    SEEDS_PER_TRIAL,
    STUDY_FILE,
    best_trial_or_none,
    check_data_fingerprint,
    check_fixed_settings,
    check_seeds_per_trial,
    count_finished_trials,
    open_study,
    sqlite_url,
)

BEST_CONFIG_FILE = "best_config.yaml"
FIGURES_DIR = "figures"


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
        check_seeds_per_trial(study, seeds_per_trial)
        check_fixed_settings(study, base, space)
        done = count_finished_trials(study)
        if done < trials:
            data = data or _read_and_split(data_dir, base, progress)
            check_data_fingerprint(study, data[0], data_dir)
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
            return trial_objective.score_trial(config, root, rows, trial, seeds_per_trial)

        study.optimize(
            objective,
            n_trials=trials - done,
            timeout=timeout,
            callbacks=[_progress_printer(trials, started)] if progress else None,
            gc_after_trial=True,
        )
    return write_outputs(study, base, space, output_dir)


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
        finished = count_finished_trials(study)
        if trial.state == optuna.trial.TrialState.PRUNED:
            what = f"pruned after epoch {max(trial.intermediate_values, default=0)}"
        elif trial.state == optuna.trial.TrialState.COMPLETE:
            what = f"validation AUC {trial.value:.4f}"
            by_seed = trial.user_attrs.get(SEED_VALUES, [])
            if len(by_seed) > 1:
                what += f" (mean of seeds: {', '.join(f'{value:.4f}' for value in by_seed)})"
        else:
            what = f"{trial.state.name.lower()}"
        best = best_trial_or_none(study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best else "no best yet"
        print(
            f"Trial {trial.number}: {what}; {finished}/{trials} finished, {best_text}, "
            f"{minutes:.1f} min",
            file=sys.stderr,
            flush=True,
        )

    return report


def write_outputs(
    study: Any, base: TrainingConfig, space: SearchSpace, output_dir: Path
) -> TuningResult:
    """``best_config.yaml``, ``best_trial.json``, ``trials.csv`` and the figures."""
    best = best_trial_or_none(study)
    if best is None:
        raise ValueError(
            f"No trial of study {study.study_name!r} has completed (all failed or were "
            f"pruned). Run more --trials, or check the data with `malaria data check`."
        )
    config = base.replace(**params_to_settings(best.params))
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
            "finished_trials": count_finished_trials(study),
            "search_space": asdict(space),
        },
        output_dir / "best_trial.json",
    )
    write_trials_csv(study, output_dir / "trials.csv")
    figures = save_figures(study, output_dir / FIGURES_DIR)
    return TuningResult(
        output_dir, best_path, best.value, best.number, count_finished_trials(study), figures
    )


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
