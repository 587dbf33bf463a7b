"""Image statistics of the model input: the first family of "Not a cell" signals.

One column per name in :data:`STATISTIC_NAMES` (background, colour, shape, edge,
texture), computed for a whole batch at once because it runs on every prediction;
:mod:`malaria_classifier.ood` adds the model's feature signals and fits the limits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from malaria_classifier.background import DARK_LEVEL, MIN_BORDER_AGREEMENT, erode_cross
from malaria_classifier.background import TOLERANCE as BORDER_TOLERANCE

# What counts as background is defined once, in background.py, which cuts cells out of
# a smear before the resize: a pixel darker than DARK_LEVEL in every channel (NIH crops:
# black), or within BORDER_TOLERANCE of the picture's border colour when at least
# MIN_BORDER_AGREEMENT of the border has that colour (crops that keep the smear). The
# check keeps its own border-colour reading for the crops that are not cut out (a
# pale cell on a smear of almost its colour, a field of cells).
# Edge sharpness is a gradient over the background-to-object step; a floor on the step
# keeps it finite for an object that is barely distinguishable from its background.
MIN_CONTRAST = 8.0

STATISTIC_NAMES: tuple[str, ...] = (
    "dark_fraction",
    "border_dark_fraction",
    "content_dark_fraction",
    "enclosed_dark_fraction",
    "foreground_red",
    "foreground_green",
    "foreground_blue",
    "foreground_saturation",
    "foreground_texture",
    "largest_blob_fraction",
    "relative_edge_sharpness",
    "thickness",
    "box_edge_dark_fraction",
)


def image_statistics(batch: np.ndarray) -> np.ndarray:
    """Simple statistics of model-input images, shape ``(n, len(STATISTIC_NAMES))``.

    "Dark" in the names means *background* (:func:`distance_from_background`): black,
    as the NIH mask and the padding are, or close to the colour around the picture's
    edge, so a crop that keeps its smear background is measured like an NIH crop.
    On NIH crops every statistic named as before keeps its value exactly; the edge
    one is relative to the object's contrast now, hence its new name, so limits in an
    older ``ood.json`` never meet it. Computed for the whole batch at once (about
    0.3 ms an image on 2 cores), because this runs on every prediction.

    Args:
        batch: uint8 array ``(n, size, size, 3)``: images as the model sees them.
    """
    batch = np.asarray(batch, dtype=np.uint8)
    n, height, width, _ = batch.shape
    # One float copy; colour sums are one batched matrix product. (numpy reductions
    # over a last axis of length 3 are slow, so channels are combined elementwise; the
    # brightest and darkest channel on the uint8 pixels, 5x faster than on floats.)
    pixels = batch.astype(np.float32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    channels = batch[..., 0], batch[..., 1], batch[..., 2]
    brightest = np.maximum(np.maximum(*channels[:2]), channels[2]).astype(np.float32)
    darkest = np.minimum(np.minimum(*channels[:2]), channels[2]).astype(np.float32)
    black = brightest < DARK_LEVEL
    box = _content_box(black)
    border_colour, border_agreement = border_colours(batch, box)
    distance = distance_from_background(
        (red, green, blue), brightest, border_colour, border_agreement
    )
    dark = black | (distance <= BORDER_TOLERANCE)
    foreground = ~dark
    count = foreground.sum(axis=(1, 2)).astype(np.float64)
    safe_count = np.maximum(count, 1.0)
    weights = foreground.reshape(n, 1, height * width).astype(np.float32)
    colour_sums = np.matmul(weights, pixels.reshape(n, height * width, 3))[:, 0, :]
    colour = colour_sums / (safe_count[:, None] * 255.0)
    saturation_map = (brightest - darkest) / np.maximum(brightest, 1.0)
    saturation = (saturation_map * foreground).sum(axis=(1, 2)) / safe_count
    content_dark, enclosed, holes = _background_layout(dark, black, box)
    eroded_foreground = erode_cross(foreground)  # for the texture and the edge alike
    statistics = np.stack(
        [
            dark.mean(axis=(1, 2)),
            _edge_background_fraction(dark),
            content_dark,
            enclosed,
            colour[:, 0],
            colour[:, 1],
            colour[:, 2],
            saturation,
            _foreground_texture(_channel_sum(channels) / 3.0, eroded_foreground),
            _largest_blob_fraction(foreground, safe_count),
            _edge_sharpness(distance, dark, eroded_foreground, box, safe_count),
            _thickness(foreground | holes),
            _box_edge_background_fraction(dark, box),
        ],
        axis=1,
    ).astype(np.float64)
    # Nothing but background: give the values no cell has, so every limit trips.
    empty = count == 0
    statistics[empty] = [1.0, 1.0, 1.0] + [0.0] * (len(STATISTIC_NAMES) - 3)
    return statistics.reshape(n, len(STATISTIC_NAMES))


def _channel_sum(channels: tuple[np.ndarray, ...]) -> np.ndarray:
    """Sum of the uint8 channels as float32: exact, so equal to summing them as floats."""
    total = channels[0].astype(np.uint16)
    total += channels[1]
    total += channels[2]
    return total.astype(np.float32)


def _edge_background_fraction(dark: np.ndarray) -> np.ndarray:
    """Share of the pixels on the image's outer edge that are background."""
    edge = np.concatenate([dark[:, 0], dark[:, -1], dark[:, 1:-1, 0], dark[:, 1:-1, -1]], axis=1)
    return edge.mean(axis=1)


