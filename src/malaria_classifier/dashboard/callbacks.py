"""Callbacks: decode the input, call the library, build components; nothing else.

Each callback is a plain function (tested as such) that :func:`register_callbacks` wires
to the page. State lives in the browser (``dcc.Store``), so any server worker can answer
any request and several workers can run side by side.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dash import ALL, ClientsideFunction, Dash, Input, Output, State, ctx, dcc
from dash.exceptions import PreventUpdate

from malaria_classifier.dashboard import ids
from malaria_classifier.dashboard.components import (
    card_pages,
    result_cards,
    summary_panel,
    table_rows,
)
from malaria_classifier.dashboard.uploads import (
    CellResult,
    Upload,
    UploadLimits,
    add_heat_maps,
    batch_summary,
    classify_uploads,
    read_example,
    receive_browser_uploads,
    results_csv,
    results_to_dicts,
)

LOGGER = logging.getLogger(__name__)


@dataclass
class DashboardContext:
    """What the callbacks need, loaded once at start-up and shared by every request."""

    predictor: Any
    explainer: Any
    limits: UploadLimits = field(default_factory=UploadLimits)
    examples: list[Path] = field(default_factory=list)


def classify_pending(
    context: DashboardContext, pending: dict[str, Any] | None, show_why: bool
) -> list[dict[str, Any]]:
    """Classify a batch taken from the upload box (sorted by file name in the browser)."""
    if not pending or not pending.get("filenames"):
        raise PreventUpdate
    uploads = receive_browser_uploads(pending["contents"], pending["filenames"], context.limits)
    return _classify_safely(context, uploads, show_why)


def classify_example(
    context: DashboardContext, triggered_index: int | None, clicks: int | None, show_why: bool
) -> list[dict[str, Any]]:
    """Classify the gallery image that was clicked (chosen by index, never by a path)."""
    if triggered_index is None or not clicks:
        raise PreventUpdate
    if not 0 <= triggered_index < len(context.examples):
        raise PreventUpdate
    upload = read_example(context.examples[triggered_index], context.limits)
    return _classify_safely(context, [upload], show_why)


def _classify_safely(
    context: DashboardContext, uploads: list[Upload], show_why: bool
) -> list[dict[str, Any]]:
    """Classify, turning an unexpected server failure into a message on every card.

    Per-file problems (bad images, limits) are handled file by file upstream; this only
    catches what should never happen, so the user sees why nothing came back instead
    of a page that silently stays empty. The traceback goes to the server log.
    """
    explainer = context.explainer if show_why else None
    try:
        return results_to_dicts(classify_uploads(context.predictor, uploads, explainer))
    except Exception as error:  # noqa: BLE001 - the boundary between server and user
        LOGGER.exception("Classifying a batch of %d files failed", len(uploads))
        message = (
            f"not classified: the server failed ({type(error).__name__}: {error}). Try "
            f"again; if it keeps failing, report it with this file."
        )
        return results_to_dicts(
            CellResult(upload.filename, "", None, None, f"{upload.filename}: {message}")
            for upload in uploads
        )


def explain_results(
    context: DashboardContext, show_why: bool, results: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """Add Grad-CAM overlays to the current results when the switch is turned on."""
    if not show_why or not results:
        raise PreventUpdate
    updated = add_heat_maps(context.explainer, results)
    if updated is results:
        raise PreventUpdate
    return updated


def render_results(
    results: list[dict[str, Any]] | None,
    show_why: bool,
    verdict_rule: Any = None,
    page: int | None = 1,
) -> tuple[list[Any], list[dict[str, Any]], Any, bool, int, dict[str, str]]:
    """Cards of one page, table rows, summary (with the batch verdict), the CSV button's
    state, and the card pager's page count and style (hidden when one page holds all)."""
    results = results or []
    pages = card_pages(results)
    return (
        result_cards(results, bool(show_why), min(page or 1, pages)),
        table_rows(results),
        summary_panel(batch_summary(results, verdict_rule)),
        not results,
        pages,
        {} if pages > 1 else {"display": "none"},
    )


