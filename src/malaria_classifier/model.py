"""The CNN: convolution blocks with ReLU and pooling, then dense layers and a softmax.

Normalization is the model's first layer, so a saved model takes raw uint8 RGB
pixels (0-255) and training and serving cannot scale images differently.
"""

from __future__ import annotations

import zipfile

import keras
from keras import layers

from malaria_classifier.config import TrainingConfig
from malaria_classifier.constants import CLASS_NAMES

INPUT_NAME = "image"
LAST_CONV_LAYER = "last_conv"


def build_model(config: TrainingConfig) -> keras.Model:
    """Build the (uncompiled) classifier described by ``config``.

    Each block is ``convs_per_block`` x (conv3x3 -> batch norm -> ReLU), in the last
    ``residual_separable_blocks`` blocks followed by a depthwise-separable residual
    layer, then 2x2 max pooling, doubling the filters; global average pooling then a
    dense layer, dropout and a 2-way softmax (index 1 = Parasitized). With the defaults
    it has ~107k weights (~0.43 MB), small enough to train on two CPU cores in minutes.

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
    first_residual = config.conv_blocks - config.residual_separable_blocks
    for block in range(config.conv_blocks):
        filters = config.base_filters * 2**block
        is_last = block == config.conv_blocks - 1
        residual = block >= first_residual
        for conv in range(config.convs_per_block):
            is_last_conv = is_last and conv == config.convs_per_block - 1 and not residual
            name = LAST_CONV_LAYER if is_last_conv else f"block{block + 1}_conv{conv + 1}"
            x = _conv_bn_relu(x, filters, name=name)
        if residual:
            name = LAST_CONV_LAYER if is_last else f"block{block + 1}_residual"
            x = _separable_residual(x, filters, name=name)
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
    mean and dividing by its standard deviation over the cell removes that change
    while keeping what marks a parasite: spots darker and bluer than the cell around
    them. It is part of the model, so a saved model still takes raw uint8 pixels.

    The background is black (the NIH mask, the padding) and, in a crop that keeps
    its smear and that ``background.isolate_cell`` could not cut out, also the smear:
    the colour of the content box's outer ring when it is light and most of that ring
    agrees with it (the rule of the Not-a-cell check, ``ood.py``, with the ring's
    mean for its median). Counted as cell, the smear skewed the statistics: AUC
    0.67-0.72 on such crops in the validation stress test, 0.81-0.82 without it
    (docs/benchmarks.md section 9.10). An NIH crop touches its box at a few points
    only (ring agreement at most 0.41 over the whole set), so for it, and for every
    image the shipped model was trained on, the mask is the black one.

    Args:
        dark_level: Pixels whose brightest channel is below this (0-255) are
            black background.
        min_std: Floor of the standard deviation (pixel units), so a flat image is
            not blown up into noise.
        smear_tolerance: Largest channel difference from the ring colour that is
            still smear.
        min_smear_agreement: Share of the ring within ``smear_tolerance`` of its
            colour for the ring to count as a smear.
        min_smear_level: Brightest channel (0-255) the ring colour must reach: a
            smear under a bright-field microscope is light, while a black mask lifted
            to dark grey (30-50) by training's brightness jitter is uniform too, and
            the model learned those with the grey counted as cell.
    """

    def __init__(
        self,
        dark_level: float = 30.0,
        min_std: float = 4.0,
        smear_tolerance: float = 18.0,
        min_smear_agreement: float = 0.75,
        min_smear_level: float = 100.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.dark_level = float(dark_level)
        self.min_std = float(min_std)
        self.smear_tolerance = float(smear_tolerance)
        self.min_smear_agreement = float(min_smear_agreement)
        self.min_smear_level = float(min_smear_level)

    def call(self, inputs):
        # Channels first inside the layer: each image's per-channel statistics then
        # broadcast over whole contiguous planes instead of runs of three values, which
        # made ONNX Runtime spend more time here than in all the convolutions (§8.2h
        # of docs/benchmarks.md). The output goes back to channels last.
        pixels = keras.ops.transpose(keras.ops.cast(inputs, "float32"), (0, 3, 1, 2))
        lit = keras.ops.max(pixels, axis=1, keepdims=True) >= self.dark_level
        near_colour = self.smear(pixels, lit)
        cell = keras.ops.cast(
            keras.ops.logical_and(lit, keras.ops.logical_not(near_colour)), "float32"
        )
        count = keras.ops.maximum(keras.ops.sum(cell, axis=(2, 3), keepdims=True), 1.0)
        mean = keras.ops.sum(pixels * cell, axis=(2, 3), keepdims=True) / count
        centred = pixels - mean
        variance = keras.ops.sum(keras.ops.square(centred) * cell, axis=(2, 3), keepdims=True)
        scale = 1.0 / keras.ops.maximum(keras.ops.sqrt(variance / count), self.min_std)
        return keras.ops.transpose(centred * (scale * cell), (0, 2, 3, 1))

    def smear(self, pixels, lit):
        """Smear pixels ``(n, 1, h, w)``: background besides the black.

        ``pixels`` is channels first ``(n, 3, h, w)`` float, ``lit`` its non-black
        pixels ``(n, 1, h, w)``. The ring is the outer edge of the content box (rows
        and columns that are not all black, i.e. inside the padding); its colour is
        the mean of its non-black pixels. Where fewer than ``min_smear_agreement`` of
        the ring's pixels lie within ``smear_tolerance`` of that colour, or the colour
        is darker than ``min_smear_level``, no pixel is smear.
        """
        lit_float = keras.ops.cast(lit, "float32")
        ring = _content_box_ring(lit_float)
        ring_lit = ring * lit_float
        colour = keras.ops.sum(pixels * ring_lit, axis=(2, 3), keepdims=True) / keras.ops.maximum(
            keras.ops.sum(ring_lit, axis=(2, 3), keepdims=True), 1.0
        )
        distance = keras.ops.max(keras.ops.abs(pixels - colour), axis=1, keepdims=True)
        near = keras.ops.cast(distance <= self.smear_tolerance, "float32")
        agreement = keras.ops.sum(near * ring_lit, axis=(2, 3), keepdims=True) / keras.ops.maximum(
            keras.ops.sum(ring, axis=(2, 3), keepdims=True), 1.0
        )
        light = keras.ops.max(colour, axis=1, keepdims=True) >= self.min_smear_level
        is_smear = keras.ops.logical_and(agreement >= self.min_smear_agreement, light)
        return keras.ops.logical_and(near > 0.5, is_smear)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "dark_level": self.dark_level,
            "min_std": self.min_std,
            "smear_tolerance": self.smear_tolerance,
            "min_smear_agreement": self.min_smear_agreement,
            "min_smear_level": self.min_smear_level,
        }