@dataclass(frozen=True)
class ContentBox:
    """Each picture's box inside the model input: all but the all-black padding rows/columns.

    The padding ``resize_with_pad`` adds is black whatever the crop's own background
    was, so the crop's background has to be read inside this box.
    """

    rows: np.ndarray  # (n, size) bool: rows that are not all black
    columns: np.ndarray  # (n, size) bool
    top: np.ndarray  # (n,) first content row (0 when there is none)
    bottom: np.ndarray  # (n,) last content row
    left: np.ndarray
    right: np.ndarray


def _content_box(black: np.ndarray) -> ContentBox:
    rows, columns = ~black.all(axis=2), ~black.all(axis=1)
    return ContentBox(
        rows=rows,
        columns=columns,
        top=rows.argmax(axis=1),
        bottom=rows.shape[1] - 1 - rows[:, ::-1].argmax(axis=1),
        left=columns.argmax(axis=1),
        right=columns.shape[1] - 1 - columns[:, ::-1].argmax(axis=1),
    )


def _box_ring(values: np.ndarray, box: ContentBox) -> tuple[np.ndarray, np.ndarray]:
    """The outer ring of each content box: ``values`` there ``(n, 4 * size, ...)``, and a mask.

    The four box edges are gathered as whole image rows and columns; the mask says
    which of those positions lie on the box (false for all of an empty image).
    """
    n, size = box.rows.shape
    image = np.arange(n)
    ring = np.concatenate(
        [
            values[image, box.top],
            values[image, box.bottom],
            values[image, :, box.left],
            values[image, :, box.right],
        ],
        axis=1,
    )
    position = np.arange(size)[None, :]
    across = (position >= box.left[:, None]) & (position <= box.right[:, None])
    down = (position >= box.top[:, None]) & (position <= box.bottom[:, None])
    in_ring = np.concatenate([across, across, down, down], axis=1) & box.rows.any(axis=1)[:, None]
    return ring, in_ring


