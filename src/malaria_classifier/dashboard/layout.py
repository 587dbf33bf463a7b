"""The page: a "Classify" tab (upload, progress, summary, cards, table) and a "Model" tab."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import dash_bootstrap_components as dbc
from dash import dcc, html

from malaria_classifier.dashboard import ids
from malaria_classifier.dashboard.components import (
    example_gallery,
    results_table,
    summary_panel,
)
from malaria_classifier.dashboard.uploads import UploadLimits, batch_summary

TITLE = "Malaria cell classifier"


def build_layout(
    limits: UploadLimits,
    model_name: str,
    model_page: html.Div,
    example_thumbnails: Sequence[tuple[str, str, str]] = (),
) -> dbc.Container:
    """The whole page; the model page is built once at start-up by the caller."""
    return dbc.Container(
        [
            dcc.Store(id=ids.RESULTS_STORE, data=[]),
            dcc.Store(id=ids.PENDING_UPLOAD),
            dcc.Store(id=ids.LIMITS_STORE, data=asdict(limits)),
            dcc.Download(id=ids.DOWNLOAD),
            _header(model_name),
            dbc.Tabs(
                [
                    dbc.Tab(
                        _classify_tab(limits, example_thumbnails),
                        label="Classify",
                        tab_id="classify",
                    ),
                    dbc.Tab(model_page, label="Model", tab_id="model", className="pt-3"),
                ],
                id=ids.TABS,
                active_tab="classify",
            ),
        ],
        fluid=True,
        className="app-container",
    )


def _header(model_name: str) -> html.Div:
    return html.Div(
        [
            html.H1(TITLE, className="h2 mb-0"),
            html.Div(
                [
                    "Giemsa-stained thin-smear red-cell crops → ",
                    html.Span("Parasitized", className="text-danger fw-bold"),
                    " or ",
                    html.Span("Uninfected", className="text-success fw-bold"),
                    f" · model: {model_name}",
                ],
                className="text-muted",
            ),
        ],
        className="app-header",
    )


def _classify_tab(
    limits: UploadLimits, example_thumbnails: Sequence[tuple[str, str, str]]
) -> html.Div:
    return html.Div(
        [
            dcc.Upload(
                id=ids.UPLOAD,
                children=html.Div(
                    [
                        html.Strong("Drag and drop cell images here, or click to browse"),
                        html.Div(
                            f"One or many files: {limits.describe()}. Each upload is a new batch.",
                            id=ids.UPLOAD_LIMITS_TEXT,
                            className="small text-muted",
                        ),
                    ]
                ),
                multiple=True,
                # No ``accept`` filter: the browser would drop other files silently, and a
                # user must see on its own card why a file was not classified.
                className="upload-box",
            ),
            html.Div(
                [
                    # A spinner, not a progress bar: one request has no progress to report,
                    # and a bar at 100% would tell a screen reader the work is done.
                    dbc.Spinner(size="sm", color="primary", spinner_class_name="me-2"),
                    # A live region: screen readers announce "Classifying N files…".
                    html.Span(id=ids.PROGRESS_TEXT, className="small", role="status"),
                ],
                id=ids.PROGRESS,
                className="my-2",
                style={"display": "none"},
            ),
            example_gallery(example_thumbnails) if example_thumbnails else html.Div(),
            # Hidden while a new batch is classified, so the last batch's summary, verdict
            # and CSV cannot be read or downloaded as if they were the new one's.
            html.Div(_results_area(), id=ids.RESULTS_AREA),
        ],
        className="pt-3",
    )


def _results_area() -> list[Any]:
    """Summary, verdict, the CSV button, the cards and the table of the last batch."""
    return [
        dbc.Row(
            [
                dbc.Col(
                    # Announced when it changes: the counts and verdict of a new batch.
                    html.Div(
                        summary_panel(batch_summary([])), id=ids.SUMMARY, **{"aria-live": "polite"}
                    ),
                    md=9,
                ),
                dbc.Col(
                    [
                        dbc.Switch(
                            id=ids.SHOW_WHY,
                            label="Show why (Grad-CAM heat map)",
                            value=False,
                        ),
                        dbc.Button(
                            "Download CSV",
                            id=ids.DOWNLOAD_BUTTON,
                            color="primary",
                            size="sm",
                            disabled=True,
                        ),
                    ],
                    md=3,
                    className="text-md-end",
                ),
            ],
            className="my-3 align-items-center",
        ),
        dcc.Loading(
            [
                dbc.Row(id=ids.CARDS, className="g-3 mb-2"),
                dbc.Pagination(
                    id=ids.CARD_PAGER,
                    max_value=1,
                    active_page=1,
                    fully_expanded=False,
                    previous_next=True,
                    size="sm",
                    style={"display": "none"},
                    className="mb-3",
                ),
                html.H5("All results (click a column to sort)"),
                results_table([]),
            ],
            type="default",
        ),
    ]
