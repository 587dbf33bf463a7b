"""Stress variants imitate other labs' cells without touching what they should keep."""

import numpy as np
import pytest
from _synthetic import draw_cell
from scipy import ndimage

from malaria_classifier.stress import (
    MIN_CELL_CONTRAST,
    PURPLE_STAIN_MEAN,
    add_context,
    add_neighbours,
    background_mask,
    blur,
    draw_lab_variant,
    draw_smear_colour,
    fill_background,
    rescale,
    rescale_to_side,
    shift_hue,
    stress_variants,
    transfer_stain,
)


@pytest.fixture
def cell():
    return np.asarray(draw_cell(60, parasitized=True, rng=np.random.default_rng(0)))[:, :50]


def test_rescaling_sets_the_crop_size(cell):
    assert rescale(cell, 0.5).shape == (30, 25, 3)
    assert max(rescale_to_side(cell, 15).shape[:2]) == 15


def test_smear_background_fills_exactly_the_black_mask(cell):
    filled = fill_background(cell, np.random.default_rng(0))
    mask = background_mask(cell)
    assert mask.any() and not background_mask(filled).any()
    np.testing.assert_array_equal(filled[~mask], cell[~mask])
    assert 170 < filled[mask].mean() < 215


def test_stain_transfer_moves_the_cell_mean_and_keeps_the_background(cell):
    stained = transfer_stain(cell)
    foreground = ~background_mask(cell)
    np.testing.assert_allclose(stained[foreground].mean(axis=0), PURPLE_STAIN_MEAN, atol=2)
    assert (stained[~foreground] == 0).all()


def test_hue_shift_changes_the_cell_colour_only(cell):
    shifted = shift_hue(cell, 0.1)
    foreground = ~background_mask(cell)
    assert np.abs(shifted[foreground].astype(int) - cell[foreground]).mean() > 10
    assert (shifted[~foreground] == 0).all()


def test_context_crop_is_a_larger_rectangle_without_black(cell):
    framed = add_context(cell, np.random.default_rng(0), width_factor=1.5, height_factor=1.2)
    assert framed.shape == (72, 75, 3)
    assert not background_mask(framed).any()


def test_neighbours_are_cut_by_the_crop_edge_and_keep_clear_of_the_cell(cell):
    framed = add_neighbours(cell, np.random.default_rng(3), count=3)
    plain = add_neighbours(cell, np.random.default_rng(3), count=0)  # same draws, no neighbour

    assert framed.shape == (78, 80, 3)  # 1.3 x 1.6 the cell's box
    assert not background_mask(framed).any()
    changed = np.abs(framed.astype(int) - plain).max(axis=2) > 0
    assert changed.any()  # neighbours were painted ...
    edge = np.zeros(changed.shape, bool)
    edge[[0, -1]] = edge[:, [0, -1]] = True
    assert (changed & edge).any()  # ... reaching the crop's edge ...
    # ... and never within 2 px of the cell, wherever near the middle it was put.
    inside = ~background_mask(cell)
    placed = [
        (top, left)
        for top in range(8, 11)
        for left in range(13, 18)
        if (plain[top : top + 60, left : left + 50][inside] == cell[inside]).all()
    ]
    assert len(placed) == 1
    top, left = placed[0]
    near_cell = np.zeros(changed.shape, bool)
    near_cell[top : top + 60, left : left + 50] = inside
    near_cell = ndimage.binary_dilation(near_cell, iterations=2)
    assert not (changed & near_cell).any()


def test_blur_softens_edges(cell):
    assert (
        np.abs(np.diff(blur(cell, 2.0).astype(int), axis=1)).mean()
        < np.abs(np.diff(cell.astype(int), axis=1)).mean()
    )


def test_every_variant_returns_an_rgb_image(cell):
    for name, variant in stress_variants().items():
        result = variant(cell, np.random.default_rng(0))
        assert result.dtype == np.uint8 and result.ndim == 3 and result.shape[2] == 3, name


def test_drawn_lab_variants_repeat_with_the_seed_and_cover_every_change(cell):
    draws = [draw_lab_variant(cell, np.random.default_rng([1, i])) for i in range(200)]
    again = draw_lab_variant(cell, np.random.default_rng([1, 7]))
    np.testing.assert_array_equal(again[0], draws[7][0])
    assert again[1] == draws[7][1]
    names = {change for _, name in draws for change in name.split(" + ")}
    assert names == {
        "hue",
        "saturation",
        "stain transfer",
        "smear background",
        "smear rectangle",
        "blur",
        "rescale",
    }
    for image, name in draws:
        assert name and image.dtype == np.uint8 and image.shape[2] == 3


def test_a_drawn_smear_is_brighter_than_the_cell():
    rng = np.random.default_rng(0)
    for cell_gray in (0.0, 150.0, 200.0):
        for _ in range(50):
            colour = draw_smear_colour(rng, cell_gray)
            assert np.mean(colour) >= cell_gray + MIN_CELL_CONTRAST - 1
    assert max(draw_smear_colour(rng, 240.0)) <= 250  # never past white
