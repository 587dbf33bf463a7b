"""The tf.data pipeline feeds the model the same pixels prediction sees."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from _synthetic import write_synthetic_dataset

from malaria_classifier.config import TrainingConfig
from malaria_classifier.data import discover_images
from malaria_classifier.decoding import iter_images
from malaria_classifier.images import load_for_model
from malaria_classifier.pipeline import (
    ColourDraws,
    colour_transform,
    make_batch_augmenter,
    make_dataset,
    mixup,
    one_hot,
    symmetry_permutations,
    zoom_and_shift_transforms,
)

# The default recipe also shrinks and blurs some cells (other laboratories' looks);
# the tests of single augmentations start with those off and turn on what they test.
CONFIG = TrainingConfig(
    image_size=32,
    batch_size=5,
    conv_blocks=2,
    seed=7,
    low_resolution_probability=0.0,
    blur_probability=0.0,
)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cells", patients=4)
    return discover_images(root).records


def test_one_hot_follows_the_fixed_class_order():
    assert one_hot(["Uninfected", "Parasitized"]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_evaluation_dataset_is_unaugmented_ordered_and_uint8(records):
    dataset = make_dataset([r.path for r in records], [r.label for r in records], CONFIG, False)
    images, targets = zip(*[(x.numpy(), y.numpy()) for x, y in dataset.unbatch()], strict=True)
    assert images[0].dtype == np.uint8 and images[0].shape == (32, 32, 3)
    for record, image, target in zip(records, images, targets, strict=True):
        np.testing.assert_array_equal(image, load_for_model(record.path, 32))
        assert target.argmax() == (record.label == "Parasitized")


def test_training_dataset_is_augmented_but_keeps_labels(records):
    dataset = make_dataset([r.path for r in records], [r.label for r in records], CONFIG, True)
    batches = list(dataset)
    assert sum(len(x) for x, _ in batches) == len(records)
    assert all(x.dtype == "uint8" for x, _ in batches)
    labels = np.concatenate([y.numpy().argmax(axis=1) for _, y in batches])
    assert sorted(labels.tolist()) == sorted(int(r.label == "Parasitized") for r in records)
    originals = {load_for_model(r.path, 32).tobytes() for r in records}
    augmented = [image.tobytes() for x, _ in batches for image in x.numpy()]
    assert sum(image not in originals for image in augmented) > len(records) // 2


def _augment_once(config, images):
    augmented, _ = make_batch_augmenter(config)(images, np.zeros((len(images), 2), np.float32))
    return augmented.numpy()


NO_COLOUR_OR_GEOMETRY = CONFIG.replace(
    brightness_delta=0.0,
    contrast_range=0.0,
    saturation_range=0.0,
    hue_delta=0.0,
    zoom_range=0.0,
    shift_range=0.0,
)


def test_symmetries_alone_only_move_pixels():
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    augmented = _augment_once(NO_COLOUR_OR_GEOMETRY, images)
    assert augmented.dtype == np.uint8 and augmented.shape == images.shape
    for original, result in zip(images, augmented, strict=True):
        assert sorted(result.reshape(-1, 3).tolist()) == sorted(original.reshape(-1, 3).tolist())
    assert any(
        (result != original).any() for original, result in zip(images, augmented, strict=True)
    )


def test_hue_and_saturation_jitter_leave_gray_pixels_gray():
    config = NO_COLOUR_OR_GEOMETRY.replace(hue_delta=0.2, saturation_range=0.5)
    images = np.full((8, 32, 32, 3), 90, dtype=np.uint8)
    augmented = _augment_once(config, images)
    assert np.abs(augmented.astype(int) - 90).max() <= 1


def test_hue_jitter_changes_coloured_pixels_per_image():
    config = NO_COLOUR_OR_GEOMETRY.replace(hue_delta=0.1)
    images = np.zeros((8, 4, 4, 3), dtype=np.uint8)
    images[..., 0] = 200  # saturated red
    augmented = _augment_once(config, images)
    assert len({tuple(image[0, 0]) for image in augmented}) > 1


def test_black_background_stays_black_under_zoom_and_shift():
    config = NO_COLOUR_OR_GEOMETRY.replace(zoom_range=0.2, shift_range=0.2)
    images = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    images[:, 12:20, 12:20] = 255
    augmented = _augment_once(config, images)
    assert augmented.min() == 0 and (augmented[:, 0, 0] == 0).all()


def test_one_resampling_matches_keras_zoom_then_translation():
    """The composed transform is the geometry of RandomZoom then RandomTranslation.

    On a linear ramp bilinear interpolation is exact, so resampling once or twice gives
    the same pixels wherever neither step reads outside the picture.
    """
    size = 32
    rows, columns = np.mgrid[:size, :size].astype(np.float32)
    ramp = np.stack([rows / size, columns / size, (rows + 2 * columns) / (3 * size)], axis=-1)
    images = np.stack([ramp, ramp[::-1], ramp[:, ::-1]])
    zoom = np.array([0.9, 1.1, 0.95], np.float32)
    shift = np.array([[1.5, -1.0], [-0.7, 2.2], [0.0, 0.4]], np.float32)  # (right, down)
    zooming = keras.layers.RandomZoom(0.1, fill_mode="constant")
    translating = keras.layers.RandomTranslation(0.1, 0.1, fill_mode="constant")
    zoomed = zooming.transform_images(
        images, {"height_zoom": zoom[:, None], "width_zoom": zoom[:, None]}, training=True
    )
    expected = translating.transform_images(zoomed, {"translations": shift}, training=True)

    transforms = zoom_and_shift_transforms(tf.constant(zoom), tf.constant(shift), size)
    once = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=[size, size],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )

    inner = (slice(None), slice(5, size - 5), slice(5, size - 5))
    np.testing.assert_allclose(np.asarray(once)[inner], np.asarray(expected)[inner], atol=1e-5)
    assert np.abs(np.asarray(once)[inner] - images[inner]).max() > 0.01  # it did move


def test_zoom_and_shift_draw_within_their_ranges():
    config = NO_COLOUR_OR_GEOMETRY.replace(zoom_range=0.2, shift_range=0.1)
    images = np.zeros((64, 32, 32, 3), dtype=np.uint8)
    images[:, 8:24, 8:24] = 255  # a 16-px square, centred
    augmented = _augment_once(config, images)
    bright = augmented.max(axis=-1) > 127
    sides = bright.any(axis=1).sum(axis=1)
    centres = np.array([np.flatnonzero(row).mean() for row in bright.any(axis=1)])
    # Zoom 0.8-1.2 makes the square 13-20 px wide; a shift of up to 3.2 px moves its centre.
    assert sides.min() >= 12 and sides.max() <= 21 and len(set(sides)) > 2
    assert np.abs(centres - 15.5).max() <= 3.2 / 0.8 + 1 and np.abs(centres - 15.5).max() > 1


def test_iter_images_reports_bad_files_in_place(records, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    paths = [records[0].path, bad, records[1].path]
    results = list(iter_images(paths, 32, workers=2, lookahead=2))
    assert [error is None for _, error in results] == [True, False, True]
    assert "bad.png" in results[1][1]


def _pink_discs(count: int = 8, size: int = 32) -> np.ndarray:
    """Pink discs on black, like NIH crops after resize-with-pad."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2 + 0.5) ** 2 + (xx - size / 2 + 0.5) ** 2 < (size / 3) ** 2
    images = np.zeros((count, size, size, 3), dtype=np.uint8)
    images[:, inside] = (220, 150, 160)
    return images