def download_csv(clicks: int | None, results: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The batch as ``predictions.csv``, with the columns of ``malaria predict``."""
    if not clicks or not results:
        raise PreventUpdate
    return dcc.send_string(results_csv(results), "predictions.csv")


def register_callbacks(app: Dash, context: DashboardContext) -> None:
    """Wire the plain functions above to the page's components."""
    app.clientside_callback(
        ClientsideFunction(namespace="malaria", function_name="takeUpload"),
        Output(ids.PENDING_UPLOAD, "data"),
        Output(ids.UPLOAD, "contents"),
        Output(ids.UPLOAD, "filename"),
        Output(ids.PROGRESS_TEXT, "children"),
        Input(ids.UPLOAD, "contents"),
        State(ids.UPLOAD, "filename"),
        State(ids.LIMITS_STORE, "data"),
        prevent_initial_call=True,
    )

    # A new batch starts on the first page of cards with the table's filters cleared, so
    # a filter set on the last batch cannot hide rows of this one.
    new_batch = (
        Output(ids.RESULTS_STORE, "data", allow_duplicate=True),
        Output(ids.CARD_PAGER, "active_page", allow_duplicate=True),
        Output(ids.TABLE, "filterModel", allow_duplicate=True),
    )

    # While a batch is classified: the spinner shows and the last batch's results hide.
    while_classifying = [
        (Output(ids.PROGRESS, "style"), {"display": "block"}, {"display": "none"}),
        (Output(ids.RESULTS_AREA, "style"), {"display": "none"}, {}),
    ]

    @app.callback(
        *new_batch,
        Input(ids.PENDING_UPLOAD, "data"),
        State(ids.SHOW_WHY, "value"),
        running=while_classifying,
        prevent_initial_call=True,
    )
    def _classify_pending(pending, show_why):
        return classify_pending(context, pending, show_why), 1, {}

    if context.examples:

        @app.callback(
            *new_batch,
            Input({"type": ids.EXAMPLE_BUTTON, "index": ALL}, "n_clicks"),
            State(ids.SHOW_WHY, "value"),
            prevent_initial_call=True,
        )
        def _classify_example(_clicks, show_why):
            triggered = ctx.triggered_id
            index = triggered["index"] if isinstance(triggered, dict) else None
            clicks = ctx.triggered[0]["value"] if ctx.triggered else None
            return classify_example(context, index, clicks, show_why), 1, {}

        @app.callback(
            Output(ids.EXAMPLES, "open"),
            Input(ids.PENDING_UPLOAD, "data"),
            prevent_initial_call=True,
        )
        def _fold_examples(_pending):
            return False  # the user brought their own cells

    @app.callback(
        Output(ids.RESULTS_STORE, "data", allow_duplicate=True),
        Input(ids.SHOW_WHY, "value"),
        State(ids.RESULTS_STORE, "data"),
        prevent_initial_call=True,
    )
    def _explain_results(show_why, results):
        return explain_results(context, show_why, results)

    @app.callback(
        Output(ids.CARDS, "children"),
        Output(ids.TABLE, "rowData"),
        Output(ids.SUMMARY, "children"),
        Output(ids.DOWNLOAD_BUTTON, "disabled"),
        Output(ids.CARD_PAGER, "max_value"),
        Output(ids.CARD_PAGER, "style"),
        Input(ids.RESULTS_STORE, "data"),
        Input(ids.SHOW_WHY, "value"),
        Input(ids.CARD_PAGER, "active_page"),
    )
    def _render_results(results, show_why, page):
        return render_results(results, show_why, context.predictor.verdict_rule, page)

    @app.callback(
        Output(ids.DOWNLOAD, "data"),
        Input(ids.DOWNLOAD_BUTTON, "n_clicks"),
        State(ids.RESULTS_STORE, "data"),
        prevent_initial_call=True,
    )
    def _download_csv(clicks, results):
        return download_csv(clicks, results)
