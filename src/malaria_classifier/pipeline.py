"""tf.data input pipeline: decode, resize with padding, cache, shuffle, augment, batch.

Decoding and resizing use :func:`malaria_classifier.images.load_for_model`, the same
function prediction uses, so training and serving see identical pixels. Augmentation
is mapped over the training split only; the model itself normalizes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.decoding import iter_images
from malaria_classifier.images import ImageLoadError


def one_hot(labels: Sequence[str]) -> np.ndarray:
    """One-hot rows over CLASS_NAMES (Uninfected=0, Parasitized=1)."""
    indices = np.array([CLASS_NAMES.index(label) for label in labels], dtype=np.int64)
    return np.eye(len(CLASS_NAMES), dtype=np.float32)[indices]


def make_dataset(
    paths: Sequence[str | Path],
    labels: Sequence[str],
    config: TrainingConfig,
    training: bool,
) -> tf.data.Dataset:
    """Build the batched dataset for one split.

    Images are decoded once (first epoch) and cached in memory as uint8; the training
    split is reshuffled every epoch and augmented, other splits are left as they are.

    Raises:
        ImageLoadError: If a file cannot be read (run ``malaria data check`` first).
    """
    size = config.image_size
    path_strings = [str(path) for path in paths]
    targets = one_hot(labels)

    def generate() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for (image, error), target in zip(iter_images(path_strings, size), targets, strict=True):
            if error is not None:
                raise ImageLoadError(error, "stopped the input pipeline", "Remove or fix the file.")
            yield image, target

    dataset = tf.data.Dataset.from_generator(
        generate,
        output_signature=(
            tf.TensorSpec(shape=(size, size, 3), dtype=tf.uint8),
            tf.TensorSpec(shape=(len(CLASS_NAMES),), dtype=tf.float32),
        ),
    )
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(len(path_strings)))
    dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(
            len(path_strings), seed=config.randomness_seed, reshuffle_each_iteration=True
        )
    dataset = dataset.batch(config.batch_size)
    if training and config.augment:
        # One vectorized call per batch: per-image tf.image calls cost far more in
        # overhead than in arithmetic at 64x64 and starve training on two cores.
        dataset = dataset.map(make_batch_augmenter(config), num_parallel_calls=1)
    return dataset.prefetch(2)


# Y'IQ colour space: hue is an angle in the I-Q plane, so a stain's hue shift is a
# rotation there (the same idea as tf.image.adjust_hue, but per image in one batch op).
# NumPy, not tf.constant: creating a tensor at import would start TensorFlow's runtime,
# after which a multi-worker strategy can no longer be configured.
_RGB_TO_YIQ = np.array(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


def make_batch_augmenter(config: TrainingConfig):
    """Random symmetries, zoom/shift, stain-like colour jitter and other labs' looks.

    Cells have no up or left, so all eight symmetries of the square are valid (random
    transpose and flips). Zoom and shift fill with black, the NIH background. Then,
    for robustness to other laboratories (each off unless its config setting is set):
    the black background becomes a smear-like colour, as in crops that keep the smear;
    brightness, contrast, saturation, hue and per-channel gain imitate other Giemsa
    batches and white balances; a shrink-and-enlarge imitates small crops (a 15 px
    cell is enlarged to the model input when served); a Gaussian blur imitates focus.
    Each image gets its own random draw (the shrink size and blur width are drawn per
    batch, which images get them per image). Last, with ``mixup_alpha`` set, each
    image and its target are blended with a partner's (:func:`mixup`).
    """

    def augment(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # Symmetries only move pixels: on uint8 they move a quarter of the bytes.
        x = tf.cast(_random_symmetry(tf.convert_to_tensor(images)), tf.float32) / 255.0
        x = _random_zoom_and_shift(x, config)
        x = _random_background(x, config.background_probability)
        x = _random_colour(x, config)
        x = _random_low_resolution(x, config)
        x = _random_blur(x, config)
        if config.mixup_alpha > 0:
            x, targets = mixup(x, targets, config.mixup_alpha)
        return tf.cast(tf.clip_by_value(tf.round(x * 255.0), 0.0, 255.0), tf.uint8), targets

    return augment


def mixup(images: tf.Tensor, targets: tf.Tensor, alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
    """Blend each image and its target with a random partner's from the same batch.

    ``lambda ~ Beta(alpha, alpha)`` per image, drawn as a ratio of two Gamma draws (TF
    has no Beta sampler); the partner is a random permutation of the batch, so an
    image may meet itself, which leaves it unchanged. The blend happens on float
    pixels in [0, 1] before the batch is rounded back to uint8 for the model.

    Args:
        images: ``(batch, height, width, channels)`` floats in [0, 1].
        targets: ``(batch, classes)`` one-hot (or already soft) targets.
        alpha: Beta's concentration; small values keep most blends close to one image.
    """
    batch = tf.shape(images)[0]
    first = tf.random.gamma([batch], alpha)
    second = tf.random.gamma([batch], alpha)
    weight = first / tf.maximum(first + second, 1e-12)
    partner = tf.argsort(tf.random.uniform([batch]))
    image_weight = tf.reshape(weight, [-1, 1, 1, 1])
    mixed_images = image_weight * images + (1.0 - image_weight) * tf.gather(images, partner)
    target_weight = tf.cast(tf.reshape(weight, [-1, 1]), targets.dtype)
    mixed_targets = target_weight * targets + (1.0 - target_weight) * tf.gather(targets, partner)
    return mixed_images, mixed_targets


# Pale pinkish grey between the cells of a thin smear (RGB, 0-1); each image draws its
# own shade and a smaller per-channel tint around it, then pixel noise, so no single
# colour becomes a shortcut.
_SMEAR_COLOUR = (0.80, 0.72, 0.75)
_SMEAR_SHADE = 0.10
_SMEAR_TINT = 0.04
_SMEAR_NOISE = 0.02
# Cells are brighter than this in their brightest channel: a pixel near the black mask
# with a lower maximum is part cell, part black (the antialiased rim of the crop).
_CELL_LEVEL = 0.7


def _chosen(x: tf.Tensor, probability: float) -> tf.Tensor:
    """Per-image booleans (batch, 1, 1, 1), True with ``probability``."""
    return _per_image(x, 0.0, 1.0) < probability


def _random_background(x: tf.Tensor, probability: float) -> tf.Tensor:
    """Composite the cell over a smear-like background instead of black.

    Rim pixels are ``alpha * cell`` (blended with the black mask when the crop was
    resized), so ``x + (1 - alpha) * smear`` re-composites them over the smear without
    the dark outline a hard mask would leave. Alpha is estimated only within two
    pixels of pure background, so dark parasites inside the cell are left alone.
    """
    if probability <= 0:
        return x
    brightest = tf.reduce_max(x, axis=-1, keepdims=True)
    background = tf.cast(brightest <= 1.0 / 255.0, tf.float32)
    near_background = tf.nn.max_pool2d(background, 5, 1, "SAME") > 0
    alpha = tf.where(near_background, tf.clip_by_value(brightest / _CELL_LEVEL, 0.0, 1.0), 1.0)
    batch = tf.shape(x)[0]
    shade = tf.random.uniform([batch, 1, 1, 1], -_SMEAR_SHADE, _SMEAR_SHADE)
    tint = tf.random.uniform([batch, 1, 1, 3], -_SMEAR_TINT, _SMEAR_TINT)
    smear = tf.constant(_SMEAR_COLOUR) + shade + tint
    smear = tf.clip_by_value(smear + tf.random.normal(tf.shape(x), 0.0, _SMEAR_NOISE), 0.0, 1.0)
    composite = tf.clip_by_value(x + (1.0 - alpha) * smear, 0.0, 1.0)
    return tf.where(_chosen(x, probability), composite, x)


def _random_low_resolution(x: tf.Tensor, config: TrainingConfig) -> tf.Tensor:
    if config.low_resolution_probability <= 0:
        return x
    size = config.image_size
    low = min(config.low_resolution_min_side, size)
    side = tf.random.uniform([], low, size + 1, dtype=tf.int32)
    small = tf.image.resize(x, tf.stack([side, side]), method="bilinear", antialias=True)
    restored = tf.image.resize(small, [size, size], method="bilinear")
    return tf.where(_chosen(x, config.low_resolution_probability), restored, x)


def _random_blur(x: tf.Tensor, config: TrainingConfig) -> tf.Tensor:
    if config.blur_probability <= 0 or config.blur_max_sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * config.blur_max_sigma))
    sigma = tf.random.uniform([], 0.3, max(config.blur_max_sigma, 0.3))
    offsets = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / tf.reduce_sum(kernel)
    channels = 3
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    columns = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    # Reflect padding: zero padding would darken the edges of a smear background.
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")
    return tf.where(_chosen(x, config.blur_probability), blurred, x)


def _per_image(x: tf.Tensor, low: float, high: float) -> tf.Tensor:
    return tf.random.uniform([tf.shape(x)[0], 1, 1, 1], low, high)


def symmetry_permutations(size: int) -> np.ndarray:
    """The 8 symmetries of a ``size`` x ``size`` square as pixel permutations, ``(8, size**2)``.

    Row ``k`` lists, for each output pixel (row-major), the input pixel it takes: the
    four rotations of the identity and of the transpose.
    """
    positions = np.arange(size * size, dtype=np.int32).reshape(size, size)
    return np.stack(
        [np.rot90(grid, turns).ravel() for grid in (positions, positions.T) for turns in range(4)]
    )


def _random_symmetry(x: tf.Tensor) -> tf.Tensor:
    """Each image gets one of the 8 symmetries of the square, uniformly, in one gather.

    (Three independent coin flips for transpose, vertical and horizontal flip, as
    before, give the same uniform distribution over the 8; this moves every pixel
    once instead of three times.)
    """
    size = int(x.shape[1])
    batch = tf.shape(x)[0]
    choice = tf.random.uniform([batch], 0, 8, dtype=tf.int32)
    sources = tf.gather(tf.constant(symmetry_permutations(size)), choice)
    pixels = tf.reshape(x, [batch, size * size, x.shape[-1]])
    return tf.reshape(tf.gather(pixels, sources, batch_dims=1), tf.shape(x))


@dataclass(frozen=True)
class ColourDraws:
    """One image's stain jitter (each ``(batch,)`` but ``gain`` ``(batch, 3)``)."""

    brightness: tf.Tensor
    contrast: tf.Tensor
    saturation: tf.Tensor
    gain: tf.Tensor
    hue_angle: tf.Tensor