def _content_box_ring(lit):
    """1.0 on the outer edge of each image's content box, ``(n, 1, h, w)`` float.

    ``lit`` is ``(n, 1, h, w)``, 1.0 where a pixel is not black. The content box spans
    the rows and columns with any non-black pixel; an image with none gets an empty
    ring.
    """
    rows = keras.ops.max(lit, axis=(1, 3))  # (n, h): 1 where the row has content
    columns = keras.ops.max(lit, axis=(1, 2))  # (n, w)
    height, width = rows.shape[1], columns.shape[1]
    row_index = keras.ops.arange(height, dtype="float32")[None, :]
    column_index = keras.ops.arange(width, dtype="float32")[None, :]
    # First and last content row (column): smallest and largest index where content is.
    top = keras.ops.min(row_index + (1.0 - rows) * height, axis=1)
    bottom = keras.ops.max(row_index - (1.0 - rows) * height, axis=1)
    left = keras.ops.min(column_index + (1.0 - columns) * width, axis=1)
    right = keras.ops.max(column_index - (1.0 - columns) * width, axis=1)
    row_grid = row_index[:, None, :, None]
    column_grid = column_index[:, None, None, :]

    def per_image(values):
        return values[:, None, None, None]

    inside = (
        keras.ops.cast(row_grid >= per_image(top), "float32")
        * keras.ops.cast(row_grid <= per_image(bottom), "float32")
        * keras.ops.cast(column_grid >= per_image(left), "float32")
        * keras.ops.cast(column_grid <= per_image(right), "float32")
    )
    on_edge = keras.ops.maximum(
        keras.ops.maximum(
            keras.ops.cast(row_grid == per_image(top), "float32"),
            keras.ops.cast(row_grid == per_image(bottom), "float32"),
        ),
        keras.ops.maximum(
            keras.ops.cast(column_grid == per_image(left), "float32"),
            keras.ops.cast(column_grid == per_image(right), "float32"),
        ),
    )
    return inside * on_edge