def test_background_fill_replaces_only_the_black_mask():
    config = NO_COLOUR_OR_GEOMETRY.replace(background_probability=1.0)
    images = _pink_discs()
    augmented = _augment_once(config, images)
    background = images.max(axis=-1) == 0
    # Every black pixel becomes smear-like (pale), no black rim is left ...
    assert augmented[background].min() > 100
    # ... and the cell itself (the symmetric disc is unmoved by flips) is untouched.
    np.testing.assert_array_equal(augmented[~background], images[~background])
    assert len({tuple(image[0, 0]) for image in augmented}) > 1  # each image its own smear


def test_channel_gain_tints_grey_within_its_range():
    config = NO_COLOUR_OR_GEOMETRY.replace(channel_gain_range=0.2)
    augmented = _augment_once(config, np.full((16, 8, 8, 3), 100, dtype=np.uint8)).astype(int)
    assert augmented.min() >= 79 and augmented.max() <= 121
    assert any(len(set(image[0, 0].tolist())) > 1 for image in augmented)


def test_low_resolution_and_blur_smooth_but_keep_flat_images_flat():
    tf.random.set_seed(5)
    noise = np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    flat = np.full((8, 32, 32, 3), 140, dtype=np.uint8)
    for config in (
        NO_COLOUR_OR_GEOMETRY.replace(low_resolution_probability=1.0, low_resolution_min_side=4),
        NO_COLOUR_OR_GEOMETRY.replace(blur_probability=1.0, blur_max_sigma=1.5),
    ):
        # The shrink size and blur width are drawn per batch, and the largest shrink
        # size is no shrink at all: judge the smoothing over several batches.
        smoothed = [_augment_once(config, noise).astype(float).std() for _ in range(10)]
        assert np.mean(smoothed) < 0.9 * noise.astype(float).std()
        assert np.abs(_augment_once(config, flat).astype(int) - 140).max() <= 1