def _draw_colour(batch: tf.Tensor, config: TrainingConfig) -> ColourDraws:
    """Random draws for :func:`colour_transform`; a setting of 0 draws the identity."""

    def uniform(shape, spread: float, centre: float) -> tf.Tensor:
        return tf.random.uniform(shape, centre - spread, centre + spread)

    return ColourDraws(
        brightness=uniform([batch], config.brightness_delta, 0.0),
        contrast=uniform([batch], config.contrast_range, 1.0),
        saturation=uniform([batch], config.saturation_range, 1.0),
        gain=uniform([batch, 3], config.channel_gain_range, 1.0),
        hue_angle=2 * math.pi * uniform([batch], config.hue_delta, 0.0),
    )


def colour_transform(draws: ColourDraws, image_mean: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """The stain jitter as one affine map per image: ``x @ matrix + offset``.

    In order: brightness ``x + b``; contrast around the image mean ``(x - m) f + m``;
    saturation towards the luma ``g + (x - g) s`` with ``g = x . (0.299, 0.587, 0.114)``;
    per-channel gain; hue as a rotation of the (I, Q) plane of Y'IQ. Each step is
    affine in the pixel, so together they are ``x @ (f S G H^T) + (b + (1 - f) m)
    (1 S G H^T)``: one 3x3 product per pixel instead of five passes over the batch.

    Returns:
        ``matrix`` ``(batch, 3, 3)`` and ``offset`` ``(batch, 3)``.
    """
    batch = tf.shape(draws.brightness)[0]
    eye = tf.eye(3, batch_shape=[batch])
    luma = tf.constant([0.299, 0.587, 0.114])
    s = draws.saturation[:, None, None]
    saturate = s * eye + (1 - s) * luma[None, :, None] * tf.ones([1, 1, 3])
    gain = tf.linalg.diag(draws.gain)
    cos, sin = tf.cos(draws.hue_angle), tf.sin(draws.hue_angle)
    one, zero = tf.ones_like(cos), tf.zeros_like(cos)
    rotation = tf.stack(
        [
            tf.stack([one, zero, zero], -1),
            tf.stack([zero, cos, -sin], -1),
            tf.stack([zero, sin, cos], -1),
        ],
        axis=1,
    )  # (batch, 3, 3) acting on (Y, I, Q)
    hue = tf.einsum("ij,bjk,kl->bil", _YIQ_TO_RGB, rotation, _RGB_TO_YIQ)
    colour = saturate @ gain @ tf.transpose(hue, [0, 2, 1])
    matrix = draws.contrast[:, None, None] * colour
    level = draws.brightness + (1 - draws.contrast) * image_mean  # added to every channel
    offset = level[:, None] * tf.reduce_sum(colour, axis=1)
    return matrix, offset


def _random_colour(x: tf.Tensor, config: TrainingConfig) -> tf.Tensor:
    jitter = (
        config.brightness_delta,
        config.contrast_range,
        config.saturation_range,
        config.channel_gain_range,
        config.hue_delta,
    )
    if not any(value > 0 for value in jitter):
        return x
    draws = _draw_colour(tf.shape(x)[0], config)
    matrix, offset = colour_transform(draws, tf.reduce_mean(x, axis=[1, 2, 3]))
    x = tf.einsum("bhwj,bji->bhwi", x, matrix) + offset[:, None, None, :]
    return tf.clip_by_value(x, 0.0, 1.0)


def zoom_and_shift_transforms(zoom: tf.Tensor, shift: tf.Tensor, size: int) -> tf.Tensor:
    """Per-image projective transforms ``(batch, 8)``: zoom about the centre, then shift.

    The same geometry as Keras's ``RandomZoom`` followed by ``RandomTranslation``
    (each output pixel ``p`` reads the input at ``zoom * (p - shift) + (1 - zoom) * c``,
    with ``c`` the image centre), composed into one matrix so the batch is resampled
    once instead of twice: the two layers took 70% of the augmentation's CPU time.

    Args:
        zoom: ``(batch,)`` factors; above 1 shows more of the picture (zooms out).
        shift: ``(batch, 2)`` shifts in pixels, ``(right, down)``.
        size: The side of the square images.
    """
    centre = (size - 1) / 2.0
    offset = centre * (1.0 - zoom)
    zeros = tf.zeros_like(zoom)
    return tf.stack(
        [
            zoom,
            zeros,
            offset - zoom * shift[:, 0],
            zeros,
            zoom,
            offset - zoom * shift[:, 1],
            zeros,
            zeros,
        ],
        axis=1,
    )


def _random_zoom_and_shift(x: tf.Tensor, config: TrainingConfig) -> tf.Tensor:
    """Zoom by up to ``zoom_range`` and shift by up to ``shift_range`` of the side, per image.

    Uniform draws (zoom in ``1 +- zoom_range``, each shift in ``+- shift_range`` times
    the side), bilinear, filled with black: the distributions of the Keras layers used
    before, resampled once (:func:`zoom_and_shift_transforms`).
    """
    if config.zoom_range <= 0 and config.shift_range <= 0:
        return x
    size = int(x.shape[1])
    batch = tf.shape(x)[0]
    zoom = tf.random.uniform([batch], 1.0 - config.zoom_range, 1.0 + config.zoom_range)
    shift = tf.random.uniform([batch, 2], -config.shift_range, config.shift_range) * size
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=zoom_and_shift_transforms(zoom, shift, size),
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )
