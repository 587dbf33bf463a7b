"""The Plotly Dash dashboard: upload cell images, see label, confidence and why.

``create_app(predictor)`` builds the app around a loaded model; ``malaria dashboard``
runs it. Modules: ``ids`` (component ids), ``uploads`` (limits, decoding, prediction;
no Dash), ``components`` and ``model_page`` (pieces of the page), ``layout``,
``callbacks`` (plain functions + wiring), ``api`` (``POST /api/predict``), ``app``,
``wsgi`` (gunicorn entry point); styles and the upload check in ``assets/``.
"""

from malaria_classifier.dashboard.app import create_app, run_dashboard

__all__ = ["create_app", "run_dashboard"]
