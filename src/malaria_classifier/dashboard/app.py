"""Build the Dash app around a loaded model, and run it.

``create_app(predictor)`` takes a model that is already loaded, so the model is loaded
once per server process at start-up: never at import, never per request. For several
workers use gunicorn with :func:`malaria_classifier.dashboard.wsgi.create_server`.
"""

from __future__ import annotations

from pathlib import Path

from dash import Dash

from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.dashboard.api import register_api
from malaria_classifier.dashboard.callbacks import DashboardContext, register_callbacks
from malaria_classifier.dashboard.layout import TITLE, build_layout
from malaria_classifier.dashboard.model_page import load_evaluation_figures, model_page
from malaria_classifier.dashboard.uploads import (
    ACCEPTED_SUFFIXES,
    UploadLimits,
    classify_uploads,
    png_data_url,
)
from malaria_classifier.images import ImageLoadError, load_for_model

ASSETS = Path(__file__).parent / "assets"
MAX_EXAMPLES = 24
BOOTSTRAP_URL = "/vendor/bootstrap.min.css"


def create_app(
    predictor,
    examples: str | Path | None = None,
    limits: UploadLimits | None = None,
    explainer=None,
) -> Dash:
    """The dashboard for ``predictor`` (a loaded :class:`~malaria_classifier.Predictor`).

    Args:
        predictor: The model to serve, loaded once by the caller.
        examples: A folder of cell images offered as a click-to-classify gallery.
        limits: Upload size limits; the defaults suit single-cell crops.
        explainer: A Grad-CAM explainer; built from the predictor's model when None.
    """
    from malaria_classifier.explain import GradCam

    limits = limits or UploadLimits()
    example_paths = find_examples(Path(examples)) if examples else []
    context = DashboardContext(
        predictor=predictor,
        explainer=explainer or GradCam(predictor.model),
        limits=limits,
        examples=example_paths,
    )
    warm_up(context)
    app = Dash(
        __name__,
        title=TITLE,
        assets_folder=str(ASSETS),
        external_stylesheets=[BOOTSTRAP_URL],
        serve_locally=True,
    )
    # Screen readers pick their voice from the page's language.
    app.index_string = app.index_string.replace("<html>", '<html lang="en">', 1)
    serve_bootstrap_css(app.server)
    card = predictor.card
    figures = load_evaluation_figures(predictor.model_path, card)
    model_name = _model_name(predictor.model_path)
    app.layout = build_layout(
        limits,
        model_name=model_name,
        model_page=model_page(model_name, card, figures),
        example_thumbnails=example_thumbnails(example_paths, predictor.image_size),
    )
    register_callbacks(app, context)
    app.server.config["MAX_CONTENT_LENGTH"] = limits.request_bytes()
    register_api(app.server, predictor, limits)
    return app


def serve_bootstrap_css(server) -> None:
    """Serve Bootstrap's CSS from the installed Bootstrap-Flask package.

    dash-bootstrap-components points at a CDN by default; lab networks are often offline,
    and nothing at run time may be fetched from outside, so the page styles itself from a
    file installed with the package.
    """
    import flask_bootstrap
    from flask import send_from_directory

    folder = Path(flask_bootstrap.__file__).parent / "static" / "bootstrap5" / "css"

    @server.get(BOOTSTRAP_URL)
    def _bootstrap_css():
        return send_from_directory(folder, "bootstrap.min.css", max_age=24 * 3600)


def find_examples(folder: Path) -> list[Path]:
    """Up to 24 images in ``folder`` (recursively, sorted), for the gallery.

    Raises:
        ValueError: If the folder does not exist or holds no accepted images.
    """
    if not folder.is_dir():
        raise ValueError(f"--examples {folder}: not a folder. Give a folder of cell images.")
    found = sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in ACCEPTED_SUFFIXES and path.is_file()
    )
    if not found:
        raise ValueError(
            f"--examples {folder}: no images ({', '.join(ACCEPTED_SUFFIXES)}) found in it."
        )
    return _spread(found, MAX_EXAMPLES)


def _spread(paths: list[Path], count: int) -> list[Path]:
    """``count`` paths spread over the sorted list, so both class folders are represented."""
    if len(paths) <= count:
        return paths
    step = len(paths) / count
    return [paths[int(index * step)] for index in range(count)]


def example_thumbnails(paths: list[Path], size: int) -> list[tuple[str, str, str]]:
    """(name, PNG data URL, label) for each example; unreadable ones are left out.

    The label is the class folder the file sits in (NIH layout; empty otherwise), shown
    under the thumbnail so a first-time user can check the model against known answers.
    """
    thumbnails = []
    for path in paths:
        label = path.parent.name if path.parent.name in CLASS_NAMES else ""
        try:
            thumbnails.append((path.name, png_data_url(load_for_model(path, size)), label))
        except ImageLoadError:
            continue
    return thumbnails


def warm_up(context: DashboardContext) -> None:
    """Trace the model and Grad-CAM once, so the first user does not wait for it."""
    import numpy as np

    from malaria_classifier.dashboard.uploads import Upload
    from malaria_classifier.explain import encode_png

    blank = encode_png(np.zeros((8, 8, 3), dtype=np.uint8))
    classify_uploads(context.predictor, [Upload("warm-up.png", blank)], context.explainer)


def _model_name(model_path: Path) -> str:
    from malaria_classifier.model_card import DEFAULT_MODEL_DIR

    if Path(model_path).parent == DEFAULT_MODEL_DIR:
        return "bundled default (malaria_classifier/models/default/model.keras)"
    return str(model_path)


def run_dashboard(
    model: Path | None = None,
    host: str = "127.0.0.1",
    port: int = 8050,
    examples: Path | None = None,
    debug: bool = False,
) -> None:
    """Load the model once and serve the dashboard with Flask's built-in server."""
    from malaria_classifier.prediction import Predictor

    if examples is not None:
        find_examples(Path(examples))  # a wrong folder fails now, not after loading the model
    app = create_app(Predictor(model), examples=examples)
    app.run(host=host, port=port, debug=debug)
