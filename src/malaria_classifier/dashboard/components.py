"""Reusable pieces of the page, each a pure function of plain data.

Colours carry meaning consistently: red (``danger``) for Parasitized, green (``success``)
for Uninfected, grey for files that could not be classified.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dash_ag_grid as dag
import dash_bootstrap_components as dbc
from dash import html

from malaria_classifier.constants import POSITIVE_CLASS
from malaria_classifier.dashboard import ids

DECISION_COLOURS = {
    "Parasitized": "danger",
    "Uninfected": "success",
    "Uncertain": "warning",
    "Not a cell": "secondary",
}
VERDICT_COLOURS = {"positive": "danger", "negative": "success", "indeterminate": "warning"}
TABLE_COLUMNS = (
    ("filename", "File"),
    ("decision", "Decision"),
    ("label", "Label"),
    ("probability", "P(Parasitized)"),
    ("confidence", "Confidence"),
    ("error", "Error"),
)


def result_card(result: dict[str, Any], show_why: bool) -> dbc.Card:
    """One file's card: the cell, the decision, P(Parasitized) and a confidence bar."""
    if result.get("error"):
        return _error_card(result)
    decision = result.get("decision") or result["label"]
    colour = DECISION_COLOURS.get(decision, "secondary")
    picture = result.get("heat_map") if show_why and result.get("heat_map") else result["image"]
    caption = "Grad-CAM: bright = what drove the answer" if show_why else "What the model sees"
    details = [
        html.Div(caption, className="image-caption"),
        html.Div(result["filename"], className="file-name", title=result["filename"]),
        html.H5(decision, className=f"text-{colour} result-label"),
    ]
    if decision == "Not a cell":
        details.append(html.P(_reason_text(result), className="small text-muted reason"))
    else:
        details += _score_lines(result, decision, colour)
    return dbc.Card(
        [
            dbc.CardImg(src=picture, className="cell-image", alt=f"cell {result['filename']}"),
            dbc.CardBody(details),
        ],
        className="result-card",
        color=colour,
        outline=True,
    )


def _score_lines(result: dict[str, Any], decision: str, colour: str) -> list[Any]:
    lines = [
        html.Div(f"P(Parasitized) = {result['probability']:.3f}", className="probability"),
        dbc.Progress(
            value=round(100 * result["confidence"], 1),
            label=f"{100 * result['confidence']:.1f}% confident",
            color=colour,
            className="confidence-bar",
        ),
    ]
    if decision == "Uncertain":
        lines.append(
            html.P(
                f"Leans {result['label']}. {_reason_text(result)} Have a person look.",
                className="small text-muted reason mt-1",
            )
        )
    return lines


def _reason_text(result: dict[str, Any]) -> str:
    reason = result.get("reason") or ""
    return reason[:1].upper() + reason[1:] + ("" if reason.endswith(".") else ".") if reason else ""


def _error_card(result: dict[str, Any]) -> dbc.Card:
    return dbc.Card(
        dbc.CardBody(
            [
                html.Div(result["filename"], className="file-name", title=result["filename"]),
                html.H5("Not classified", className="text-secondary result-label"),
                html.P(result["error"], className="error-message small"),
            ]
        ),
        className="result-card error-card",
        color="secondary",
        outline=True,
    )


def result_cards(results: Sequence[dict[str, Any]], show_why: bool) -> list[dbc.Col]:
    """A responsive grid of cards, in the results' order (the upload box sorts by file name)."""
    return [dbc.Col(result_card(result, show_why), xs=6, md=4, lg=3, xl=2) for result in results]


def summary_panel(summary: dict[str, Any]) -> html.Div:
    """Counts per decision, the parasitized share, and the batch verdict with its caveats."""
    if summary["files"] == 0:
        return html.Div("No images yet: upload cell images or pick an example.", className="muted")
    share = summary["parasitized_share"]
    share_text = "—" if share is None else f"{100 * share:.1f}%"
    items = [("Files", summary["files"], "secondary")]
    items += [
        (decision, count, DECISION_COLOURS[decision])
        for decision, count in summary["decisions"].items()
    ]
    items += [
        ("Not classified", summary["failed"], "secondary"),
        ("Parasitized share", share_text, "dark"),
    ]
    badges = [
        html.Span([html.Span(name + ": "), dbc.Badge(str(value), color=colour)], className="me-3")
        for name, value, colour in items
    ]
    return html.Div(
        [
            html.Div(badges, className="summary-badges"),
            _verdict_line(summary),
            html.Small(
                "Parasitized share = Parasitized cells / usable cells (not counting Not a cell "
                "or failed files): a parasitemia estimate only if the batch holds every red "
                "cell of the field. Screening aid, not a diagnosis: confirm by microscopy.",
                className="text-muted",
            ),
        ]
    )