def test_robustness_settings_at_zero_leave_a_disc_unchanged():
    images = _pink_discs()
    augmented = _augment_once(NO_COLOUR_OR_GEOMETRY, images)
    np.testing.assert_array_equal(augmented, images)  # a symmetric disc on black


def test_the_default_recipe_shrinks_or_blurs_some_cells_but_not_all():
    defaults = TrainingConfig()
    assert defaults.low_resolution_probability > 0 and defaults.blur_probability > 0
    config = NO_COLOUR_OR_GEOMETRY.replace(
        low_resolution_probability=defaults.low_resolution_probability,
        blur_probability=defaults.blur_probability,
    )
    images = _pink_discs(count=64)
    changed = np.any(_augment_once(config, images) != images, axis=(1, 2, 3))
    # Neither happens to 0.75 x 0.85 = 64% of cells: all or none of 64 is ~1e-12.
    assert 0 < changed.sum() < len(changed)


def test_the_symmetries_are_the_eight_of_the_square_each_drawn():
    image = np.arange(5 * 5).reshape(5, 5)
    expected = {np.rot90(grid, turns).tobytes() for grid in (image, image.T) for turns in range(4)}
    permutations = symmetry_permutations(5)
    assert {image.ravel()[order].reshape(5, 5).tobytes() for order in permutations} == expected

    batch = np.repeat(np.arange(16, dtype=np.uint8).reshape(1, 4, 4, 1), 800, axis=0)
    batch = np.repeat(batch, 3, axis=3)
    augmented = _augment_once(NO_COLOUR_OR_GEOMETRY, batch)
    seen = [image[..., 0].tobytes() for image in augmented]
    counts = sorted(seen.count(view) for view in set(seen))
    assert len(counts) == 8 and counts[0] > 60  # uniform: 100 each expected


def _colour_step_by_step(x, brightness, contrast, saturation, gain, hue_angle):
    """The stain jitter as five separate passes, as the formulas read (the reference)."""
    x = x + brightness[:, None, None, None]
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * contrast[:, None, None, None] + mean
    gray = (x * np.array([0.299, 0.587, 0.114])).sum(axis=-1, keepdims=True)
    x = gray + (x - gray) * saturation[:, None, None, None]
    x = x * gain[:, None, None, :]
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = np.cos(hue_angle), np.sin(hue_angle)
    for index in range(len(x)):
        rotation = np.array([[1, 0, 0], [0, cos[index], -sin[index]], [0, sin[index], cos[index]]])
        matrix = np.linalg.inv(to_yiq) @ rotation @ to_yiq
        x[index] = x[index] @ matrix.T
    return x


