"""The "Model" tab: the model card and the evaluation figures of the loaded model.

Figures come from the Plotly JSON that ``malaria train`` and ``malaria evaluate`` write
into ``evaluation/`` beside the model; without them the confusion matrix is rebuilt from
the model card's counts, and the page says how to get the ROC curve.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dash_bootstrap_components as dbc
import plotly.graph_objects as go
import plotly.io
from dash import dcc, html

from malaria_classifier.dashboard import ids
from malaria_classifier.dashboard.components import metrics_table, positive_class_note
from malaria_classifier.plots import confusion_matrix_plotly

EVALUATION_FOLDER = "evaluation"


def load_evaluation_figures(model_path: Path, card: dict[str, Any]) -> dict[str, go.Figure]:
    """The confusion matrix and ROC curve of this model, where they can be found."""
    folder = Path(model_path).parent / EVALUATION_FOLDER
    figures: dict[str, go.Figure] = {}
    for name in ("confusion_matrix", "roc_curve"):
        path = folder / f"{name}.json"
        if path.is_file():
            try:
                figures[name] = plotly.io.from_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, json.JSONDecodeError):
                continue  # a damaged figure file only costs its figure
    test = card.get("metrics", {}).get("test")
    if "confusion_matrix" not in figures and test:
        figures["confusion_matrix"] = confusion_matrix_plotly(
            test["confusion_matrix"]["counts"], "test", float(test.get("threshold", 0.5))
        )
    return figures


def model_page(model_name: str, card: dict[str, Any], figures: dict[str, go.Figure]) -> html.Div:
    """What the model is, what it was trained on and how well it did on unseen patients."""
    if not card:
        return html.Div(
            [
                html.H4("Model"),
                html.P(f"{model_name}: this model has no model card (model_card.json)."),
                html.P("Train with `malaria train` to get one, with metrics and figures."),
            ],
            id=ids.MODEL_PAGE,
        )
    return html.Div(
        [
            html.H4("Model card"),
            _facts(model_name, card),
            html.H5("How well it does on patients it never saw", className="mt-4"),
            positive_class_note(),
            metrics_table(card.get("metrics", {})),
            html.P(
                _thresholds_note(card),
                className="small text-muted",
            ),
            dbc.Row(
                [
                    dbc.Col(_figure(figures, "confusion_matrix", ids.CONFUSION_MATRIX), md=6),
                    dbc.Col(_figure(figures, "roc_curve", ids.ROC_CURVE), md=6),
                ]
            ),
        ],
        id=ids.MODEL_PAGE,
    )


def _facts(model_name: str, card: dict[str, Any]) -> dbc.Table:
    data = card.get("data", {})
    split = card.get("split", {})
    summary = split.get("summary", {})
    weights = card.get("weights", {})
    shape = card.get("input", {}).get("shape", [])
    rows = [
        ("File", model_name),
        ("Task", card.get("task", "")),
        ("Created", card.get("created", "")),
        ("Positive class", card.get("positive_class", "")),
        ("Decision threshold", _threshold_text(card)),
        ("Calibration", _calibration_text(card)),
        ("Patient verdict rule", _verdict_rule_text(card)),
        ("Input", "x".join(str(side) for side in shape) + " RGB, raw 0-255"),
        ("Weights", f"{weights.get('parameters', 0):,} ({weights.get('bytes', 0) / 1024:.0f} KB)"),
        ("Training data", _data_text(data)),
        ("Split (by patient)", _split_text(split, summary)),
    ]
    body = html.Tbody([html.Tr([html.Th(name), html.Td(value)]) for name, value in rows])
    return dbc.Table(body, bordered=True, size="sm", className="model-facts")


def _thresholds_note(card: dict[str, Any]) -> str:
    """Which threshold the table and the figures use: they may differ, so say so."""
    table = {
        round(float(split.get("threshold", 0.5)), 3) for split in card.get("metrics", {}).values()
    }
    table_text = " / ".join(f"{value:g}" for value in sorted(table)) or "0.5"
    return (
        f"The table is at P(Parasitized) ≥ {table_text} on the uncalibrated softmax, as "
        f"training scores it. Decisions on this page use the operating threshold "
        f"({float(card.get('decision_threshold', 0.5)):.3f} on the calibrated probability); "
        f"each figure's title names the threshold its counts were cut at. A cell called "
        f"Uncertain or Not a cell still counts with its label in these figures."
    )


def _threshold_text(card: dict[str, Any]) -> str:
    threshold = float(card.get("decision_threshold", 0.5))
    point = card.get("calibration", {}).get("operating_point")
    if not point:
        return f"P(Parasitized) ≥ {threshold:.3f}"
    return (
        f"calibrated P(Parasitized) ≥ {threshold:.3f}: {point['target']} on validation "
        f"patients (sensitivity {point['validation_sensitivity']:.3f}, specificity "
        f"{point['validation_specificity']:.3f})"
    )


def _calibration_text(card: dict[str, Any]) -> str:
    calibration = card.get("calibration")
    if not calibration:
        return "none: probabilities are the raw softmax output (run `malaria calibrate`)"
    return (
        f"temperature {calibration['temperature']:.3f}, fitted on "
        f"{calibration.get('fitted_on', 'validation patients')}"
    )


def _verdict_rule_text(card: dict[str, Any]) -> str:
    rule = card.get("verdict_rule")
    if not rule:
        return "none (run `malaria calibrate`)"
    return (
        f"positive if ≥ {rule['min_suspicious_cells']} usable cells have calibrated "
        f"P(Parasitized) ≥ {rule['cell_threshold']:.3f}; otherwise negative, or "
        f"indeterminate with fewer than {rule['min_cells']} usable cells "
        f"(chosen on {rule.get('fitted_on', 'validation patients')})"
    )


def _data_text(data: dict[str, Any]) -> str:
    cells = data.get("cells", {})
    counts = ", ".join(f"{count:,} {label}" for label, count in cells.items())
    # The folder's name only: the full path is the training machine's, not the reader's.
    folder = Path(str(data.get("folder", "?"))).name or "?"
    return f"{folder}: {counts} cells of {data.get('patients', '?')} patients"


def _split_text(split: dict[str, Any], summary: dict[str, Any]) -> str:
    parts = [
        f"{name} {values.get('patients', '?')} patients / {values.get('cells', 0):,} cells"
        for name, values in summary.items()
    ]
    return f"seed {split.get('seed', '?')}: " + "; ".join(parts)


def _figure(figures: dict[str, go.Figure], name: str, component_id: str) -> html.Div:
    if name in figures:
        return dcc.Graph(id=component_id, figure=figures[name])
    return html.P(
        f"No {name.replace('_', ' ')} saved for this model. Run `malaria evaluate --model "
        f"MODEL --data DIR --output <model folder>/{EVALUATION_FOLDER}` to add it.",
        id=component_id,
        className="text-muted",
    )
