"""A TensorFlow-free copy of a trained model, so prediction starts in a second.

Importing TensorFlow takes 4-6 s on two cores: most of ``malaria predict``'s start-up,
for a forward pass that ONNX Runtime runs faster anyway. Beside ``model.keras`` we
therefore keep ``model.serving.onnx`` (the network with two outputs, probabilities
and penultimate features, as ``ood.feature_model`` builds it) and
``model.serving.json`` (the input size, the final layer's weights for the Not-a-cell
energy score, and the SHA-256 of the ``.keras`` file it was converted from).

:func:`read_serving_copy` returns the copy only when that hash matches the ``.keras``
file now on disk, so a retrained or replaced model never runs on a stale graph; the
:class:`~malaria_classifier.prediction.Predictor` then falls back to converting the
``.keras`` model in memory (which needs TensorFlow). ``malaria train`` writes the
copy; ``write_serving_copy`` makes one for any model.

This module imports no TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.images import sha256_of_file
from malaria_classifier.model_card import write_json_atomically

ONNX_SUFFIX = ".serving.onnx"
INFO_SUFFIX = ".serving.json"
# 2: CellStandardization learned to treat a light smear around the cell as background;
# a copy converted before that would disagree with the .keras model on such crops.
FORMAT_VERSION = 2

LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingCopy:
    """What prediction needs from a model, without Keras.

    Attributes:
        onnx_bytes: The two-output graph (``probabilities``, ``features``).
        image_size: Side of the square uint8 input.
        final_kernel: The softmax layer's kernel ``(features, classes)``.
        final_bias: Its bias ``(classes,)``.
        onnx_sha256: SHA-256 of ``onnx_bytes`` (checked when read): which copy this is.
    """

    onnx_bytes: bytes
    image_size: int
    final_kernel: np.ndarray
    final_bias: np.ndarray
    onnx_sha256: str = ""

    @property
    def final_layer(self) -> tuple[np.ndarray, np.ndarray]:
        return self.final_kernel, self.final_bias


def serving_paths(model_path: str | Path) -> tuple[Path, Path]:
    """``model.keras`` -> (``model.serving.onnx``, ``model.serving.json``)."""
    model_path = Path(model_path)
    stem = model_path.with_suffix("")
    return stem.with_name(stem.name + ONNX_SUFFIX), stem.with_name(stem.name + INFO_SUFFIX)


def write_serving_copy(model: Any, model_path: str | Path) -> Path:
    """Convert a loaded Keras ``model`` (saved at ``model_path``) and write its copy.

    The ONNX file is written before the JSON that vouches for it, each atomically, so
    an interrupted write leaves no copy that :func:`read_serving_copy` would accept.

    Returns:
        The path of the ``.serving.onnx`` file.
    """
    from malaria_classifier.export import convert_to_onnx, write_bytes_atomically
    from malaria_classifier.ood import feature_model, final_layer_weights

    model_path = Path(model_path)
    onnx_path, info_path = serving_paths(model_path)
    kernel, bias = final_layer_weights(model)
    write_bytes_atomically(convert_to_onnx(feature_model(model)), onnx_path)
    info = {
        "format_version": FORMAT_VERSION,
        "source_model": model_path.name,
        "source_model_sha256": sha256_of_file(model_path),
        "onnx_sha256": sha256_of_file(onnx_path),
        "image_size": int(model.input_shape[1]),
        "outputs": ["probabilities", "features"],
        "final_kernel": kernel.tolist(),
        "final_bias": bias.tolist(),
    }
    write_json_atomically(info, info_path)
    return onnx_path


def read_serving_copy(model_path: str | Path) -> ServingCopy | None:
    """The model's serving copy, or None when it is missing, unreadable or stale.

    Never raises for a bad copy: the caller can always convert the ``.keras`` file.
    """
    model_path = Path(model_path)
    onnx_path, info_path = serving_paths(model_path)
    if not (onnx_path.is_file() and info_path.is_file() and model_path.is_file()):
        return None
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
        onnx_bytes = onnx_path.read_bytes()
        onnx_sha256 = hashlib.sha256(onnx_bytes).hexdigest()
        fresh = (
            info.get("format_version") == FORMAT_VERSION
            and info.get("source_model_sha256") == sha256_of_file(model_path)
            and info.get("onnx_sha256") == onnx_sha256
        )
        if not fresh:
            LOGGER.info(
                "%s does not match %s; converting the model instead.", onnx_path, model_path
            )
            return None
        return ServingCopy(
            onnx_bytes=onnx_bytes,
            image_size=int(info["image_size"]),
            final_kernel=np.asarray(info["final_kernel"], dtype=np.float64),
            final_bias=np.asarray(info["final_bias"], dtype=np.float64),
            onnx_sha256=onnx_sha256,
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        LOGGER.info("Ignoring the serving copy of %s (%s).", model_path, error)
        return None
