"""Reusable pieces of the page, each a pure function of plain data.

Colours carry meaning consistently: red (``danger``) for Parasitized, green (``success``)
for Uninfected, grey for files that could not be classified.
"""

from __future__ import annotations

import re
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
    ("reason", "Reason"),
    ("error", "Error"),
)
# Bootstrap's warning yellow on white reads at 1.6:1; its darker "emphasis" amber passes
# WCAG AA (4.5:1) for text, and badges in yellow get dark text.
TEXT_CLASSES = {"warning": "text-warning-emphasis"}
CARDS_PER_PAGE = 60
# The engineer's signal names in a Not-a-cell reason, e.g. "(thickness, foreground_red)":
# kept in the CSV and the card's tooltip, left off the card's text.
_SIGNAL_NAMES = re.compile(r" \([a-z0-9_]+(?:, [a-z0-9_]+)*\)")


def result_card(result: dict[str, Any], show_why: bool) -> dbc.Card:
    """One file's card: the cell, the decision, P(Parasitized) and a confidence bar."""
    if result.get("error"):
        return _error_card(result)
    decision = result.get("decision") or result["label"]
    colour = DECISION_COLOURS.get(decision, "secondary")
    heat_map = bool(show_why and result.get("heat_map"))
    picture = result["heat_map"] if heat_map else result["image"]
    caption = "Grad-CAM: bright = what drove the answer" if show_why else "What the model sees"
    alt = f"{'Grad-CAM heat map over' if heat_map else 'Model input view of'} {result['filename']}"
    details = [
        html.Div(caption, className="image-caption"),
        html.Div(result["filename"], className="file-name", title=result["filename"]),
        html.H5(decision, className=f"{text_class(colour)} result-label"),
    ]
    if decision == "Not a cell":
        reason = _reason_text(result)
        details.append(
            html.P(_SIGNAL_NAMES.sub("", reason), className="small text-muted reason", title=reason)
        )
    else:
        details += _score_lines(result, decision, colour)
    return dbc.Card(
        [
            dbc.CardImg(src=picture, className="cell-image", alt=alt),
            dbc.CardBody(details),
        ],
        className="result-card",
        color=colour,
        outline=True,
    )


def text_class(colour: str) -> str:
    """The Bootstrap text class for a decision colour, readable on white."""
    return TEXT_CLASSES.get(colour, f"text-{colour}")


def _score_lines(result: dict[str, Any], decision: str, colour: str) -> list[Any]:
    probability = html.Div(f"P(Parasitized) = {result['probability']:.3f}", className="probability")
    if decision == "Uncertain":
        # No confidence bar: near the threshold "confidence" in the leaning label is
        # about 50% and reads as a contradiction; the reason names the threshold.
        return [
            probability,
            html.P(
                f"{_reason_text(result)} Leans {result['label']}. Have a person look.",
                className="small text-muted reason mt-1",
            ),
        ]
    return [
        probability,
        dbc.Progress(
            value=round(100 * result["confidence"], 1),
            label=f"{100 * result['confidence']:.1f}% confident",
            color=colour,
            className="confidence-bar",
        ),
    ]


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


def result_cards(results: Sequence[dict[str, Any]], show_why: bool, page: int = 1) -> list[dbc.Col]:
    """One page of cards, in the results' order (the upload box sorts by file name).

    A page holds :data:`CARDS_PER_PAGE` cards: a thousand cards with their pictures at
    once kept the browser busy for a minute and a half; the table lists every file.
    """
    start = (max(page, 1) - 1) * CARDS_PER_PAGE
    return [
        dbc.Col(result_card(result, show_why), xs=6, md=4, lg=3, xl=2)
        for result in results[start : start + CARDS_PER_PAGE]
    ]