def test_the_fused_colour_jitter_equals_the_five_steps():
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, (6, 8, 8, 3))
    draws = {
        "brightness": rng.uniform(-0.1, 0.1, 6),
        "contrast": rng.uniform(0.8, 1.2, 6),
        "saturation": rng.uniform(0.8, 1.2, 6),
        "gain": rng.uniform(0.9, 1.1, (6, 3)),
        "hue_angle": rng.uniform(-0.3, 0.3, 6),
    }
    tensors = {name: tf.constant(value, tf.float32) for name, value in draws.items()}
    image_mean = tf.constant(x.mean(axis=(1, 2, 3)), tf.float32)

    matrix, offset = colour_transform(ColourDraws(**tensors), image_mean)
    fused = np.einsum("bhwj,bji->bhwi", x, matrix.numpy()) + offset.numpy()[:, None, None, :]

    np.testing.assert_allclose(fused, _colour_step_by_step(x.copy(), **draws), atol=1e-5)


def test_mixup_blends_each_image_and_its_target_with_the_same_partner_and_weight():
    tf.random.set_seed(3)
    values = np.linspace(0.0, 1.0, 64, dtype=np.float32)
    images = tf.constant(np.broadcast_to(values[:, None, None, None], (64, 4, 4, 3)))
    # A soft target that spells out each image's grey level: blended with the same
    # weight and partner as the image, it must still equal the blended grey level.
    targets = tf.constant(np.stack([1.0 - values, values], axis=1))
    mixed_images, mixed_targets = mixup(images, targets, alpha=0.4)
    mixed_images, mixed_targets = mixed_images.numpy(), mixed_targets.numpy()
    assert mixed_images.shape == (64, 4, 4, 3) and mixed_targets.shape == (64, 2)
    np.testing.assert_allclose(mixed_images.std(axis=(1, 2, 3)), 0.0, atol=1e-6)
    np.testing.assert_allclose(mixed_images[:, 0, 0, 0], mixed_targets[:, 1], atol=1e-5)
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(mixed_images[:, 0, 0, 0] - values).max() > 0.05  # some images were blended


def test_small_mixup_alpha_keeps_most_blends_near_one_image():
    tf.random.set_seed(4)
    one_hot_targets = tf.constant(np.eye(2, dtype=np.float32)[np.arange(4000) % 2])
    images = tf.zeros((4000, 1, 1, 1))

    def share_near_an_end(alpha: float) -> float:
        _, mixed = mixup(images, one_hot_targets, alpha)
        # Partners of the other class show the weight; a same-class partner shows 0 or 1.
        weights = mixed.numpy()[:, 1]
        return float(np.mean((weights < 0.1) | (weights > 0.9)))

    # Beta(0.2, 0.2) puts 67% of its mass within 0.1 of 0 or 1, Beta(8, 8) under 0.01%;
    # half the partners share the label, so the shares expected are 0.84 and 0.50.
    assert share_near_an_end(0.2) > 0.8
    assert share_near_an_end(8.0) < 0.55


def test_augmenter_with_mixup_gives_soft_targets_that_still_sum_to_one():
    config = CONFIG.replace(mixup_alpha=1.0)
    images = np.random.default_rng(1).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    targets = np.eye(2, dtype=np.float32)[np.arange(32) % 2]
    augmented, mixed = make_batch_augmenter(config)(images, targets)
    assert augmented.dtype == tf.uint8 and augmented.shape == images.shape
    mixed = np.asarray(mixed)
    np.testing.assert_allclose(mixed.sum(axis=1), 1.0, atol=1e-6)
    assert ((mixed > 0.01) & (mixed < 0.99)).any()
    _, unmixed = make_batch_augmenter(CONFIG)(images, targets)
    np.testing.assert_array_equal(np.asarray(unmixed), targets)
