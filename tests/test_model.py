"""The CNN's colour normalization: fixed scaling, or per-cell standardization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from _synthetic import on_smear

from malaria_classifier.config import TrainingConfig
from malaria_classifier.model import (
    CellStandardization,
    TruncatedCrossentropy,
    build_model,
    compile_model,
    load_model,
)


def _cells(count: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Pinkish discs with darker purple spots on black, like NIH crops."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[:size, :size]
    disc = (rows - size / 2) ** 2 + (columns - size / 2) ** 2 < (size * 0.4) ** 2
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    for image in images:
        image[disc] = rng.integers([180, 110, 130], [220, 140, 160], size=(disc.sum(), 3))
        spot = (rows - rng.integers(10, 22)) ** 2 + (columns - rng.integers(10, 22)) ** 2 < 6
        image[spot & disc] = (90, 40, 120)
    return images


def _standardize(images: np.ndarray) -> np.ndarray:
    return np.asarray(CellStandardization()(images))


def test_cell_pixels_get_zero_mean_and_unit_spread_and_background_stays_zero():
    images = _cells()
    standardized = _standardize(images)
    cell = images.max(axis=-1) >= 30
    for index in range(len(images)):
        values = standardized[index][cell[index]]
        np.testing.assert_allclose(values.mean(axis=0), 0.0, atol=1e-4)
        np.testing.assert_allclose(values.std(axis=0), 1.0, atol=1e-3)
    assert np.all(standardized[~cell] == 0.0)


def test_a_different_stain_tint_reaches_the_network_almost_unchanged():
    images = _cells()
    cell = images.max(axis=-1, keepdims=True) >= 30
    # Another laboratory: each channel scaled and shifted differently, background black.
    tinted = np.where(cell, np.clip(images * [0.7, 0.9, 1.15] + [20, 0, -10], 0, 255), 0)
    before, after = _standardize(images), _standardize(tinted.astype(np.uint8))
    # Compare each representation's change to its own spread over cell pixels.
    fixed_before, fixed_after = images / 127.5 - 1.0, tinted / 127.5 - 1.0
    inside = cell[..., 0]
    standardized_change = np.abs(before - after)[inside].mean() / before[inside].std()
    fixed_change = np.abs(fixed_before - fixed_after)[inside].mean() / fixed_before[inside].std()
    assert standardized_change < 0.1 * fixed_change


def _standardize_over(images: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Per-image, per-channel standardization over ``cell`` pixels; 0 elsewhere (reference)."""
    out = np.zeros(images.shape, dtype=np.float64)
    for index, (image, mask) in enumerate(zip(images.astype(np.float64), cell, strict=True)):
        values = image[mask]
        std = np.maximum(values.std(axis=0), 4.0)
        out[index][mask] = (values - values.mean(axis=0)) / std
    return out


def test_a_light_smear_around_the_cell_is_background_like_the_black_mask():
    images = _cells()
    smeared = on_smear(images)
    cell = images.max(axis=-1) >= 30

    standardized = _standardize(smeared)

    np.testing.assert_allclose(standardized, _standardize(images), atol=1e-4)
    assert np.all(standardized[~cell] == 0.0)


def test_a_cell_that_touches_its_box_keeps_the_black_mask():
    # NIH crops are cut to the cell's box, so the cell meets the box's edge; the black
    # corners must stay the only background. This uniform cell covers ~60% of its box's
    # edge, more than any NIH crop (at most 41%).
    rows, columns = np.mgrid[:32, :32]
    disc = (rows - 15.5) ** 2 + (columns - 15.5) ** 2 < 18.0**2
    noise = np.random.default_rng(3).normal(0.0, 3.0, (4, 32, 32, 3))
    pink = np.clip(np.rint(np.array([205.0, 150.0, 165.0]) + noise), 0, 255)
    images = np.where(disc[None, :, :, None], pink, 0).astype(np.uint8)
    images[:, 12:17, 13:18] = (90, 40, 120)  # a parasite, so the cell has a spread
    cell = images.max(axis=-1) >= 30

    np.testing.assert_allclose(_standardize(images), _standardize_over(images, cell), atol=1e-4)


def test_a_black_background_lifted_to_dark_grey_is_no_smear():
    # Brightness jitter in training lifts the black mask to a uniform dark grey (30-50):
    # the model learned those with the grey counted as cell, so they must stay so.
    images = _cells()
    images[images.max(axis=-1) < 30] = (36, 35, 35)
    lifted = images.max(axis=-1) >= 30

    np.testing.assert_allclose(_standardize(images), _standardize_over(images, lifted), atol=1e-4)


def test_a_flat_image_is_not_blown_up_into_noise():
    flat = np.full((1, 16, 16, 3), 200, dtype=np.uint8)
    flat[0, 0, 0] = 204
    assert np.abs(_standardize(flat)).max() <= 1.0


def test_per_cell_model_round_trips_through_a_safe_mode_save(tmp_path):
    model = build_model(
        TrainingConfig(image_size=32, conv_blocks=3, colour_normalization="per_cell")
    )
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = load_model(str(path))
    images = _cells()
    assert isinstance(loaded.get_layer("normalize"), CellStandardization)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0))


@pytest.mark.parametrize("content", [b"", b"not a zip at all", b"PK\x03\x04" + b"\x00" * 40])
def test_a_file_that_is_not_a_keras_archive_is_named_as_such(tmp_path, content):
    """Keras itself says "File not found" of a truncated .keras file that is there."""
    path = tmp_path / "model.keras"
    path.write_bytes(content)
    with pytest.raises(
        ValueError, match=r"model.keras is not a Keras model: a .keras file is a zip"
    ):
        load_model(str(path))


