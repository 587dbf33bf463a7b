"""``malaria train``, ``malaria cv`` and ``malaria tune``: the long jobs that make models.

Each says on Ctrl+C how to continue, since all three keep their finished work.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from malaria_classifier.cli._common import _echo_metrics, _on_interrupt, _user_errors

if TYPE_CHECKING:
    from malaria_classifier.training import TrainingResult


@_user_errors
def train(
    data: Annotated[Path, typer.Option("--data", help="NIH-layout training data folder.")],
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Run folder (default runs/<time>).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --output.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override: maximum epochs.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Override: batch size.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Override: Adam rate.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override: input side (px).")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Override: seed of the split (and of training).")
    ] = None,
    training_seed: Annotated[
        int | None,
        typer.Option(help="Override: seed of weights, shuffling, augmentation only (same split)."),
    ] = None,
    strategy: Annotated[
        str,
        typer.Option(
            help="none, mirrored (all GPUs of this machine) or multiworker (machines listed "
            "in TF_CONFIG; docs/distributed.md). Batch size and learning rate are per "
            "replica and scale with the number of replicas."
        ),
    ] = "none",
    exclude_cells: Annotated[
        Path | None,
        typer.Option(
            "--exclude-cells",
            help="CSV of training cells to leave out (column sha256 or path, as in "
            "manifest.csv), e.g. suspected label errors. Validation and test cells are "
            "never left out.",
        ),
    ] = None,
) -> None:
    """Train a CNN with a patient-level split; writes a complete run folder."""
    from malaria_classifier.config import load_config
    from malaria_classifier.distribute import check_strategy
    from malaria_classifier.training import train_model

    check_strategy(strategy)
    if resume and output is None:
        raise ValueError("--resume needs --output: the run folder to continue.")
    overrides = (config, epochs, batch_size, learning_rate, image_size, seed, training_seed)
    overrides += (exclude_cells,)  # a resumed run leaves out the cells it started with
    if resume and any(value is not None for value in overrides):
        typer.echo(
            f"Note: --resume continues with {output}/config.yaml; other settings are ignored.",
            err=True,
        )
    run_dir = output or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = load_config(
        config,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        image_size=image_size,
        seed=seed,
        training_seed=training_seed,
    )
    cells = _cells_to_leave_out(exclude_cells) if not resume else set()
    with _on_interrupt(
        f"Finished epochs are kept in {run_dir}; continue with: malaria train --data {data} "
        f"--output {run_dir} --resume"
    ):
        result = train_model(
            data, settings, run_dir, resume=resume, strategy=strategy, exclude_cells=cells
        )
    _echo_training_result(result, run_dir)


def _cells_to_leave_out(exclude_cells: Path | None) -> set[str]:
    """The training cells ``--exclude-cells`` lists (none without it).

    A list made per cross-validation fold is refused rather than merged: its folds'
    training sets differ from this run's, so its cells would be left out of the wrong run.

    Raises:
        ValueError: When the list has a ``fold`` column.
    """
    from malaria_classifier.splits import read_cell_list

    if exclude_cells is None:
        return set()
    by_fold = read_cell_list(exclude_cells)
    if set(by_fold) - {None}:
        raise ValueError(
            f"{exclude_cells} gives cells per cross-validation fold (column fold); "
            f"`malaria train` has one split. Use it with `malaria cv`, or drop the "
            f"fold column."
        )
    return by_fold.get(None, set())


def _echo_training_result(result: TrainingResult, run_dir: Path) -> None:
    """Print where the model is and its test metrics (only the chief has metrics)."""
    if not result.metrics:  # a non-chief worker of a multi-worker run
        typer.echo(f"Worker done ({result.seconds / 60:.1f} min); the chief wrote {run_dir}.")
        return
    test = result.metrics["test"]
    typer.echo(f"Model: {result.model_path} ({result.seconds / 60:.1f} min)")
    _echo_metrics(test)


@_user_errors
def cross_validation(
    data: Annotated[Path, typer.Option("--data", help="NIH-layout data folder.")],
    folds: Annotated[int, typer.Option(help="Number of patient-grouped folds.")] = 5,
    config: Annotated[Path | None, typer.Option("--config", help="YAML settings file.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="CV folder (default runs/cv-<time>).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Override: maximum epochs.")] = None,
    exclude_cells: Annotated[
        Path | None,
        typer.Option(
            "--exclude-cells",
            help="CSV of training cells to leave out (column sha256 or path); an optional "
            "fold column (1, 2, ...) limits a row to that fold's training, for nested "
            "lists (bench/noise_flags.py). Test cells are never left out.",
        ),
    ] = None,
) -> None:
    """Patient-grouped, stratified k-fold cross-validation of a recipe (resumable).

    Each fold's patients are the test set of one training run (OUTPUT/fold_<k>/);
    run the same command again to finish an interrupted cross-validation: finished
    folds are skipped, an interrupted fold continues from its last epoch.
    """
    from malaria_classifier.config import load_config
    from malaria_classifier.cv import PATIENTS_CSV, RESULTS_CSV, cross_validate, format_table
    from malaria_classifier.splits import read_cell_list

    run_dir = output or Path("runs") / datetime.now().strftime("cv-%Y%m%d-%H%M%S")
    settings = load_config(config, epochs=epochs)
    cells = read_cell_list(exclude_cells) if exclude_cells is not None else None
    with _on_interrupt(
        f"Finished folds and epochs are kept in {run_dir}; run the same command with "
        f"--output {run_dir} to continue."
    ):
        result = cross_validate(
            data,
            settings,
            run_dir,
            folds=folds,
            progress=sys.stderr.isatty(),
            exclude_cells=cells,
        )
    typer.echo(
        f"Patient-grouped {folds}-fold cross-validation, test patients of each fold, "
        f"cell metrics at threshold 0.5 (positive class Parasitized):"
    )
    typer.echo(format_table(result))
    typer.echo(f"Results: {run_dir / RESULTS_CSV} (and .json)")
    typer.echo(f"Per patient (each tested once, in its fold): {run_dir / PATIENTS_CSV}")


@_user_errors
def tune_command(
    data: Annotated[Path, typer.Option("--data", help="NIH-layout data folder.")],
    trials: Annotated[int, typer.Option(help="Finished trials wanted in the study in all.")],
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default sqlite:///OUTPUT/study.db)."),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="Start no new trial after this many seconds.")
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", help="Output folder (default runs/tune-<time>).")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", help="YAML of the settings not searched.")
    ] = None,
    max_epochs: Annotated[int, typer.Option(help="Epoch budget of one trial.")] = 20,
    study_name: Annotated[str, typer.Option(help="Study name within the storage.")] = "malaria",
    seeds_per_trial: Annotated[
        int,
        typer.Option(
            help="Train each trial's recipe with this many training seeds and score the mean "
            "(N times slower; resolves differences smaller than one seed's noise)."
        ),
    ] = 1,
) -> None:
    """Search the training recipe with Optuna, scored on validation patients only.

    Searches batch size, learning rate, epochs (early stopping within --max-epochs),
    width, depth, dropout, label smoothing, input size, colour normalization and
    augmentation strength; weak trials are pruned. Run the same command again to
    continue a killed search: finished trials are kept in the storage. Writes
    OUTPUT/best_config.yaml (for `malaria train --config`), best_trial.json, trials.csv
    and figures/.
    """
    from malaria_classifier.config import load_config
    from malaria_classifier.tune import SearchSpace, tune

    output_dir = output or Path("runs") / datetime.now().strftime("tune-%Y%m%d-%H%M%S")
    with _on_interrupt(
        f"Finished trials are kept in the study; run the same command with --output "
        f"{output_dir} to continue."
    ):
        result = tune(
            data,
            trials,
            output_dir,
            base=load_config(config),
            storage=storage,
            study_name=study_name,
            timeout=timeout,
            space=SearchSpace(max_epochs=max_epochs),
            progress=True,
            seeds_per_trial=seeds_per_trial,
        )
    typer.echo(
        f"Best trial {result.best_trial}: validation AUC {result.best_value:.4f} "
        f"({result.finished_trials} trials finished)."
    )
    typer.echo(f"Best config: {result.best_config_path}")
    typer.echo(f"Next: malaria train --data {data} --config {result.best_config_path}")
