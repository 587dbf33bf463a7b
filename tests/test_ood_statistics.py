"""Image statistics of the model input: cells, blanks, mosaics and smear backgrounds."""

import numpy as np
import pytest
from _synthetic import LIGHT_SMEAR, drawn_cells, model_inputs, native_cells
from PIL import Image, ImageDraw

from malaria_classifier.ood_statistics import (
    STATISTIC_NAMES,
    _content_box,
    _thickness,
    border_colours,
    image_statistics,
)
from malaria_classifier.stress import SMEAR_COLOUR, fill_background


def _stat(statistics, name):
    return statistics[:, STATISTIC_NAMES.index(name)]


def test_statistics_of_a_drawn_cell_a_blank_and_a_mosaic():
    cell = drawn_cells(1)
    blank = np.zeros((1, 64, 64, 3), np.uint8)
    tile = Image.new("RGB", (32, 32))
    ImageDraw.Draw(tile).ellipse([0, 0, 31, 31], fill=(220, 150, 170))  # a crop: disc fills box
    mosaic = np.tile(np.asarray(tile), (2, 2, 1))[None]
    statistics = image_statistics(np.concatenate([cell, blank, mosaic]))
    assert statistics.shape == (3, len(STATISTIC_NAMES))
    # a disc in its box: the corners (about 1 - pi/4 of the box) are black, none enclosed
    assert 0.1 < _stat(statistics, "content_dark_fraction")[0] < 0.35
    assert _stat(statistics, "enclosed_dark_fraction")[0] == 0.0
    assert _stat(statistics, "largest_blob_fraction")[0] == 1.0
    assert _stat(statistics, "dark_fraction")[1] == 1.0
    # four touching discs: black enclosed between them
    assert _stat(statistics, "enclosed_dark_fraction")[2] > 0.0


def test_black_background_statistics_are_the_black_mask_as_before():
    """NIH crops: background is exactly "brightest channel < 30", colours are its complement's."""
    batch = model_inputs(native_cells(6))
    batch[0, 20:24, 20:24] = (25, 10, 29)  # a dark but not black patch inside a cell
    statistics = image_statistics(batch)
    black = batch.max(axis=3) < 30
    assert _stat(statistics, "dark_fraction") == pytest.approx(black.mean(axis=(1, 2)))
    red_of_object = [
        image[..., 0][~mask].mean() / 255 for image, mask in zip(batch, black, strict=True)
    ]
    assert _stat(statistics, "foreground_red") == pytest.approx(red_of_object, rel=1e-5)
    assert (_stat(statistics, "largest_blob_fraction") == 1.0).all()
    assert (_stat(statistics, "thickness") > 0.8).all()  # a disc: about 1


def test_border_colour_is_black_for_nih_crops_and_the_smear_for_smear_crops():
    cell = native_cells(1)[0]
    smeared = fill_background(cell, np.random.default_rng(0), colour=SMEAR_COLOUR)
    gradient = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
    batch = model_inputs([cell, smeared, gradient])
    black = batch.max(axis=3) < 30
    colours, agreement = border_colours(batch, _content_box(black))
    assert colours[0].max() < 30
    assert np.abs(colours[1] - SMEAR_COLOUR).max() <= 3 and agreement[1] > 0.5
    assert agreement[2] < 0.5  # a gradient's edge has no single colour: no background


def test_a_smear_background_is_measured_like_the_black_one():
    cells = native_cells(8)
    rng = np.random.default_rng(1)
    black = image_statistics(model_inputs(cells))
    smeared = image_statistics(
        model_inputs([fill_background(cell, rng, colour=LIGHT_SMEAR) for cell in cells])
    )
    # the antialiased rim blends into the smear, so a little more is background
    # (not the content-box fraction: a drawn cell's black margin is trimmed like padding)
    for name in ("dark_fraction", "foreground_red", "thickness"):
        assert _stat(smeared, name) == pytest.approx(_stat(black, name), abs=0.05), name
    assert (_stat(smeared, "largest_blob_fraction") == 1.0).all()
    # sharpness is relative to the object's contrast, so a pale step is no "blur" (raw
    # gradients would drop to a fifth; a heavily blurred cell is below 0.15)
    assert (
        _stat(smeared, "relative_edge_sharpness") > 0.5 * _stat(black, "relative_edge_sharpness")
    ).all()


def test_a_picture_running_past_its_edges_has_little_background_on_them():
    """A cell is cut out of its surroundings; a landscape continues past the frame."""
    landscape = np.zeros((90, 120, 3), np.uint8)
    landscape[:50] = (120, 180, 230)  # sky: the border colour
    landscape[50:] = (70, 140, 50)  # ground: the "object", along the whole bottom edge
    statistics = image_statistics(model_inputs([native_cells(1)[0], landscape]))
    edge = _stat(statistics, "box_edge_dark_fraction")
    assert edge[0] > 0.6 and edge[1] < 0.6


def _stacked_chamfer_thickness(solid: np.ndarray) -> np.ndarray:
    """The thickness as the limits were fitted: scipy's city-block transform over the stack."""
    from scipy import ndimage

    n, height, width = solid.shape
    padded = np.zeros((n, height + 1, width + 1), dtype=bool)
    padded[:, :height, :width] = solid
    distance = ndimage.distance_transform_cdt(
        padded.reshape(n * (height + 1), width + 1), metric="taxicab"
    )
    radius = distance.reshape(n, height + 1, width + 1).max(axis=(1, 2))
    area = solid.sum(axis=(1, 2))
    return np.where(area > 0, radius / np.sqrt(np.maximum(area, 1) / np.pi), 0.0)


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 64, 64), (40, 64, 64), (7, 20, 31)])
def test_thickness_equals_the_chamfer_transform_it_replaced(shape):
    rng = np.random.default_rng(sum(shape))
    rows, columns = np.mgrid[: shape[1], : shape[2]]
    for share in (0.5, 0.9, 0.99, 1.0):
        solid = rng.random(shape) < share
        # and discs of random centre and radius, some cut by the picture's edges
        centre = rng.integers(0, max(shape[1:]), (shape[0], 2))
        radius = rng.integers(1, max(shape[1:]) + 1, shape[0])
        discs = (rows - centre[:, 0, None, None]) ** 2 + (
            columns - centre[:, 1, None, None]
        ) ** 2 <= radius[:, None, None] ** 2
        for mask in (solid, discs, solid & discs):
            np.testing.assert_array_equal(_thickness(mask), _stacked_chamfer_thickness(mask))
