"""Cutting a cell out of a smear background (background.py) and its place before the resize."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull

from malaria_classifier.background import (
    dilate_cross,
    erode_cross,
    isolate_cell,
    roundness,
    smear_colour,
)
from malaria_classifier.images import load_rgb_image, resize_with_pad
from malaria_classifier.stress import add_context, background_mask, fill_background

SMEAR = (212, 190, 196)
PINK = (225, 150, 165)
PURPLE = (80, 20, 110)


def cell_on(background: tuple[int, int, int], width: int = 150, height: int = 110) -> np.ndarray:
    """A pink ellipse with a purple dot, centred on ``background`` with sensor noise."""
    rng = np.random.default_rng(0)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    draw.ellipse([45, 15, 105, 95], fill=PINK)
    draw.ellipse([70, 40, 80, 50], fill=PURPLE)
    pixels = np.asarray(image).astype(np.int16)
    if background != (0, 0, 0):
        pixels += rng.normal(0, 4, pixels.shape).round().astype(np.int16)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def test_a_cell_on_black_is_returned_as_it_is():
    image = cell_on((0, 0, 0))
    assert smear_colour(image) is None
    assert isolate_cell(image) is image


def test_a_cell_on_a_smear_becomes_the_cell_on_black_cropped_to_it():
    image = cell_on(SMEAR)
    before = image.copy()
    colour = smear_colour(image)
    assert colour is not None and np.abs(colour - SMEAR).max() < 6
    isolated = isolate_cell(image)
    np.testing.assert_array_equal(image, before)  # the input is never modified
    # The ellipse spans 61 x 81 px.
    assert 79 <= isolated.shape[0] <= 83 and 59 <= isolated.shape[1] <= 63
    corners = isolated[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert corners.max() == 0  # black around the cell, as in an NIH crop
    parasite = np.abs(isolated.astype(int) - PURPLE).max(axis=2) < 20
    assert parasite.sum() > 50  # the 11 px dot survives
    cell_pixels = isolated.max(axis=2) > 0
    ellipse_area = np.pi * 30.5 * 40.5
    assert abs(cell_pixels.sum() - ellipse_area) < 0.1 * ellipse_area


def test_a_cell_cut_by_the_crop_edge_keeps_its_pale_centre_and_ends_at_the_edge():
    image = cell_on(SMEAR)
    # A pale centre the colour of the smear, then the crop cut through the cell's left side.
    image[45:65, 65:85] = SMEAR
    cut = image[:, 60:].copy()
    isolated = isolate_cell(cut)
    assert isolated is not cut
    assert isolated.shape[1] == 105 - 60 + 1  # from the crop's edge to the ellipse's right
    cell_pixels = isolated.max(axis=2) > 0
    assert cell_pixels[30:50, 5:25].all()  # the pale centre is part of the cell again
    assert cell_pixels[:, 0].sum() > 40  # the cell runs to the crop's edge


@pytest.mark.parametrize("shape", [(1, 1), (2, 9), (37, 41), (3, 16, 12)])
def test_cross_erosion_and_dilation_match_scipy_picture_by_picture(shape):
    rng = np.random.default_rng(sum(shape))
    for share in (0.3, 0.7, 0.95):
        mask = rng.random(shape) < share
        pictures = mask if mask.ndim == 3 else mask[None]
        expected_eroded = np.stack([ndimage.binary_erosion(picture) for picture in pictures])
        expected_dilated = np.stack([ndimage.binary_dilation(picture) for picture in pictures])
        np.testing.assert_array_equal(erode_cross(mask).reshape(pictures.shape), expected_eroded)
        np.testing.assert_array_equal(dilate_cross(mask).reshape(pictures.shape), expected_dilated)


@pytest.mark.parametrize(
    "description, image",
    [
        ("flat colour", np.full((90, 90, 3), 180, dtype=np.uint8)),
        ("noise photo", np.random.default_rng(1).integers(0, 256, (90, 90, 3), dtype=np.uint8)),
        ("tiny speck", cell_on(SMEAR, 150, 110)[:, :40].copy()),
    ],
)
def test_pictures_that_are_not_one_cell_on_a_smear_are_left_alone(description, image):
    assert isolate_cell(image) is image, description


def test_a_picture_too_large_to_be_one_crop_is_left_alone_without_being_cut():
    small = cell_on(SMEAR)
    large = np.asarray(Image.fromarray(small).resize((1500, 1100)))  # the same, 1.65 Mpx
    assert isolate_cell(small) is not small
    assert isolate_cell(large) is large


def test_a_field_of_many_cells_is_left_alone_for_the_not_a_cell_check():
    field = Image.new("RGB", (240, 240), SMEAR)
    draw = ImageDraw.Draw(field)
    for row in range(4):
        for column in range(4):
            x, y = 10 + 58 * column, 10 + 58 * row
            draw.ellipse([x, y, x + 48, y + 48], fill=PINK)
    image = np.asarray(field).copy()
    assert isolate_cell(image) is image


NEIGHBOUR_LAYOUTS = {
    # Two neighbours, one cut by the left edge and one by the top right corner: together
    # more than half the cell's area (a field, by the inside-the-picture count).
    "two neighbours": [[-55, 5, 27, 115], [120, -55, 230, 18]],
    # One neighbour whose part inside the box is bigger than the cell, as an enlarged,
    # infected vivax neighbour can be.
    "a bigger neighbour": [[-120, -60, 38, 170]],
}


@pytest.mark.parametrize("layout", NEIGHBOUR_LAYOUTS)
def test_neighbours_cut_by_the_box_edge_are_dropped_and_the_middle_cell_kept(layout):
    picture = Image.fromarray(cell_on(SMEAR))
    for box in NEIGHBOUR_LAYOUTS[layout]:
        ImageDraw.Draw(picture).ellipse(box, fill=PINK)
    image = np.asarray(picture).copy()

    isolated = isolate_cell(image)

    assert isolated is not image
    assert 79 <= isolated.shape[0] <= 83 and 59 <= isolated.shape[1] <= 63  # the ellipse
    parasite = np.abs(isolated.astype(int) - PURPLE).max(axis=2) < 20
    assert parasite.sum() > 50


def test_a_clump_of_overlapping_cells_is_not_round_and_is_left_alone():
    clump = Image.new("RGB", (220, 160), SMEAR)
    draw = ImageDraw.Draw(clump)
    for x in (20, 70, 120):  # three cells in a row, each overlapping the next
        draw.ellipse([x, 40, x + 80, 120], fill=PINK)
    image = np.asarray(clump).copy()
    assert isolate_cell(image) is image


def test_roundness_is_one_for_a_disc_and_lower_for_ovals_and_clumps():
    rows, columns = np.mgrid[:101, :101]
    disc = (rows - 50) ** 2 + (columns - 50) ** 2 <= 40**2
    oval = ((rows - 50) / 20) ** 2 + ((columns - 50) / 40) ** 2 <= 1
    assert roundness(disc) == pytest.approx(1.0, abs=0.06)
    assert roundness(oval) == pytest.approx(0.5, abs=0.06)  # axis ratio 0.5


def test_the_model_input_of_a_smear_crop_matches_the_cell_cut_out_on_black():
    on_smear = resize_with_pad(cell_on(SMEAR), 64)
    on_black = resize_with_pad(cell_on((0, 0, 0))[15:96, 45:106], 64)
    # Same cell filling the same square; only the rim and the noise differ.
    difference = np.abs(on_smear.astype(int) - on_black.astype(int)).max(axis=2)
    assert np.mean(difference > 40) < 0.03


def test_real_cells_put_back_on_a_smear_come_back_as_their_nih_crop(shared_data_dir):
    paths = sorted((shared_data_dir / "Parasitized").glob("*.png"))[::400][:20]
    rng = np.random.default_rng(0)
    area_ratios = []
    for path in paths:
        cell = load_rgb_image(path)
        mask = ~background_mask(cell)
        for changed in (fill_background(cell, rng, SMEAR), add_context(cell, rng, colour=SMEAR)):
            isolated = isolate_cell(changed)
            if isolated is not changed:
                area_ratios.append((isolated.max(axis=2) > 0).sum() / mask.sum())
    # Nearly all are cut out (a very oval or pale cell can fail the roundness test and
    # is left for the Not-a-cell check) ...
    assert len(area_ratios) >= 0.9 * 2 * len(paths)
    # ... to the NIH cell's area within a few percent (the convex hull adds the concave
    # bits of a ragged outline, a pale rim can drop out).
    assert 0.97 < np.median(area_ratios) < 1.06
    assert min(area_ratios) > 0.75


def _whole_picture_cut_out(image: np.ndarray) -> np.ndarray:
    """The cut-out done the plain way, every step on the whole picture with scipy.

    ``isolate_cell`` does the later steps on the cell's window only; this reference
    says that changes no pixel.
    """
    colour = smear_colour(image)
    foreground = np.abs(image.astype(np.float32) - colour).max(axis=2) > 18
    labels, _ = ndimage.label(ndimage.binary_opening(foreground))
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    cell = ndimage.binary_fill_holes(labels == largest)
    outline = cell & ~ndimage.binary_erosion(cell)
    rows, columns = np.nonzero(outline)
    points = np.column_stack([columns, rows]).astype(np.float64)
    vertices = points[ConvexHull(points).vertices]
    canvas = Image.new("L", (cell.shape[1], cell.shape[0]), 0)
    ImageDraw.Draw(canvas).polygon([tuple(vertex) for vertex in vertices], fill=1, outline=1)
    cell |= np.asarray(canvas, dtype=bool)
    rows, columns = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    return np.where(cell[box][:, :, None], image[box], 0).astype(np.uint8)


def test_the_windowed_cut_out_equals_the_whole_picture_one(shared_data_dir):
    paths = sorted(shared_data_dir.glob("*/*.png"))[::50][:400]
    rng = np.random.default_rng(3)
    compared = 0
    for path in paths:
        on_smear = add_context(load_rgb_image(path), rng, colour=SMEAR)
        height, width = on_smear.shape[:2]
        for crop in (on_smear, on_smear[height // 5 :, : width - width // 6]):  # cut at the edge
            isolated = isolate_cell(crop)
            if isolated is crop:
                continue
            np.testing.assert_array_equal(isolated, _whole_picture_cut_out(crop), err_msg=path.name)
            compared += 1
    assert compared >= 400
