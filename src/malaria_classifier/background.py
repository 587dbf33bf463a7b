"""Cut a cell out of a smear background, so another laboratory's crop looks like an NIH one.

The NIH crops were cut along each cell's outline and the rest of the box set to black,
so every model here learned cells on black, filling their picture. Other laboratories
often keep the smear around the cell (the P. vivax set: rectangular crops with the
cell in the middle and smear all round). To the model that smear is unexplained
texture and the cell is smaller than any it has seen. :func:`isolate_cell` undoes
both: it finds the smear by its colour at the picture's edge, blacks it out, and crops
to the cell, which is what the NIH pipeline did to its own cells.

It runs on every image before the resize to the model's input (``images._fit_square``),
in training, evaluation and serving alike. A crop whose edge is mostly black (every NIH
crop) is returned as it is, after one look at its edge; so is anything that is not
plainly one object on a uniform background (a photo, a blurred cell, a field of many
cells), which the Not-a-cell check then judges as before.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

# A pixel whose brightest channel is below this is black (the NIH mask).
DARK_LEVEL = 30
# Width, in pixels, of the picture's edge that is read to find the background.
RING_WIDTH = 2
# The edge is a smear only when at least this share of it is within TOLERANCE of its
# median colour (a smear is one colour all round; a photo or a blurred cell is a mix).
MIN_BORDER_AGREEMENT = 0.5
# Largest channel difference from the smear colour that is still smear: three standard
# deviations of a smear's sensor noise at native size (sigma about 6; the few pixels
# beyond it are isolated specks that an opening removes), yet below the step from smear
# to cell: only ~3% of NIH cell pixels lie within 18 of the stress smear colour, ~25%
# within 30. The Not-a-cell check (ood.py) uses the same three figures.
TOLERANCE = 18.0
# The cell must cover at least this share of the picture; below it, what stands out
# from the smear is debris or nothing, and the picture is left alone.
MIN_CELL_SHARE = 0.05
# Other objects inside the picture may cover at most this multiple of the cell's area;
# more means a field of cells, not a crop of one. (Neighbours cut by the crop's edge do
# not count: see _choose_cell.)
MAX_OTHER_OBJECTS = 0.5
# A cell clear of the picture's edge is preferred to a bigger neighbour cut by the edge
# (an infected neighbour can be twice the cell's size) when it is at least this share of
# the largest object.
MIN_SHARE_OF_LARGEST = 0.25
# The largest disc that fits inside the object must cover at least this share of it. A
# red cell is round or oval (NIH cells cut out on a smear: 0.59 and up for 95% of them,
# median 0.78); a clump of overlapping cells in a field of view is not (median 0.36), and
# a field must stay as it is, for the Not-a-cell check to reject it.
MIN_ROUNDNESS = 0.55
# A crop of one cell is a few hundred pixels a side even at high magnification; a
# bigger picture (a whole field photo, up to images.MAX_IMAGE_PIXELS) is not one, and
# cutting it would cost seconds and hundreds of MB per image, so it is left alone.
MAX_CROP_PIXELS = 1_000_000


def smear_colour(image: np.ndarray) -> np.ndarray | None:
    """The colour of the background around the picture's edge, or None when it is black.

    None too when the edge is not one colour (fewer than ``MIN_BORDER_AGREEMENT`` of its
    pixels within ``TOLERANCE`` of the median), since then there is no background to
    remove, and for pictures too large to be a crop of one cell (``MAX_CROP_PIXELS``).
    """
    height, width = image.shape[:2]
    if min(height, width) <= 4 * RING_WIDTH or height * width > MAX_CROP_PIXELS:
        return None
    # Fast path, the common case: a cell cut out along its outline has black corners.
    corners = image[:: height - 1, :: width - 1]  # a 2x2 view: no copy
    if corners.max() < DARK_LEVEL:
        return None
    ring = np.concatenate(
        [
            image[:RING_WIDTH].reshape(-1, 3),
            image[-RING_WIDTH:].reshape(-1, 3),
            image[RING_WIDTH:-RING_WIDTH, :RING_WIDTH].reshape(-1, 3),
            image[RING_WIDTH:-RING_WIDTH, -RING_WIDTH:].reshape(-1, 3),
        ]
    )
    light = ring.max(axis=1) >= DARK_LEVEL
    if light.mean() < MIN_BORDER_AGREEMENT:
        return None
    colour = np.median(ring[light], axis=0)
    agreement = (np.abs(ring.astype(np.float32) - colour).max(axis=1) <= TOLERANCE).mean()
    return colour.astype(np.float32) if agreement >= MIN_BORDER_AGREEMENT else None


def isolate_cell(image: np.ndarray) -> np.ndarray:
    """The cell on black, cropped to it, when ``image`` keeps a smear background.

    Args:
        image: An RGB uint8 array ``(height, width, 3)``; it is never modified.

    Returns:
        ``image`` itself when there is no smear to remove (NIH crops, photos) or what
        stands out is not one round object (fields of cells, debris); otherwise a new
        array: the largest object that stands out from the smear (specks removed,
        filled out to its convex hull) with everything else black, cropped to its
        bounding box.
    """
    colour = smear_colour(image)
    if colour is None:
        return image
    foreground = _differs_from(image, colour)
    # Opening drops the specks of smear noise that pass the tolerance.
    foreground = dilate_cross(erode_cross(foreground))
    labels, count = ndimage.label(foreground)
    if count == 0:
        return image
    areas = np.bincount(labels.ravel())[1:]
    largest, others = _choose_cell(labels, areas)
    cell_area = areas[largest]
    if cell_area < MIN_CELL_SHARE * labels.size:
        return image
    if others > MAX_OTHER_OBJECTS * cell_area:
        return image
    # Everything below works on the cell's box plus one pixel of background (clipped at
    # the picture's edge): the same results as on the whole picture (the nearest
    # background pixel, the background reaching the edge, the hull all lie within it),
    # for a fraction of the pixels.
    window = _around(ndimage.find_objects(labels, max_label=largest + 1)[largest], labels.shape)
    cell = ndimage.binary_fill_holes(labels[window] == largest + 1)
    if roundness(cell) < MIN_ROUNDNESS:
        return image
    cell = _convex_hull(cell, origin=(window[0].start, window[1].start), shape=labels.shape)
    rows, columns = np.flatnonzero(cell.any(axis=1)), np.flatnonzero(cell.any(axis=0))
    box = (slice(rows[0], rows[-1] + 1), slice(columns[0], columns[-1] + 1))
    cell = cell[box]
    top, left = window[0].start + rows[0], window[1].start + columns[0]
    picture = image[top : top + cell.shape[0], left : left + cell.shape[1]]
    return np.where(cell[:, :, None], picture, 0).astype(np.uint8)


def _choose_cell(labels: np.ndarray, areas: np.ndarray) -> tuple[int, int]:
    """Which object is the cell (index into ``areas``), and the area of the other objects.

    A box drawn around one cell of a smear also catches the edges of its neighbours:
    objects that touch the picture's edge. They are not counted as other objects, and
    the cell is the largest object clear of the edge when that one is big enough to be
    it (``MIN_CELL_SHARE`` of the picture and ``MIN_SHARE_OF_LARGEST`` of the largest
    object, so a parasite's dot inside a pale-centred cell is never taken for it);
    only in a tight crop, where the cell itself reaches the edge, is it the largest
    object of all (and then every other object counts, as before). A field of whole
    cells still has other objects inside the picture, so it is still left alone.
    """
    on_edge = np.zeros(len(areas) + 1, dtype=bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        on_edge[edge] = True
    on_edge = on_edge[1:]
    inside = np.where(on_edge, 0, areas)
    if inside.max(initial=0) >= max(
        MIN_CELL_SHARE * labels.size, MIN_SHARE_OF_LARGEST * areas.max()
    ):
        cell = int(inside.argmax())
        return cell, int(inside.sum() - inside[cell])
    cell = int(areas.argmax())
    return cell, int(areas.sum() - areas[cell])


def _differs_from(image: np.ndarray, colour: np.ndarray) -> np.ndarray:
    """Pixels whose largest channel difference from ``colour`` exceeds ``TOLERANCE``.

    Channel by channel (a reduction over a last axis of length 3 is slow in numpy).
    """
    pixels = image.astype(np.float32)
    difference = np.abs(pixels[:, :, 0] - colour[0])
    for channel in (1, 2):
        np.maximum(difference, np.abs(pixels[:, :, channel] - colour[channel]), out=difference)
    return difference > TOLERANCE


def erode_cross(mask: np.ndarray) -> np.ndarray:
    """Binary erosion by a 3x3 cross over the last two axes, outside the picture empty.

    What ``scipy.ndimage.binary_erosion`` gives with its default cross on one picture,
    and on a stack of pictures (``(n, height, width)``) without one touching the next;
    by shifted array operations, several times faster on pictures of this size.
    """
    eroded = mask.copy()
    eroded[..., 1:, :] &= mask[..., :-1, :]
    eroded[..., :-1, :] &= mask[..., 1:, :]
    eroded[..., :, 1:] &= mask[..., :, :-1]
    eroded[..., :, :-1] &= mask[..., :, 1:]
    eroded[..., [0, -1], :] = False
    eroded[..., :, [0, -1]] = False
    return eroded


def dilate_cross(mask: np.ndarray) -> np.ndarray:
    """Binary dilation by a 3x3 cross over the last two axes (``binary_dilation``'s default)."""
    dilated = mask.copy()
    dilated[..., 1:, :] |= mask[..., :-1, :]
    dilated[..., :-1, :] |= mask[..., 1:, :]
    dilated[..., :, 1:] |= mask[..., :, :-1]
    dilated[..., :, :-1] |= mask[..., :, 1:]
    return dilated


def _around(box: tuple[slice, slice], shape: tuple[int, ...]) -> tuple[slice, slice]:
    """``box`` grown by one pixel on every side, clipped to an array of ``shape``."""
    return tuple(
        slice(max(part.start - 1, 0), min(part.stop + 1, size))
        for part, size in zip(box, shape[:2], strict=True)
    )


def roundness(mask: np.ndarray) -> float:
    """Area of the largest disc inside ``mask``, as a share of the mask's area.

    1 for a disc, about 0.7 for an oval of axis ratio 0.7, low for a clump of several
    overlapping cells (its widest inner disc is one cell's).
    """
    radius = float(ndimage.distance_transform_edt(mask).max())
    return float(np.pi * radius**2 / max(int(mask.sum()), 1))


def _convex_hull(
    mask: np.ndarray, origin: tuple[int, int] = (0, 0), shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """The smallest convex region holding ``mask``.

    A red cell is a convex disc, but parts of it can be as pale as the smear (the
    centre, a rim, the halo round a parasite) and drop out of the mask; the hull puts
    them back, where filling holes would miss the ones that touch the outline.

    Args:
        mask: The object, possibly a window of a larger picture.
        origin: Where the window's top-left pixel lies in that picture.
        shape: The picture's shape. The hull is drawn in the picture's coordinates,
            because Pillow's polygon edges depend on where the vertices lie (drawn
            shifted, one edge pixel in ~1% of cells came out differently).
    """
    outline = mask & ~erode_cross(mask)
    rows, columns = np.nonzero(outline)
    top, left = origin
    points = np.column_stack([columns + left, rows + top]).astype(np.float64)
    try:
        vertices = points[ConvexHull(points).vertices]
    except QhullError:  # a line or a point: nothing to fill
        return mask
    height, width = shape[:2] if shape is not None else mask.shape
    canvas = Image.new("L", (width, height), 0)
    ImageDraw.Draw(canvas).polygon([tuple(vertex) for vertex in vertices], fill=1, outline=1)
    hull = np.asarray(canvas, dtype=bool)[top : top + mask.shape[0], left : left + mask.shape[1]]
    return hull | mask