def card_pages(results: Sequence[dict[str, Any]]) -> int:
    """How many pages of cards the results fill (at least one)."""
    return max(1, -(-len(results) // CARDS_PER_PAGE))


def summary_panel(summary: dict[str, Any]) -> html.Div:
    """Counts per decision, the parasitized share, and the batch verdict with its caveats."""
    if summary["files"] == 0:
        return html.Div("No images yet: upload cell images or pick an example.", className="muted")
    share = summary["parasitized_share"]
    share_text = "—" if share is None else f"{100 * share:.1f}%"
    if share is not None and summary.get("parasitized_share_high", share) > share:
        share_text += f" to {100 * summary['parasitized_share_high']:.1f}%"
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
        html.Span([html.Span(name + ": "), _badge(str(value), colour)], className="me-3")
        for name, value, colour in items
    ]
    return html.Div(
        [
            html.Div(badges, className="summary-badges"),
            _duplicate_names_warning(summary.get("duplicate_names", {})),
            _repeated_files_note(summary.get("repeated_files", 0)),
            _verdict_line(summary),
            html.Small(
                "Parasitized share = Parasitized cells / usable cells (not counting Not a cell "
                "or failed files); when some cells are Uncertain it is a range, from none to "
                "all of them parasitized. A parasitemia estimate only if the batch holds every "
                "red cell of the field. Screening aid, not a diagnosis: confirm by microscopy.",
                className="text-muted",
            ),
        ]
    )


def _badge(text: str, colour: str, **kwargs: Any) -> dbc.Badge:
    """A badge whose text stays readable: dark on yellow, white on the other colours."""
    dark_text = {"text_color": "dark"} if colour == "warning" else {}
    return dbc.Badge(text, color=colour, **dark_text, **kwargs)


def _duplicate_names_warning(duplicates: dict[str, int]) -> html.Div:
    """Say which names came more than once: the browser sends names without folders."""
    if not duplicates:
        return html.Div()
    names = ", ".join(f"{name} ({count} files)" for name, count in sorted(duplicates.items()))
    return dbc.Alert(
        f"Several files share a name: {names}. The browser sends file names without their "
        f"folders, so their cards, rows and CSV lines cannot be told apart. Upload one "
        f"folder per batch, or rename the files.",
        color="warning",
        className="py-1 my-1 small",
    )


def _repeated_files_note(repeated: int) -> html.Div:
    """Say that files repeating an earlier file's picture were counted once."""
    if not repeated:
        return html.Div()
    files = "file repeats" if repeated == 1 else "files repeat"
    return dbc.Alert(
        f"{repeated} {files} the picture of another file in this batch (the same bytes): "
        f"each picture counts once in the cells, the parasitized share and the verdict.",
        color="warning",
        className="py-1 my-1 small",
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
            _badge(
                verdict["verdict"] + confidence_text,
                VERDICT_COLOURS.get(verdict["verdict"], "secondary"),
                className="verdict-badge",
            ),
            html.Small(
                " " + verdict_explanation(summary["cells"], verdict), className="text-muted"
            ),
        ],
        className="my-1",
    )


def verdict_explanation(cells: int, verdict: dict[str, Any]) -> str:
    """Why the batch got its verdict, in words, and what the confidence means."""
    counted = f"from {cells:,} usable {'cell' if cells == 1 else 'cells'}"
    needed = verdict.get("min_suspicious_cells", 1)
    suspicious = "1 very suspicious cell" if needed == 1 else f"{needed} very suspicious cells"
    if verdict["verdict"] == "indeterminate":
        return (
            f"{counted}: too few to rule malaria out (a negative needs at least "
            f"{verdict.get('min_cells', 20)}). Upload more of the patient's cells."
        )
    if verdict["verdict"] == "positive":
        meaning = (
            f"at least {suspicious}; confidence is the calibrated P(Parasitized) of the "
            f"weakest cell this rests on"
        )
    else:
        found = "no very suspicious cell" if needed == 1 else f"fewer than {suspicious}"
        meaning = (
            f"{found}; confidence is 1 − the calibrated P(Parasitized) of the most suspicious cell"
        )
    return f"{counted}: {meaning}. The rule was chosen on validation patients (see the Model tab)."


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
    if key == "filename":
        # Numbers in names compared as numbers (cell_9 before cell_10), as the cards are.
        column["comparator"] = {"function": "malariaNaturalCompare"}
    if key in ("reason", "error"):
        column["tooltipField"] = key  # long texts: the whole of it on hover
    if key in ("probability", "confidence"):
        column["filter"] = "agNumberColumnFilter"
        column["valueFormatter"] = {
            "function": "params.value == null ? '' : d3.format('.4f')(params.value)"
        }
    return column


def table_rows(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Table cells: the fields of ``malaria predict``, without the images."""
    return [{key: result.get(key) for key, _ in TABLE_COLUMNS} for result in results]


def example_gallery(thumbnails: Sequence[tuple[str, str, str]]) -> html.Details:
    """Clickable thumbnails; ``thumbnails`` holds (file name, PNG data URL, label) triples,
    the label being the class folder of the file ("" when it is in none).

    Folded away once a batch is uploaded, and its heading says a click replaces the
    results: a stray click above a 200-cell batch must not lose it unannounced.
    """
    buttons = [
        html.Div(
            [
                html.Button(
                    html.Img(src=url, alt=_filed_as(name, label), className="example-image"),
                    id={"type": ids.EXAMPLE_BUTTON, "index": index},
                    title=f"Classify {_filed_as(name, label)}",
                    className="example-button",
                    n_clicks=0,
                ),
                html.Div(
                    label,
                    className=f"example-label {text_class(DECISION_COLOURS.get(label, 'muted'))}",
                ),
            ],
            className="example",
        )
        for index, (name, url, label) in enumerate(thumbnails)
    ]
    return html.Details(
        [
            html.Summary(
                "Example cells: click one to classify it (this replaces the current results)",
                className="gallery-heading",
            ),
            html.Div(buttons, className="gallery"),
        ],
        id=ids.EXAMPLES,
        open=True,
    )


def _filed_as(name: str, label: str) -> str:
    return f"{name} (filed as {label})" if label else name


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
    if entry["value"] is None:
        return "undefined"
    if low is None or high is None:
        return f"{entry['value']:.3f}"
    return f"{entry['value']:.3f} [{low:.3f}, {high:.3f}]"


def positive_class_note() -> html.Small:
    """The sentence every metric display needs."""
    return html.Small(
        f"Positive class = {POSITIVE_CLASS}. Metrics are over cells of patients the model "
        f"never saw in training; 95% confidence intervals come from a bootstrap over patients.",
        className="text-muted",
    )
