"""Entry point for production servers, e.g. several gunicorn workers:

    MALARIA_MODEL=runs/my-run/model.keras \\
    gunicorn --workers 2 --bind 127.0.0.1:8050 \\
        "malaria_classifier.dashboard.wsgi:create_server()"

Each worker calls :func:`create_server` once and loads its own copy of the model (the
default model takes about 0.5 MB of weights). Settings come from the environment:
``MALARIA_MODEL`` (a ``.keras`` file; default: the bundled model) and
``MALARIA_EXAMPLES`` (a folder for the example gallery).
"""

from __future__ import annotations

import os

from flask import Flask


def create_server() -> Flask:
    """Load the model and return the Flask server of a new dashboard."""
    from malaria_classifier.dashboard.app import create_app
    from malaria_classifier.prediction import Predictor

    model = os.environ.get("MALARIA_MODEL") or None
    examples = os.environ.get("MALARIA_EXAMPLES") or None
    return create_app(Predictor(model), examples=examples).server