def _separable_residual(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    """``ReLU(x + BN(pointwise(depthwise3x3(x))))``: one more layer of depth, cheaply.

    A depthwise 3x3 and a 1x1 convolution see the same neighbourhood as a full 3x3
    one for about ``1/9 + 1/filters`` of its multiplications; adding the result to
    the block's output keeps the block's features, so a new layer that learns
    nothing useful costs accuracy nothing.
    """
    y = layers.DepthwiseConv2D(3, padding="same", use_bias=False, name=f"{name}_depthwise")(x)
    y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pointwise")(y)
    y = layers.BatchNormalization(name=f"{name}_bn")(y)
    return layers.ReLU(name=name)(layers.Add(name=f"{name}_add")([x, y]))


def _conv_bn_relu(x: keras.KerasTensor, filters: int, name: str) -> keras.KerasTensor:
    x = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(name=f"{name}_bn")(x)
    return layers.ReLU(name=name)(x)


def compile_model(
    model: keras.Model,
    learning_rate: float,
    label_smoothing: float = 0.0,
    loss_drop_fraction: float = 0.0,
) -> keras.Model:
    """Attach Adam and categorical cross-entropy (labels are one-hot over CLASS_NAMES).

    With ``loss_drop_fraction`` the cross-entropy leaves out each batch's worst-fitting
    cells (:class:`TruncatedCrossentropy`).
    """
    if loss_drop_fraction > 0:
        loss = TruncatedCrossentropy(loss_drop_fraction, label_smoothing=label_smoothing)
    else:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=loss,
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.AUC(name="auc"),
        ],
    )
    return model


@keras.saving.register_keras_serializable(package="malaria_classifier")
class TruncatedCrossentropy(keras.losses.Loss):
    """Categorical cross-entropy without the largest losses of each batch.

    A mislabelled cell keeps a large loss however well the model learns the real
    classes, and its gradient pulls the model towards the wrong label. Leaving out the
    ``floor(drop_fraction * batch)`` largest per-cell losses of each batch (no gradient
    flows through which ones) removes most of that pull once the model has learned the
    classes; in a batch without a mislabelled cell it leaves out one hard, correctly
    labelled cell instead. The mean is taken over the cells kept, for training and for
    the validation loss that picks the best epoch alike.

    Args:
        drop_fraction: Share of each batch left out, in [0, 0.5).
        label_smoothing: As in ``keras.losses.CategoricalCrossentropy``.
    """

    def __init__(
        self,
        drop_fraction: float,
        label_smoothing: float = 0.0,
        name: str = "truncated_crossentropy",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.drop_fraction = float(drop_fraction)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        losses = keras.losses.categorical_crossentropy(
            y_true, y_pred, label_smoothing=self.label_smoothing
        )
        count = keras.ops.cast(keras.ops.shape(losses)[0], losses.dtype)
        dropped = keras.ops.floor(self.drop_fraction * count)
        # Rank 0 is the largest loss; argsort gives no gradient, so only the kept
        # cells' losses are trained on.
        rank = keras.ops.cast(keras.ops.argsort(keras.ops.argsort(-losses)), losses.dtype)
        keep = keras.ops.cast(rank >= dropped, losses.dtype)
        # The batch mean Keras takes next then equals the mean over the kept cells.
        return losses * keep * (count / keras.ops.maximum(count - dropped, 1.0))

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "drop_fraction": self.drop_fraction,
            "label_smoothing": self.label_smoothing,
        }


def count_weight_bytes(model: keras.Model) -> int:
    """Bytes of all weights at their stored precision (the size a user ships)."""
    return sum(int(weight.numpy().nbytes) for weight in model.weights)


def load_model(path: str) -> keras.Model:
    """Load a saved ``.keras`` model in Keras safe mode (no arbitrary code runs).

    Raises:
        ValueError: If the file is missing or is not a Keras model.
    """
    from malaria_classifier.model_card import check_model_path

    model_path = check_model_path(path)
    if not zipfile.is_zipfile(model_path):
        # Keras would say "File not found" of a file that is there.
        raise ValueError(
            f"{model_path} is not a Keras model: a .keras file is a zip archive and this "
            f"one is not (truncated by a copy, or another kind of file). Pass a .keras file "
            f"written by `malaria train`, or copy it again."
        )
    try:
        return keras.saving.load_model(model_path, compile=False, safe_mode=True)
    except Exception as error:  # Keras raises many types for a bad archive
        raise ValueError(
            f"{model_path} could not be loaded as a Keras model ({error}). "
            f"Pass a .keras file written by `malaria train`."
        ) from None