def test_fixed_normalization_maps_pixels_to_minus_one_one():
    model = build_model(TrainingConfig(image_size=32, conv_blocks=3, colour_normalization="fixed"))
    normalize = keras.Model(model.input, model.get_layer("normalize").output)
    out = normalize.predict(np.array([[[[0, 255, 0]] * 32] * 32], dtype=np.uint8), verbose=0)
    assert out.min() == pytest.approx(-1.0) and out.max() == pytest.approx(1.0)


def test_unknown_colour_normalization_is_refused_with_the_choices():
    with pytest.raises(
        ValueError, match="colour_normalization must be one of fixed, per_cell, got 'histogram'"
    ):
        TrainingConfig(colour_normalization="histogram")


def _one_hot_and_predictions() -> tuple[np.ndarray, np.ndarray]:
    labels = np.array([[0, 1], [0, 1], [1, 0], [1, 0]], dtype="float32")
    predictions = np.array([[0.1, 0.9], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]], dtype="float32")
    return labels, predictions


def test_truncated_crossentropy_leaves_out_the_worst_fitting_cell():
    labels, predictions = _one_hot_and_predictions()
    per_cell = -np.log([0.9, 0.2, 0.7, 0.4])  # the second cell fits worst

    loss = TruncatedCrossentropy(drop_fraction=0.25)(labels, predictions)

    np.testing.assert_allclose(float(loss), per_cell[[0, 2, 3]].mean(), rtol=1e-6)


def test_truncated_crossentropy_drops_nothing_below_one_whole_cell():
    labels, predictions = _one_hot_and_predictions()
    plain = keras.losses.CategoricalCrossentropy()(labels, predictions)

    truncated = TruncatedCrossentropy(drop_fraction=0.2)(labels, predictions)  # 0.8 cells

    np.testing.assert_allclose(float(truncated), float(plain), rtol=1e-6)


def test_the_dropped_cell_gives_no_gradient():
    import tensorflow as tf

    labels, predictions = _one_hot_and_predictions()
    variable = tf.Variable(predictions)
    with tf.GradientTape() as tape:
        loss = TruncatedCrossentropy(drop_fraction=0.25)(labels, variable)
    gradient = tape.gradient(loss, variable).numpy()

    assert not gradient[1].any()
    assert np.abs(gradient[[0, 2, 3]]).sum(axis=1).min() > 0


def test_a_checkpoint_with_the_truncated_loss_resumes_with_it(tmp_path):
    config = TrainingConfig(image_size=16, base_filters=4, conv_blocks=1, dense_units=4)
    model = compile_model(build_model(config), 0.001, label_smoothing=0.05, loss_drop_fraction=0.1)
    model.save(tmp_path / "checkpoint.keras")

    restored = keras.saving.load_model(tmp_path / "checkpoint.keras", compile=True, safe_mode=True)

    assert isinstance(restored.loss, TruncatedCrossentropy)
    assert (restored.loss.drop_fraction, restored.loss.label_smoothing) == (0.1, 0.05)


def test_loss_drop_fraction_outside_its_range_is_refused():
    with pytest.raises(ValueError, match="loss_drop_fraction must be in"):
        TrainingConfig(loss_drop_fraction=0.5)


def test_residual_separable_blocks_add_depth_to_the_last_blocks_only():
    config = TrainingConfig(image_size=32, conv_blocks=3, residual_separable_blocks=2)
    model = build_model(config)
    depthwise = [
        layer.name for layer in model.layers if isinstance(layer, keras.layers.DepthwiseConv2D)
    ]
    assert depthwise == ["block2_residual_depthwise", "last_conv_depthwise"]
    # Grad-CAM's feature layer is the last block's final output, after the residual.
    assert isinstance(model.get_layer("last_conv"), keras.layers.ReLU)
    assert model.get_layer("block3_conv1").output.shape == model.get_layer("last_conv").output.shape
    plain = build_model(config.replace(residual_separable_blocks=0))
    added = model.count_params() - plain.count_params()
    # depthwise 3x3 + pointwise + batch norm (4 per channel) for 32 and 64 filters
    assert added == sum(9 * f + f * f + 4 * f for f in (32, 64))


def test_a_residual_layer_that_outputs_zero_leaves_the_block_unchanged():
    config = TrainingConfig(image_size=32, conv_blocks=3, residual_separable_blocks=1)
    model = build_model(config)
    pointwise = model.get_layer("last_conv_pointwise")
    pointwise.set_weights([np.zeros_like(weight) for weight in pointwise.get_weights()])
    block_output = keras.Model(
        model.input, [model.get_layer("block3_conv1").output, model.get_layer("last_conv").output]
    )
    before_residual, after_residual = block_output.predict(_cells(size=32), verbose=0)
    np.testing.assert_allclose(after_residual, np.maximum(before_residual, 0.0), atol=1e-6)


def test_residual_separable_blocks_beyond_the_blocks_are_refused():
    with pytest.raises(ValueError, match="residual_separable_blocks must be between 0 and"):
        TrainingConfig(conv_blocks=3, residual_separable_blocks=4)


def test_a_model_folder_hint_never_names_a_partial_save(tmp_path):
    """A killed save leaves `.model.partial.keras`; the hint must name the real model."""
    from malaria_classifier.model_card import check_model_path

    (tmp_path / ".model.partial.keras").write_bytes(b"half a model")
    with pytest.raises(ValueError) as caught:
        check_model_path(tmp_path)
    assert "partial" not in str(caught.value) and "is a folder" in str(caught.value)
    (tmp_path / "model.keras").write_bytes(b"model")
    with pytest.raises(ValueError, match=r"such as .*/model\.keras \("):
        check_model_path(tmp_path)
