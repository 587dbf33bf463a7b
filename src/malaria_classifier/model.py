"""The CNN: convolution blocks with ReLU and pooling, then dense layers and a softmax.

Normalization is the model's first layer, so a saved model takes raw uint8 RGB
pixels (0-255) and training and serving cannot scale images differently.
"""

from __future__ import annotations

import keras
from keras import layers

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES

INPUT_NAME = "image"
LAST_CONV_LAYER = "last_conv"


def build_model(config: TrainingConfig) -> keras.Model:
    """Build the (uncompiled) classifier described by ``config``.

    Each block is ``convs_per_block`` x (conv3x3 -> batch norm -> ReLU) then 2x2 max
    pooling, doubling the filters; global average pooling then a dense layer, dropout
    and a 2-way softmax (index 1 = Parasitized). With the defaults it has ~107k
    weights (~0.43 MB), small enough to train on two CPU cores in minutes.

    Example:
        >>> model = build_model(TrainingConfig(image_size=64))
        >>> model.output_shape
        (None, 2)
    """
    size = config.image_size
    inputs = keras.Input(shape=(size, size, 3), dtype="uint8", name=INPUT_NAME)
    if config.colour_normalization == "per_cell":
        x = CellStandardization(name="normalize")(inputs)
    else:
        x = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="normalize")(inputs)
    for block in range(config.conv_blocks):
        filters = config.base_filters * 2**block
        is_last = block == config.conv_blocks - 1
        for conv in range(config.convs_per_block):
            is_last_conv = is_last and conv == config.convs_per_block - 1
            name = LAST_CONV_LAYER if is_last_conv else f"block{block + 1}_conv{conv + 1}"
            x = _conv_bn_relu(x, filters, name=name)
        x = layers.MaxPooling2D(2, name=f"block{block + 1}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="global_pool")(x)
    x = layers.Dense(config.dense_units, activation="relu", name="dense")(x)
    if config.dropout_rate > 0:
        x = layers.Dropout(config.dropout_rate, seed=config.randomness_seed, name="dropout")(x)
    outputs = layers.Dense(len(CLASS_NAMES), activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="malaria_cnn")


@keras.saving.register_keras_serializable(package="malaria_classifier")
class CellStandardization(layers.Layer):
    """Standardize each image's cell pixels per channel; the background stays 0.

    Giemsa stain varies between batches, laboratories and cameras mostly as a change
    of each channel's level and spread over the whole crop. Subtracting each image's
    mean and dividing by its standard deviation (over the cell, i.e. pixels whose
    brightest channel reaches ``dark_level``, not the black mask) removes that change
    while keeping what marks a parasite: spots darker and bluer than the cell around
    them. It is part of the model, so a saved model still takes raw uint8 pixels.

    Args:
        dark_level: Pixels whose brightest channel is below this (0-255) are
            background and excluded from the statistics.
        min_std: Floor of the standard deviation (pixel units), so a flat image is
            not blown up into noise.
    """

    def __init__(self, dark_level: float = 30.0, min_std: float = 4.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dark_level = float(dark_level)
        self.min_std = float(min_std)

    def call(self, inputs):
        pixels = keras.ops.cast(inputs, "float32")
        brightest = keras.ops.max(pixels, axis=-1, keepdims=True)
        cell = keras.ops.cast(brightest >= self.dark_level, "float32")
        count = keras.ops.maximum(keras.ops.sum(cell, axis=(1, 2), keepdims=True), 1.0)
        mean = keras.ops.sum(pixels * cell, axis=(1, 2), keepdims=True) / count
        variance = keras.ops.sum(keras.ops.square(pixels - mean) * cell, axis=(1, 2), keepdims=True)
        std = keras.ops.maximum(keras.ops.sqrt(variance / count), self.min_std)
        return (pixels - mean) / std * cell

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "dark_level": self.dark_level, "min_std": self.min_std}


def _conv_bn_relu(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=name)(x)


def compile_model(
    model: keras.Model, learning_rate: float, label_smoothing: float = 0.0
) -> keras.Model:
    """Attach Adam and categorical cross-entropy (labels are one-hot over CLASS_NAMES)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
        ],
    )
    return model


def count_weight_bytes(model: keras.Model) -> int:
    """Bytes of all weights at their stored precision (the size a user ships)."""
    return sum(int(weight.numpy().nbytes) for weight in model.weights)


def load_model(path: str) -> keras.Model:
    """Load a saved ``.keras`` model in Keras safe mode (no arbitrary code runs).

    Raises:
        ValueError: If the file is missing or is not a Keras model.
    """
    from pathlib import Path

    model_path = Path(path)
    if not model_path.is_file():
        raise ValueError(
            f"Model file {model_path} does not exist. Pass a .keras file written by "
            f"`malaria train`, or leave --model out to use the bundled default."
        )
    try:
        return keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ValueError(
            f"{model_path} could not be loaded as a Keras model ({error}). "
            f"Pass a .keras file written by `malaria train`."
        ) from None
