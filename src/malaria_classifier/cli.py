"""The ``malaria`` command: parses arguments and calls library functions, nothing more.

User errors (bad paths, bad layouts, bad settings) are printed as one clear line and
exit with status 2; no traceback is shown for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up chatter

import typer  # noqa: E402

app = typer.Typer(
    help="Tell Parasitized from Uninfected red-blood-cell images (NIH/NLM malaria cells).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check or download cell-image data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into a message and exit status 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from malaria_classifier.download import DownloadError
        from malaria_classifier.splits import LeakageError

        try:
            return function(*args, **kwargs)
        except (ValueError, DownloadError, LeakageError, FileExistsError) as error:
            typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None
        except BrokenPipeError:  # `malaria predict cells/ | head`: the reader has stopped
            _silence_stdout()
            raise typer.Exit(code=BROKEN_PIPE_STATUS) from None
        except OSError as error:  # a file the user named cannot be written or read
            where = f" ({error.filename})" if error.filename else ""
            typer.secho(
                f"Error: {error.strerror or error}{where}. Check that the path exists and "
                f"that you may read or write it.",
                err=True,
                fg=typer.colors.RED,
            )
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("Interrupted.", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


PREDICT_RUNTIMES = ("auto", "keras", "onnx")
# What a shell reports for a command stopped by SIGPIPE (128 + 13), as `yes | head` does.
BROKEN_PIPE_STATUS = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit raises no second broken pipe."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (e.g. captured by a test runner)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


@contextlib.contextmanager
def _on_interrupt(hint: str) -> Iterator[None]:
    """On Ctrl+C, say how to continue the long job (then exit as interrupted)."""
    try:
        yield
    except KeyboardInterrupt:
        typer.secho(f"Interrupted. {hint}", err=True)
        raise typer.Exit(code=130) from None


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder; False when it cannot even be looked at."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _show_version(value: bool) -> None:
    if value:
        from malaria_classifier import __version__

        typer.echo(f"malaria-classifier {__version__}")
        raise typer.Exit()


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe devices with its C++ start-up log hidden.

    TensorFlow 2.21 writes oneDNN/CUDA notices straight to file descriptor 2 before
    its logging honours TF_CPP_MIN_LOG_LEVEL; they bury our own messages. Set
    MALARIA_TF_LOGS=1 to see them.
    """
    if os.environ.get("MALARIA_TF_LOGS") == "1":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@app.callback()
def main(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Tell Parasitized from Uninfected red-blood-cell images (NIH/NLM malaria cells)."""
    # predict imports TensorFlow only if it must, data commands and --help never do (a
    # help text took 4 s); the rest import it here, with its start-up log hidden.
    if context.invoked_subcommand not in ("predict", "data") and "--help" not in sys.argv:
        _import_tensorflow_quietly()


@data_app.command("check")
@_user_errors
def data_check(
    directory: Annotated[Path, typer.Argument(help="NIH-layout folder (or a parent of it).")],
    json_output: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit with status 1 when a file is unreadable, a picture is stored under "
            "both labels or images lie outside the class folders (for scripts and CI).",
        ),
    ] = False,
) -> None:
    """Count images per class and patient; find unreadable files and duplicates."""
    from malaria_classifier.data import check_dataset
    from malaria_classifier.outputs import check_output_path, open_output

    if json_output:
        check_output_path(json_output, "--json", inputs=[directory])
    report = check_dataset(directory, progress=sys.stderr.isatty())
    summary = report.to_dict()
    typer.echo(f"Data folder: {summary['root']}")  # printable even for non-UTF-8 names
    for label, count in sorted(report.counts.items()):
        typer.echo(f"  {label:<12} {count:>7,} images")
    patients = report.patients
    typer.echo(
        f"  Patients:    {patients['total']} ({patients['with_parasitized_cells']} with "
        f"parasitized cells, {patients['with_only_uninfected_cells']} with only uninfected "
        f"cells; patient rule: `malaria data check --help`)"
    )
    for axis in ("height", "width"):
        stats = summary["image_size"].get(axis)
        if stats:
            typer.echo(
                f"  Image {axis:<6} min {stats['min']} / median {stats['median']:g} / "
                f"p95 {stats['p95']:.0f} / max {stats['max']} px"
            )
    typer.echo(f"  Unreadable:  {len(report.unreadable)}")
    for _path, error in report.unreadable[:20]:
        typer.echo(f"    {error}")
    _echo_more(len(report.unreadable), 20, json_output)
    typer.echo(f"  Duplicate contents (same SHA-256): {len(report.duplicates)} group(s)")
    for group in report.duplicates[:10]:
        typer.echo(f"    {' = '.join(group)}")
    _echo_more(len(report.duplicates), 10, json_output)
    conflicts = report.label_conflicts
    if conflicts:
        typer.secho(
            f"  Label conflicts: {len(conflicts)} picture(s) stored as both Parasitized and "
            f"Uninfected; keep one copy with the right label:",
            fg=typer.colors.YELLOW,
        )
        for group in conflicts[:10]:
            typer.echo(f"    {' = '.join(group)}")
        _echo_more(len(conflicts), 10, json_output)
    if report.skipped_files:
        typer.echo(f"  Skipped non-image files: {len(report.skipped_files)}")
        for path in report.skipped_files[:5]:
            typer.echo(f"    {path}")
        _echo_more(len(report.skipped_files), 5, json_output)
    outside = report.outside_class_folders
    if outside:
        typer.secho(
            f"  Images outside Parasitized/ and Uninfected/ (no label, not used): {len(outside)}",
            fg=typer.colors.YELLOW,
        )
        for path in outside[:5]:
            typer.echo(f"    {path}")
        _echo_more(len(outside), 5, json_output)
    if json_output:
        with open_output(json_output) as handle:
            handle.write(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"Report written to {json_output}")
    if strict and (report.unreadable or conflicts or outside):
        typer.secho(
            "--strict: the data have problems listed above (unreadable files, pictures under "
            "both labels or unlabelled images); fix them or leave --strict out.",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(code=1)


def _echo_more(total: int, shown: int, json_output: Path | None) -> None:
    """Say how many entries a shortened list left out, and where the full list is."""
    if total > shown:
        where = f"all in {json_output}" if json_output else "all with --json FILE"
        typer.echo(f"    ... and {total - shown} more ({where})")


data_check.__doc__ = (data_check.__doc__ or "") + (
    "\n\nPatient ids come from NIH file names: C<slide>...P<n> gives patient P<n>, "
    "C<slide> alone (healthy donors) gives C<slide>; other names fall back to their "
    "source field image (the name before _cell_<n>)."
)


@data_app.command("download")
@_user_errors
def data_download(
    dest: Annotated[
        Path, typer.Option(help="Folder to download and extract into: empty, new, or ours.")
    ] = Path("data"),
    url: Annotated[
        str | None, typer.Option(help="Mirror URL of cell_images.zip (http, https or ftp).")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the zip.")] = None,
    expected_images: Annotated[
        int | None,
        typer.Option(
            "--expected-images",
            min=0,
            help="PNG images the zip must hold (default 27,558, the official count); "
            "0 skips the check, e.g. for a mirror serving a subset.",
        ),
    ] = None,
) -> None:
    """Download the official NIH cell_images.zip, verify it and extract it.

    A zip already at DEST/cell_images.zip is verified and extracted without downloading.
    """
    from malaria_classifier.download import EXPECTED_IMAGE_COUNT, OFFICIAL_URL, download_dataset

    source = url or OFFICIAL_URL
    expected = EXPECTED_IMAGE_COUNT if expected_images is None else expected_images or None
    typer.echo(f"Downloading {source} into {dest} (skipped if already there)", err=True)
    with _on_interrupt(
        "Run the same command again to continue: a finished download is kept and "
        "re-used, an unfinished one starts over."
    ):
        folder = download_dataset(
            dest,
            url=source,
            sha256=sha256,
            progress=True,
            expected_image_count=expected,
            notify=lambda note: typer.echo(f"Note: {note}", err=True),
        )
    typer.echo(f"Data ready in {folder}. Next: malaria data check {folder}")


@app.command()
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
    from malaria_classifier.splits import read_cell_list
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
    cells: set[str] = set()
    if exclude_cells is not None and not resume:
        by_fold = read_cell_list(exclude_cells)
        if set(by_fold) - {None}:
            raise ValueError(
                f"{exclude_cells} gives cells per cross-validation fold (column fold); "
                f"`malaria train` has one split. Use it with `malaria cv`, or drop the "
                f"fold column."
            )
        cells = by_fold.get(None, set())
    with _on_interrupt(
        f"Finished epochs are kept in {run_dir}; continue with: malaria train --data {data} "
        f"--output {run_dir} --resume"
    ):
        result = train_model(
            data, settings, run_dir, resume=resume, strategy=strategy, exclude_cells=cells
        )
    if not result.metrics:  # a non-chief worker of a multi-worker run
        typer.echo(f"Worker done ({result.seconds / 60:.1f} min); the chief wrote {run_dir}.")
        return
    test = result.metrics["test"]
    typer.echo(f"Model: {result.model_path} ({result.seconds / 60:.1f} min)")
    _echo_metrics(test)


@app.command("cv")
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


@app.command("tune")
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


def _echo_metrics(block: dict[str, Any]) -> None:
    typer.echo(
        f"{block['split']} split: {block['cells']} cells of {block['patients']} patients; "
        f"positive class {block['positive_class']}; 95% CI from a bootstrap over patients"
    )
    for name, values in block["metrics"].items():
        low, high = values["ci95"]
        if values["value"] is None:
            reason = block.get("undefined", {}).get(name, "no value")
            typer.echo(f"  {name:<12} undefined ({reason})")
        elif low is None or high is None:
            typer.echo(f"  {name:<12} {values['value']:.4f}  [no interval]")
        else:
            typer.echo(f"  {name:<12} {values['value']:.4f}  [{low:.4f}, {high:.4f}]")
    from malaria_classifier.evaluation import interval_caveat

    caveat = interval_caveat(block)
    if caveat:
        typer.secho(f"Warning: {caveat}", err=True, fg=typer.colors.YELLOW)


@app.command()
@_user_errors
def evaluate(
    data: Annotated[Path, typer.Option("--data", help="NIH-layout folder to evaluate on.")],
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    split: Annotated[
        str, typer.Option(help="Split of the model's manifest: train, validation or test.")
    ] = "test",
    output: Annotated[Path, typer.Option(help="Folder for metrics and figures.")] = Path(
        "evaluation"
    ),
) -> None:
    """Metrics with patient-bootstrap 95% CIs, confusion matrix, ROC, per-patient table."""
    from malaria_classifier.evaluate import evaluate_model
    from malaria_classifier.prediction import Predictor

    report = evaluate_model(Predictor(model), data, split, output)
    typer.echo(report["selection"]["description"])
    unreadable = report["unreadable"]
    if unreadable:
        typer.secho(
            f"{len(unreadable)} image(s) could not be read and were left out (all listed "
            f"in metrics.json under 'unreadable'):",
            err=True,
            fg=typer.colors.YELLOW,
        )
        for item in unreadable[:5]:
            typer.echo(f"  {item['error']}", err=True)
    _echo_metrics(report)
    figures = (
        "confusion_matrix.*, roc_curve.*"
        if "roc_auc" not in report["undefined"]
        else ("confusion_matrix.* (no ROC curve: it needs cells of both classes)")
    )
    typer.echo(f"Written: {output}/metrics.json, per_patient.csv, {figures}")


@app.command()
@_user_errors
def predict(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Image files and/or folders (searched recursively for image files).",
            readable=False,  # an unreadable file gets its own row; the rest go on
        ),
    ],
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    output: Annotated[
        Path | None, typer.Option(help="Write results here instead of standard output.")
    ] = None,
    output_format: Annotated[
        str | None,
        typer.Option(
            "--format", help="csv or json; default: json for an --output ending .json, else csv."
        ),
    ] = None,
    group_by: Annotated[
        str | None,
        typer.Option(help="Aggregate cells into verdicts by patient, slide, folder or all."),
    ] = None,
    summary: Annotated[
        Path | None,
        typer.Option(
            help="Write per-group verdicts here (CSV, or JSON for a .json name); needs --group-by."
        ),
    ] = None,
    views: Annotated[
        bool,
        typer.Option(
            "--views/--no-views",
            help="Also score flipped/rotated copies; Uncertain when they disagree (slower).",
        ),
    ] = False,
    runtime: Annotated[
        str,
        typer.Option(
            help="Forward pass: auto (ONNX Runtime, the fastest on CPU, or Keras for a model "
            "it cannot convert), keras, or onnx. Results agree within 1e-4."
        ),
    ] = "auto",
    not_a_cell: Annotated[
        str,
        typer.Option(
            help="Not-a-cell limits: strict (fitted on NIH crops) or other-labs (also accepts "
            "smaller, softer, re-stained cells and crops on a smear background)."
        ),
    ] = "strict",
) -> None:
    """One row per image: path,label,probability,confidence,error,decision,reason.

    probability is the calibrated P(Parasitized); confidence is the probability of the
    chosen label; decision is Parasitized, Uninfected, Uncertain or Not a cell; reason
    says why a cell is Uncertain or Not a cell.
    Exits non-zero only when no image could be predicted.
    """
    from malaria_classifier.constants import IMAGE_SUFFIXES
    from malaria_classifier.model_card import default_model_path
    from malaria_classifier.outputs import check_output_path, open_output
    from malaria_classifier.prediction import (
        PROCESS_DECODE_MIN_FILES,
        Predictor,
        distinct_inputs,
        write_rows,
    )
    from malaria_classifier.serving import read_serving_copy
    from malaria_classifier.verdict import GROUPINGS

    if output_format is None:
        output_format = "json" if output is not None and output.suffix.lower() == ".json" else "csv"
    if output_format not in ("csv", "json"):
        raise ValueError(f"--format must be csv or json, got {output_format!r}.")
    if (group_by is None) != (summary is None):
        raise ValueError("--group-by and --summary go together: pass both or neither.")
    if group_by is not None and group_by not in GROUPINGS:
        raise ValueError(f"--group-by must be one of {', '.join(GROUPINGS)}, got {group_by!r}.")
    if runtime not in PREDICT_RUNTIMES:  # before TensorFlow is imported: a typo costs 0 s
        raise ValueError(
            f"--runtime must be one of {', '.join(PREDICT_RUNTIMES)}, got {runtime!r}. "
            f"(TFLite gives probabilities only, without the Not-a-cell check: use it through "
            f"`malaria export --format tflite`.)"
        )
    if output is not None:
        check_output_path(output, "--output", inputs=paths, others=[summary])
    if summary is not None:
        check_output_path(summary, "--summary", inputs=paths)
    if runtime not in ("auto", "onnx") or read_serving_copy(model or default_model_path()) is None:
        _import_tensorflow_quietly()  # the model has to be loaded by Keras
    # Worker processes pay for themselves only on jobs of PROCESS_DECODE_MIN_FILES files
    # or more; a few named files are done before the workers would have started (a
    # one-file call: 0.66 s less, spent waiting for idle workers to load the model).
    predictor = Predictor(
        model,
        test_time_views=views,
        runtime=runtime,
        decode_processes=len(paths) >= PROCESS_DECODE_MIN_FILES
        or any(_is_folder(path) for path in paths),
        not_a_cell=not_a_cell,
    )
    with predictor:  # stops its decode worker processes at the end
        if summary is not None and predictor.verdict_rule is None:
            raise ValueError(
                f"{predictor.model_path} has no verdict rule. Run `malaria calibrate` on it first."
            )
        if "calibration" not in predictor.card:
            # The README promises calibrated probabilities; say when they are not.
            typer.secho(
                f"Warning: {predictor.model_path} is not calibrated: probability is the "
                f"model's raw softmax output, the threshold is {predictor.threshold:g} and "
                f"no cell is called Uncertain or Not a cell. Run `malaria calibrate --data "
                f"DATA --run RUN` on its training run first.",
                err=True,
                fg=typer.colors.YELLOW,
            )
        collected: list = []
        rows = _collecting(
            predictor.predict_paths(distinct_inputs(paths)), collected if summary else None
        )
        if output is not None and sys.stderr.isatty():
            from tqdm import tqdm

            rows = tqdm(rows, desc="Predicting", unit="img", file=sys.stderr)
        if output is None:
            counts = write_rows(rows, sys.stdout, output_format)
        else:
            with open_output(output) as handle:
                counts = write_rows(rows, handle, output_format)
        typer.echo(
            f"{counts['predicted']} predicted, {counts['failed']} failed "
            f"(forward pass: {predictor.runtime})",
            err=True,
        )
        if summary is not None and group_by is not None and predictor.verdict_rule is not None:
            from malaria_classifier.verdict import (
                drop_repeated_pictures,
                summarize_rows,
                write_summary,
            )

            distinct, repeated = drop_repeated_pictures(collected)
            groups = summarize_rows(distinct, predictor.verdict_rule, group_by)
            with open_output(summary) as handle:
                summary_format = "json" if summary.suffix.lower() == ".json" else "csv"
                write_summary(groups, handle, summary_format)
            typer.echo(f"{len(groups)} {group_by} verdict(s) written to {summary}", err=True)
            if repeated:
                typer.secho(
                    f"Note: {repeated} file(s) repeat the picture of another file (the same "
                    f"bytes); each picture counts once in the verdicts (the predictions keep "
                    f"one row per file).",
                    err=True,
                    fg=typer.colors.YELLOW,
                )
            _warn_about_groups_without_a_patient(groups, group_by)
        if counts["predicted"] == 0:
            if counts["failed"] == 0:
                typer.secho(
                    "No image files found: folders are searched recursively for "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))} files (other files are skipped).",
                    err=True,
                    fg=typer.colors.RED,
                )
            raise typer.Exit(code=1)


@app.command()
@_user_errors
def dashboard(
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8050,
    examples: Annotated[
        Path | None, typer.Option(help="Folder of cell images shown as a gallery to try.")
    ] = None,
    debug: Annotated[
        bool, typer.Option(help="Dash debug mode (never on a shared server).")
    ] = False,
) -> None:
    """Start the web dashboard: upload cell images, see label, confidence and why.

    Open the printed address in a browser. For several workers, see the README
    (gunicorn "malaria_classifier.dashboard.wsgi:create_server()").
    """
    from malaria_classifier.dashboard import run_dashboard

    typer.echo(f"Loading the model; then open http://{host}:{port}/ (Ctrl+C stops).", err=True)
    run_dashboard(model=model, host=host, port=port, examples=examples, debug=debug)


def _warn_about_groups_without_a_patient(groups: list, group_by: str) -> None:
    """Say when file names outside the NIH rule made one "patient" per file or field."""
    from malaria_classifier.verdict import groups_without_a_patient

    unnamed = groups_without_a_patient(groups)
    if group_by not in ("patient", "slide") or not unnamed:
        return
    examples = ", ".join(unnamed[:3]) + (", ..." if len(unnamed) > 3 else "")
    typer.secho(
        f"Warning: {len(unnamed)} of {len(groups)} groups are not {group_by}s but single "
        f"fields or files ({examples}): their names do not follow the NIH rule "
        f"(C<slide>P<patient>..._cell_<n>), so each is judged on its own cells only. "
        f"Put each {group_by}'s cells in one folder and use --group-by folder.",
        err=True,
        fg=typer.colors.YELLOW,
    )


def _collecting(rows: Any, into: list | None) -> Any:
    """Pass rows through, keeping a copy when a summary will be needed."""
    for row in rows:
        if into is not None:
            into.append(row)
        yield row


@app.command()
@_user_errors
def calibrate(
    data: Annotated[Path, typer.Option("--data", help="The NIH-layout folder the run used.")],
    run: Annotated[
        Path | None, typer.Option(help="Run folder with manifest.csv; default: the model's.")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Model (.keras) to calibrate; default: RUN/model.keras.")
    ] = None,
    min_specificity: Annotated[
        float, typer.Option(help="Cell specificity the threshold keeps on validation.")
    ] = 0.97,
    ood_variants: Annotated[
        bool,
        typer.Option(
            help="Also fit the other-labs Not-a-cell limits (ood_other_labs.json, for "
            "`malaria predict --not-a-cell other-labs`) on copies of the cells changed like "
            "other labs' images (smaller, blurred, other stain, smear background)."
        ),
    ] = True,
) -> None:
    """Fit calibration, threshold, Uncertain band, Not-a-cell check, verdict rule.

    Everything is chosen on the run's validation patients (training cells for the
    Not-a-cell feature density) and written into the model card, ood.json and
    ood_other_labs.json beside the model; the card's calibration_report adds the same
    figures on test patients.
    """
    from malaria_classifier.calibrate import calibrate_model

    if run is None and model is None:
        raise ValueError("Pass --run (a `malaria train` run folder) and/or --model.")
    model_path = model or run / "model.keras"
    card = calibrate_model(
        model_path, run or model_path.parent, data, min_specificity, ood_variants=ood_variants
    )
    calibration, report = card["calibration"], card["calibration_report"]["test"]
    typer.echo(
        f"Temperature {calibration['temperature']:.4f}; threshold "
        f"{card['decision_threshold']:.4f}; written to {model_path.parent}"
    )
    before = report["reliability_uncalibrated"]["expected_calibration_error"]
    after = report["reliability_calibrated"]["expected_calibration_error"]
    verdicts = report["verdicts"]
    typer.echo(
        f"Test patients: ECE {before:.4f} -> {after:.4f}; sensitivity "
        f"{_figure(report['sensitivity'])}, specificity {_figure(report['specificity'])}; "
        f"{verdicts['infected_called_positive']}/{verdicts['infected_patients']} infected "
        f"positive, {verdicts['healthy_called_negative']}/{verdicts['healthy_donors']} "
        f"healthy negative" + _indeterminate_note(verdicts.get("indeterminate", 0))
    )
    for warning in _calibration_warnings(card, model_path):
        typer.secho(f"Warning: {warning}", err=True, fg=typer.colors.YELLOW)


def _indeterminate_note(count: int) -> str:
    """Why patients are neither positive nor negative, when some are."""
    if not count:
        return ""
    return f" ({count} indeterminate: too few usable cells, most often all 'Not a cell')"


def _figure(value: float | None) -> str:
    return "undefined (no such cells)" if value is None else f"{value:.4f}"


def _calibration_warnings(card: dict[str, Any], model_path: Path) -> list[str]:
    """Fits that were saved but that a user should not trust without a look."""
    from malaria_classifier.calibration import MAX_TEMPERATURE
    from malaria_classifier.ood import OOD_FILE

    warnings = []
    ood = json.loads((model_path.parent / OOD_FILE).read_text(encoding="utf-8"))
    fitted = ood.get("fitted_on", {})
    if fitted.get("within_budget") is False:
        warnings.append(
            f"the Not-a-cell limits reject {fitted['validation_false_rejection']:.1%} of "
            f"the validation cells (budget {fitted['max_false_rejection']:.1%}): too few "
            f"or too varied training cells? Check {model_path.parent / OOD_FILE}."
        )
    temperature = card["calibration"]["temperature"]
    if not 1 / MAX_TEMPERATURE * 1.01 < temperature < MAX_TEMPERATURE / 1.01:
        warnings.append(
            f"the temperature {temperature:.3g} is at the edge of its search range: the "
            f"model's scores carry little information (or are far too confident); train "
            f"longer or on more patients before trusting its probabilities."
        )
    return warnings


@app.command("export")
@_user_errors
def export(
    export_format: Annotated[
        str, typer.Option("--format", help="saved_model (TF Serving), tflite (phones) or onnx.")
    ],
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="File or folder to create; default here: <model name>.onnx / .tflite, or "
            "the folder <model name>_saved_model."
        ),
    ] = None,
) -> None:
    """Export a model for TensorFlow Serving, LiteRT (phones) or ONNX Runtime.

    The export takes raw uint8 RGB cells resized with black padding, like the model,
    and outputs the softmax (index 1 = P(Parasitized)); a .model_card.json beside it
    records the input contract, class order and threshold.
    """
    from malaria_classifier.export import check_export_format, default_export_path, export_model
    from malaria_classifier.model_card import default_model_path

    check_export_format(export_format)
    model_path = model or default_model_path()
    result = export_model(
        model_path, export_format, output or default_export_path(model_path, export_format)
    )
    typer.echo(
        f"Exported {model_path} as {export_format}: {result.path} "
        f"({result.size_bytes / 1e6:.2f} MB); serving contract in {result.card_path}"
    )


if __name__ == "__main__":
    app()
