"""Grad-CAM heat maps: which parts of a cell pushed the model towards its answer.

Grad-CAM (Selvaraju et al., 2017) weights the last convolution block's feature maps by
the gradient of the chosen class score and keeps the positive part. For these cells a
good model lights up the parasite's stained ring or trophozoite; a map that lights up the
black padding or the cell edge is a reason to distrust the answer.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from malaria_classifier.constants import POSITIVE_INDEX
from malaria_classifier.model import LAST_CONV_LAYER


class GradCam:
    """Compute Grad-CAM maps for a loaded model; build once, call per batch.

    Args:
        model: A Keras model from :func:`malaria_classifier.model.build_model`, which
            names its last convolution block ``last_conv``.

    Raises:
        ValueError: If the model has no layer named ``last_conv``.
    """

    def __init__(self, model) -> None:
        import keras
        import tensorflow as tf

        try:
            feature_layer = model.get_layer(LAST_CONV_LAYER)
        except ValueError:
            raise ValueError(
                f"This model has no layer named {LAST_CONV_LAYER!r}, so Grad-CAM cannot find "
                f"its last convolution block. Use a model trained with `malaria train`."
            ) from None
        self._model = keras.Model(model.inputs, [feature_layer.output, model.output])

        @tf.function(reduce_retracing=True)
        def maps_and_probabilities(batch):
            with tf.GradientTape() as tape:
                features, probabilities = self._model(batch, training=False)
                score = tf.gather(probabilities, POSITIVE_INDEX, axis=1)
                # Explain the class the model chose: Parasitized, or else Uninfected.
                chosen = tf.where(score >= 0.5, score, 1.0 - score)
            gradients = tape.gradient(chosen, features)
            weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
            maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))
            return maps, probabilities

        self._compute = maps_and_probabilities

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """Heat maps in [0, 1], one per image, at the input's resolution.

        Args:
            images: uint8 RGB batch of shape (n, size, size, 3), as the model takes it.
        """
        import tensorflow as tf

        maps, _ = self._compute(tf.convert_to_tensor(images, dtype=tf.uint8))
        maps = maps.numpy()
        peak = maps.max(axis=(1, 2), keepdims=True)
        maps = np.divide(maps, peak, out=np.zeros_like(maps), where=peak > 0)
        size = images.shape[1:3]
        return np.stack([_resize_map(heat_map, size) for heat_map in maps])


def _resize_map(heat_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray((heat_map * 255).astype(np.uint8), mode="L")
    resized = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32) / 255.0


def overlay_heat_map(image: np.ndarray, heat_map: np.ndarray, opacity: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heat map (inferno colours) over a uint8 RGB image of the same size.

    Where the map is near zero the cell shows through unchanged, so the overlay only
    marks the regions that mattered.
    """
    from matplotlib import colormaps

    colours = colormaps["inferno"](heat_map)[..., :3]
    alpha = opacity * heat_map[..., None]
    blended = (1.0 - alpha) * (image / 255.0) + alpha * colours
    return np.clip(blended * 255.0 + 0.5, 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray, display_size: int | None = None) -> bytes:
    """PNG bytes of a uint8 RGB array, optionally enlarged (bilinear) for display."""
    picture = Image.fromarray(image)
    if display_size and display_size != image.shape[0]:
        picture = picture.resize((display_size, display_size), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
