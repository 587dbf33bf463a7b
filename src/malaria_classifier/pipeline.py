"""tf.data input pipeline: decode, resize with padding, cache, shuffle, augment, batch.

Decoding and resizing use :func:`malaria_classifier.images.load_for_model`, the same
function prediction uses, so training and serving see identical pixels. Augmentation
is mapped over the training split only; the model itself normalizes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.images import ImageLoadError, load_for_model


def default_workers() -> int:
    """Decode threads: one per core (Pillow releases the GIL while it decodes)."""
    return max(1, os.cpu_count() or 1)


def iter_images(
    paths: Sequence[str | Path], image_size: int, workers: int | None = None, lookahead: int = 512
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield ``(image, None)`` or ``(None, error)`` per path, in order, decoding ahead.

    A bounded window of futures keeps memory flat however many paths there are, and
    a bad file yields its error instead of stopping the stream.
    """
    workers = workers or default_workers()

    def load(path: str | Path) -> tuple[np.ndarray | None, str | None]:
        try:
            return load_for_model(path, image_size), None
        except ImageLoadError as error:
            return None, str(error)

    with ThreadPoolExecutor(max_workers=workers) as executor:
        pending = []
        for path in paths:
            pending.append(executor.submit(load, path))
            if len(pending) >= lookahead:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()


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
            len(path_strings), seed=config.seed, reshuffle_each_iteration=True
        )
        if config.augment:
            dataset = dataset.map(make_color_augmenter(config), num_parallel_calls=tf.data.AUTOTUNE)
    dataset = dataset.batch(config.batch_size)
    if training and config.augment:
        dataset = dataset.map(make_geometry_augmenter(config), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_color_augmenter(config: TrainingConfig):
    """Per-image flips, 90-degree turns and stain-like colour jitter.

    Cells have no up or left, so all eight symmetries of the square are valid; the
    colour jitter imitates differences in Giemsa staining and illumination.
    """

    def augment(image: tf.Tensor, target: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.image.convert_image_dtype(image, tf.float32)
        x = tf.image.random_flip_left_right(x)
        x = tf.image.rot90(x, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
        if config.brightness_delta > 0:
            x = tf.image.random_brightness(x, config.brightness_delta)
        if config.contrast_range > 0:
            x = tf.image.random_contrast(x, 1 - config.contrast_range, 1 + config.contrast_range)
        if config.saturation_range > 0:
            x = tf.image.random_saturation(
                x, 1 - config.saturation_range, 1 + config.saturation_range
            )
        if config.hue_delta > 0:
            x = tf.image.random_hue(x, config.hue_delta)
        return _to_uint8(x), target

    return augment


def make_geometry_augmenter(config: TrainingConfig):
    """Batch-wise small zoom and shift, filling with black like the NIH background."""
    steps = []
    if config.zoom_range > 0:
        steps.append(
            keras.layers.RandomZoom(
                (-config.zoom_range, config.zoom_range),
                fill_mode="constant",
                fill_value=0.0,
                seed=config.seed,
            )
        )
    if config.shift_range > 0:
        steps.append(
            keras.layers.RandomTranslation(
                config.shift_range,
                config.shift_range,
                fill_mode="constant",
                fill_value=0.0,
                seed=config.seed + 1,
            )
        )

    def augment(images: tf.Tensor, targets: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        x = tf.cast(images, tf.float32)
        for step in steps:
            x = step(x, training=True)
        return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8), targets

    return augment


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    # Round back to uint8 so augmented training images look exactly like real inputs.
    return tf.image.convert_image_dtype(tf.clip_by_value(x, 0.0, 1.0), tf.uint8, saturate=True)
