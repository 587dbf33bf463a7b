"""``malaria predict``: one row per image, and optionally one verdict per patient.

Options are refused before any model is loaded (a typo costs no start-up) and the
predictor is built with TensorFlow only when it must be; the result files are written by
``predict_outputs``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from malaria_classifier.cli._common import _import_tensorflow_quietly, _is_folder, _user_errors
from malaria_classifier.cli.predict_outputs import write_predictions, write_verdicts

if TYPE_CHECKING:
    from malaria_classifier.prediction import PredictionRow, Predictor

PREDICT_RUNTIMES = ("auto", "keras", "onnx")


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
    from malaria_classifier.prediction import distinct_inputs

    output_format = _check_options(paths, output, output_format, group_by, summary, runtime)
    with _load_predictor(paths, model, views, runtime, not_a_cell) as predictor:
        _check_predictor(predictor, summary)
        collected: list[PredictionRow] = []
        rows = _collecting(
            predictor.predict_paths(distinct_inputs(paths)), collected if summary else None
        )
        counts = write_predictions(rows, output, output_format, summary)
        typer.echo(
            f"{counts['predicted']} predicted, {counts['failed']} failed "
            f"(forward pass: {predictor.runtime})",
            err=True,
        )
        if summary is not None and group_by is not None and predictor.verdict_rule is not None:
            write_verdicts(collected, predictor.verdict_rule, group_by, summary)
        if counts["predicted"] == 0:
            _fail_as_nothing_predicted(counts)


def _check_options(
    paths: list[Path],
    output: Path | None,
    output_format: str | None,
    group_by: str | None,
    summary: Path | None,
    runtime: str,
) -> str:
    """Refuse bad options before the model is loaded, so a typo costs no start-up.

    Returns:
        The output format: ``--format``, else json for an ``--output`` ending .json,
        else csv.

    Raises:
        ValueError: Naming the option, what was passed and what it accepts.
    """
    from malaria_classifier.outputs import check_output_path
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
    return output_format


def _load_predictor(
    paths: list[Path], model: Path | None, views: bool, runtime: str, not_a_cell: str
) -> Predictor:
    """The predictor, loading TensorFlow only when no serving copy can stand in for it."""
    from malaria_classifier.model_card import default_model_path
    from malaria_classifier.prediction import PROCESS_DECODE_MIN_FILES, Predictor
    from malaria_classifier.serving import read_serving_copy

    if runtime not in ("auto", "onnx") or read_serving_copy(model or default_model_path()) is None:
        _import_tensorflow_quietly()  # the model has to be loaded by Keras
    # Worker processes pay for themselves only on jobs of PROCESS_DECODE_MIN_FILES files
    # or more; a few named files are done before the workers would have started (a
    # one-file call: 0.66 s less, spent waiting for idle workers to load the model).
    return Predictor(
        model,
        test_time_views=views,
        runtime=runtime,
        decode_processes=len(paths) >= PROCESS_DECODE_MIN_FILES
        or any(_is_folder(path) for path in paths),
        not_a_cell=not_a_cell,
    )


def _check_predictor(predictor: Predictor, summary: Path | None) -> None:
    """Refuse a summary the model cannot make; warn when its probabilities are raw.

    Raises:
        ValueError: When ``--summary`` is asked of a model without a verdict rule.
    """
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


def _collecting(
    rows: Iterable[PredictionRow], into: list[PredictionRow] | None
) -> Iterator[PredictionRow]:
    """Pass rows through, keeping a copy when a summary will be needed."""
    for row in rows:
        if into is not None:
            into.append(row)
        yield row


def _fail_as_nothing_predicted(counts: dict[str, int]) -> None:
    """Exit with status 1, saying why when no image file was found at all.

    Raises:
        typer.Exit: Always (status 1), so scripts notice that nothing was predicted.
    """
    from malaria_classifier.constants import IMAGE_SUFFIXES

    if counts["failed"] == 0:
        typer.secho(
            "No image files found: folders are searched recursively for "
            f"{', '.join(sorted(IMAGE_SUFFIXES))} files (other files are skipped).",
            err=True,
            fg=typer.colors.RED,
        )
    raise typer.Exit(code=1)
