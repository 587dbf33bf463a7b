"""``malaria evaluate`` and ``malaria calibrate``: measure a model, then fit its trust layer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from malaria_classifier.cli._common import _echo_metrics, _user_errors


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
    _echo_unreadable(report["unreadable"])
    _echo_metrics(report)
    figures = (
        "confusion_matrix.*, roc_curve.*"
        if "roc_auc" not in report["undefined"]
        else ("confusion_matrix.* (no ROC curve: it needs cells of both classes)")
    )
    typer.echo(f"Written: {output}/metrics.json, per_patient.csv, {figures}")


def _echo_unreadable(unreadable: list[dict[str, Any]]) -> None:
    """Say that images were left out of the metrics, so their absence is never silent."""
    if unreadable:
        typer.secho(
            f"{len(unreadable)} image(s) could not be read and were left out (all listed "
            f"in metrics.json under 'unreadable'):",
            err=True,
            fg=typer.colors.YELLOW,
        )
        for item in unreadable[:5]:
            typer.echo(f"  {item['error']}", err=True)


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
    _echo_calibration(card, model_path)
    for warning in _calibration_warnings(card, model_path):
        typer.secho(f"Warning: {warning}", err=True, fg=typer.colors.YELLOW)


def _echo_calibration(card: dict[str, Any], model_path: Path) -> None:
    """Print the fit (temperature, threshold) and how it does on test patients.

    The test figures come from the card's ``calibration_report``: they were not used to
    fit anything, so they are what a user may expect on new patients.
    """
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


def _indeterminate_note(count: int) -> str:
    """Why patients are neither positive nor negative, when some are."""
    if not count:
        return ""
    return f" ({count} indeterminate: too few usable cells, most often all 'Not a cell')"


def _figure(value: float | None) -> str:
    """A rate to 4 places, or why there is none (a test set without such cells)."""
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