def _verdict_line(summary: dict[str, Any]) -> html.Div:
    verdict = summary.get("verdict")
    if not verdict:
        return html.Div()
    confidence = verdict["confidence"]
    confidence_text = "" if confidence is None else f" (confidence {confidence:.2f})"
    return html.Div(
        [
            html.Span("If these cells are one patient's: "),
            dbc.Badge(
                verdict["verdict"] + confidence_text,
                color=VERDICT_COLOURS.get(verdict["verdict"], "secondary"),
                className="verdict-badge",
            ),
            html.Small(
                f" from {summary['cells']} usable cells; the rule was chosen on validation "
                f"patients (see the Model tab).",
                className="text-muted",
            ),
        ],
        className="my-1",
    )


def results_table(results: Sequence[dict[str, Any]]) -> dag.AgGrid:
    """A sortable, filterable grid with one row per file (AG Grid)."""
    return dag.AgGrid(
        id=ids.TABLE,
        columnDefs=[_column(key, title) for key, title in TABLE_COLUMNS],
        rowData=table_rows(results),
        defaultColDef={"sortable": True, "filter": True, "resizable": True},
        columnSize="responsiveSizeToFit",
        dashGridOptions={
            "pagination": True,
            "paginationPageSize": 25,
            "paginationPageSizeSelector": [25, 100, 500],
        },
        rowClassRules={
            "row-parasitized": "params.data.decision == 'Parasitized'",
            "row-uninfected": "params.data.decision == 'Uninfected'",
            "row-uncertain": "params.data.decision == 'Uncertain'",
        },
        className="ag-theme-alpine results-grid",
    )


def _column(key: str, title: str) -> dict[str, Any]:
    column: dict[str, Any] = {"field": key, "headerName": title}
    if key in ("probability", "confidence"):
        column["filter"] = "agNumberColumnFilter"
        column["valueFormatter"] = {
            "function": "params.value == null ? '' : d3.format('.4f')(params.value)"
        }
    return column


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table cells: the fields of ``malaria predict``, without the images."""
    return [{key: result.get(key) for key, _ in TABLE_COLUMNS} for result in results]


def example_gallery(thumbnails: Sequence[tuple[str, str]]) -> html.Div:
    """Clickable thumbnails; ``thumbnails`` holds (file name, PNG data URL) pairs."""
    buttons = [
        html.Button(
            html.Img(src=url, alt=name, className="example-image"),
            id={"type": ids.EXAMPLE_BUTTON, "index": index},
            title=f"Classify {name}",
            className="example-button",
            n_clicks=0,
        )
        for index, (name, url) in enumerate(thumbnails)
    ]
    return html.Div(
        [html.H6("Examples: click one to classify it"), html.Div(buttons, className="gallery")],
        id=ids.EXAMPLES,
    )


def metrics_table(metrics: dict[str, Any]) -> dbc.Table:
    """Validation and test metrics from a model card, each with its 95% CI."""
    splits = [split for split in ("validation", "test") if split in metrics]
    names = list(metrics[splits[0]]["metrics"]) if splits else []
    header = html.Thead(
        html.Tr(
            [html.Th(f"metric (cells, threshold {_threshold(metrics, splits)})")]
            + [
                html.Th(
                    f"{split}: {metrics[split]['patients']} patients, "
                    f"{metrics[split]['cells']:,} cells"
                )
                for split in splits
            ]
        )
    )
    body = html.Tbody(
        [
            html.Tr(
                [html.Td(name)]
                + [
                    html.Td(_value_with_interval(metrics[split]["metrics"][name]))
                    for split in splits
                ]
            )
            for name in names
        ]
    )
    return dbc.Table([header, body], bordered=True, size="sm", className="metrics-table")


def _threshold(metrics: dict[str, Any], splits: list[str]) -> str:
    values = {round(float(metrics[split].get("threshold", 0.5)), 3) for split in splits}
    return " / ".join(f"{value:g}" for value in sorted(values))


def _value_with_interval(entry: dict[str, Any]) -> str:
    low, high = entry["ci95"]
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def positive_class_note() -> html.Small:
    """The sentence every metric display needs."""
    return html.Small(
        f"Positive class = {POSITIVE_CLASS}. Metrics are over cells of patients the model "
        f"never saw in training; 95% confidence intervals come from a bootstrap over patients.",
        className="text-muted",
    )
