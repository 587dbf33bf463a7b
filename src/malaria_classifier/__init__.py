"""malaria-classifier: tell Parasitized from Uninfected red-blood-cell images.

The public API is small on purpose: :class:`Predictor` scores images with a trained
model, :func:`train_model` trains one, :func:`evaluate_model` measures one on unseen
patients. The command-line tool ``malaria`` wraps the same functions.
"""

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS

__version__ = "0.1.0"

__all__ = ["CLASS_NAMES", "POSITIVE_CLASS", "__version__"]
