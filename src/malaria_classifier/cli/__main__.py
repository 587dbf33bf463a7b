"""``python -m malaria_classifier.cli``: the ``malaria`` command without its script."""

from malaria_classifier.cli import app

app()
