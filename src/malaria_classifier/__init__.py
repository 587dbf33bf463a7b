"""malaria-classifier: tell Parasitized from Uninfected red-blood-cell images.

The public API is small on purpose: :class:`Predictor` scores images with a trained
model, :func:`train_model` trains one, :func:`evaluate_model` measures one on unseen
patients. The command-line tool ``malaria`` wraps the same functions.

They are imported lazily, so ``import malaria_classifier`` does not load TensorFlow
(``from malaria_classifier import *`` imports all of them, and with ``train_model``,
TensorFlow).
"""

from typing import Any as _Any

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS

__version__ = "0.1.0"

_LAZY = {
    "Predictor": "malaria_classifier.prediction",
    "train_model": "malaria_classifier.training",
    "evaluate_model": "malaria_classifier.evaluate",
    "TrainingConfig": "malaria_classifier.config",
}

__all__ = ["CLASS_NAMES", "POSITIVE_CLASS", "__version__", *_LAZY]


def __getattr__(name: str) -> _Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'malaria_classifier' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The public names, lazy ones included, for ``dir()`` and tab completion."""
    return sorted(__all__)