def border_colours(batch: np.ndarray, box: ContentBox) -> tuple[np.ndarray, np.ndarray]:
    """Median colour ``(n, 3)`` of the outer ring of each content box, and how uniform it is.

    An NIH crop's ring is mostly its black mask (the cell touches its box in a few
    places only), so its median is black; a crop that keeps the smear gives the smear
    colour. The median (per channel) ignores the cell where it touches the edge.

    Returns:
        The colours, and per image the share of ring pixels within ``BORDER_TOLERANCE``
        of it in every channel (0 for an image with no content).
    """
    ring, in_ring = _box_ring(batch, box)
    ring = ring.astype(np.int16)
    # Pixels beyond the box sort last, so the lower median sits at a known index per image.
    ordered = np.where(in_ring[:, :, None], ring, np.iinfo(np.int16).max)
    ordered.sort(axis=1)
    count = in_ring.sum(axis=1)
    colour = ordered[np.arange(len(batch)), np.maximum(count - 1, 0) // 2]
    near = in_ring.copy()
    for channel in range(3):
        near &= np.abs(ring[:, :, channel] - colour[:, None, channel]) <= BORDER_TOLERANCE
    return colour.astype(np.float32), near.sum(axis=1) / np.maximum(count, 1)


def _box_edge_background_fraction(dark: np.ndarray, box: ContentBox) -> np.ndarray:
    """Share of the content box's outer ring that is background.

    A cell is cut out of its surroundings, so most of its crop's edge is background
    (NIH: at least ~60%); a photo, a scene or a screenshot runs on past its edges.
    Unlike ``border_dark_fraction`` this ignores the padding.
    """
    ring, in_ring = _box_ring(dark, box)
    return (ring & in_ring).sum(axis=1) / np.maximum(in_ring.sum(axis=1), 1)


def distance_from_background(
    channels: tuple[np.ndarray, np.ndarray, np.ndarray],
    brightest: np.ndarray,
    border_colour: np.ndarray,
    border_agreement: np.ndarray,
) -> np.ndarray:
    """Per pixel, how far it is from its image's background colour, ``(n, size, size)``.

    The distance is the largest channel difference from the border colour
    (:func:`border_colours`); a pixel within ``BORDER_TOLERANCE`` of it is background.
    The border colour counts only when it is not black and at least
    ``MIN_BORDER_AGREEMENT`` of the ring agrees with it: a smear is one colour all
    round, while the ring of a blurred cell, a gradient or a photo is a mix whose
    median describes no background. For all other images (NIH crops among them) the
    background is black and the distance is the brightest channel, so the
    background is the black mask as before; only the rest pay for the comparison.
    """
    light = np.flatnonzero(
        (border_colour.max(axis=1) >= DARK_LEVEL) & (border_agreement >= MIN_BORDER_AGREEMENT)
    )
    if len(light) == 0:
        return brightest
    distance = brightest.copy()
    values = border_colour[light, :, None, None]
    red, green, blue = (channel[light] for channel in channels)
    distance[light] = np.maximum(
        np.maximum(np.abs(red - values[:, 0]), np.abs(green - values[:, 1])),
        np.abs(blue - values[:, 2]),
    )
    return distance


def _background_layout(
    dark: np.ndarray, black: np.ndarray, box: ContentBox
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Background inside the picture itself, black walled in by the object, and the holes.

    The picture is the content box. A cell crop is a round object in its bounding box:
    about a fifth of the box is background, in the corners, touching the edge. A smear
    field has almost no background; a mosaic of crops has black patches enclosed
    between its cells ("holes": background regions that do not reach the border).
    The enclosed fraction counts black holes only, so a pale cell centre the colour
    of the smear is no mosaic gap.

    Returns:
        The content-box background fraction, the enclosed black fraction (both
        ``(n,)``), and the holes ``(n, size, size)``.
    """
    box_area = box.rows.sum(axis=1) * box.columns.sum(axis=1)
    inside = box.rows[:, :, None] & box.columns[:, None, :]
    content_dark = (dark & inside).sum(axis=(1, 2)) / np.maximum(box_area, 1)
    labels, regions = _label_pictures(dark)
    # A lookup table over region labels (not np.isin): a few microseconds a batch.
    reaches_border = np.zeros(regions + 1, dtype=bool)
    for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        reaches_border[edge] = True
    holes = dark & ~reaches_border[labels]
    enclosed = (holes & black).sum(axis=(1, 2)) / np.maximum(box_area, 1)
    return content_dark, enclosed, holes


def _thickness(solid: np.ndarray) -> np.ndarray:
    """Widest disc that fits in the object, over the disc of the object's area (1: a disc).

    A cell is one compact body; a field of touching cells is as wide as a single
    cell in its thickest place but many cells in area. The inscribed radius is the
    largest city-block distance to the background, with the holes filled so a pale
    centre does not thin a cell.

    The limits in ``ood.json`` were fitted on the values of a 2-D distance transform
    over the images stacked with an empty row and column after each, so that layout is
    kept exactly: beyond the last column and the last row is background; beyond the
    first column is not, and beyond the first row only for the images after the first
    (the row before them is the previous image's padding). The city-block distance is
    separable, so it is two 1-D passes (along rows, then columns), each a forward and a
    backward sweep over the whole batch: 2-3x faster than scipy's chamfer transform here.
    """
    n, height, width = solid.shape
    beyond = np.int16(height + width + 2)  # farther than any distance in one image
    cells = np.ascontiguousarray(solid.transpose(2, 0, 1)).astype(np.int16)  # (x, n, y)
    # Along each row: distance to the nearest background pixel left or right of it.
    along_rows = np.empty((height + 2, n, width + 1), dtype=np.int16)
    run = np.full((n, height), beyond, dtype=np.int16)  # no background before column 0
    for x in range(width):
        run += 1
        run *= cells[x]
        along_rows[1:-1, :, x] = run.T
    run[:] = 0  # the padding column after the last one is background
    along_rows[1:-1, :, width] = 0
    for x in range(width - 1, -1, -1):
        run += 1
        run *= cells[x]
        np.minimum(along_rows[1:-1, :, x], run.T, out=along_rows[1:-1, :, x])
    # Along each column, between the padding rows before and after each image.
    along_rows[0] = 0
    along_rows[0, 0] = beyond
    along_rows[-1] = 0
    step = np.empty((n, width + 1), dtype=np.int16)
    for y in range(1, height + 2):
        np.add(along_rows[y - 1], 1, out=step)
        np.minimum(along_rows[y], step, out=along_rows[y])
    for y in range(height, -1, -1):
        np.add(along_rows[y + 1], 1, out=step)
        np.minimum(along_rows[y], step, out=along_rows[y])
    radius = along_rows[1:-1].max(axis=(0, 2))
    area = solid.sum(axis=(1, 2))
    return np.where(area > 0, radius / np.sqrt(np.maximum(area, 1) / np.pi), 0.0)


def _label_pictures(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected regions of each picture of ``mask`` ``(n, h, w)``, numbered across the batch.

    The pictures are stacked into one 2-D array with a blank row after each, so no
    region spans two of them: the same labels, in the same raster order, as a 3-D
    call whose structure connects within a picture only, and 10% faster.

    Returns:
        The labels ``(n, h, w)`` (a view), and how many regions there are.
    """
    n, height, width = mask.shape
    stacked = np.zeros((n, height + 1, width), dtype=bool)
    stacked[:, :height] = mask
    labels, count = ndimage.label(stacked.reshape(n * (height + 1), width))
    return labels.reshape(n, height + 1, width)[:, :height], count


def _foreground_texture(gray: np.ndarray, eroded_foreground: np.ndarray) -> np.ndarray:
    """Mean absolute neighbour difference inside the object, away from its edge.

    ``eroded_foreground`` is the object eroded once (:func:`erode_cross`).
    """
    inner = erode_cross(eroded_foreground)
    dx_mask = inner[:, :, 1:] & inner[:, :, :-1]
    dy_mask = inner[:, 1:, :] & inner[:, :-1, :]
    total = (np.abs(np.diff(gray, axis=2)) * dx_mask).sum(axis=(1, 2)) + (
        np.abs(np.diff(gray, axis=1)) * dy_mask
    ).sum(axis=(1, 2))
    pairs = dx_mask.sum(axis=(1, 2)) + dy_mask.sum(axis=(1, 2))
    return np.where(pairs >= 4, total / np.maximum(pairs, 1) / 255.0, 0.0)


def _largest_blob_fraction(foreground: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Share of the object pixels in its largest connected piece (one cell: near 1)."""
    labels, blobs = _label_pictures(foreground)
    if blobs == 0:
        return np.zeros(len(foreground))
    sizes = np.bincount(labels.ravel(), minlength=blobs + 1)
    # Labels are numbered in raster order and never span two images, so the labels of
    # image i run up to the largest label of images 0..i: which image owns a blob is a
    # binary search, not a pass over every pixel.
    last_label = np.maximum.accumulate(labels.reshape(len(foreground), -1).max(axis=1))
    owner = np.searchsorted(last_label, np.arange(1, blobs + 1))
    largest = np.zeros(len(foreground))
    np.maximum.at(largest, owner, sizes[1:])
    return largest / count


def _box_interior(box: ContentBox) -> np.ndarray:
    """Pixels ``(n, size, size)`` strictly inside each content box (its ring excluded)."""
    position = np.arange(box.rows.shape[1])[None, :]
    rows = (position > box.top[:, None]) & (position < box.bottom[:, None])
    columns = (position > box.left[:, None]) & (position < box.right[:, None])
    return rows[:, :, None] & columns[:, None, :]


def _edge_sharpness(
    distance: np.ndarray,
    dark: np.ndarray,
    eroded_foreground: np.ndarray,
    box: ContentBox,
    count: np.ndarray,
) -> np.ndarray:
    """How steep the object's boundary is, per pixel and per unit of contrast.

    The 90th-percentile gradient, on the boundary, of the distance from the
    background colour, divided by the object's mean distance from it: a step blurred
    by a Gaussian of ``sigma`` px peaks at ``1 / (sigma * sqrt(2 pi))`` of its height,
    so the ratio measures focus alone. Raw gradients would call every cell on a pale
    smear (a step of ~30 levels, not ~190 as on black) blurred. A crisp cell edge
    gives about 0.6; a heavily blurred cell much less.
    """
    boundary = (dark ^ erode_cross(dark)) | (~dark ^ eroded_foreground)
    # Only inside the content box: the step from the padding to a crop's edge is no
    # object edge (a blurred crop ends in a sharp line against the padding).
    boundary &= _box_interior(box)
    n, height, width = distance.shape
    index = np.flatnonzero(boundary)
    image = index // (height * width)
    on_boundary = np.bincount(image, minlength=n)
    # Central differences at the boundary pixels only (they are inside the box, so
    # never on the image edge): the same values as np.gradient, at a tenth of the cost.
    flat = distance.ravel()
    gx = (flat[index + 1] - flat[index - 1]) / 2.0
    gy = (flat[index + width] - flat[index - width]) / 2.0
    magnitude = np.hypot(gx, gy)
    # One sort of the boundary values only, keyed by image (values stay below 400):
    # the 90th percentile of each image is then at a known offset in its run.
    ordered = np.sort(image * 1000.0 + magnitude) - image * 1000.0
    start = np.cumsum(on_boundary) - on_boundary
    position = start + np.floor(0.9 * np.maximum(on_boundary - 1, 0)).astype(int)
    values = ordered[np.clip(position, 0, max(len(ordered) - 1, 0))] if len(ordered) else 0.0
    contrast = np.maximum((distance * ~dark).sum(axis=(1, 2)) / count, MIN_CONTRAST)
    return np.where(on_boundary >= 4, values / contrast, 0.0)
