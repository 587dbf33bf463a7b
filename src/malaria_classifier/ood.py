"""Is this a stained red-blood-cell crop at all? The "Not a cell" check.

A classifier trained on two kinds of cells gives a confident answer for anything,
so a photo, a screenshot or a blank image must be stopped before its score is shown.
Two families of real signals are combined, each with limits fitted on *training and
validation cells only* (never on the non-cell images used to test the check):

- **image statistics** of the model's input (the 64x64 padded crop): how much
  background surrounds the object, the colour and saturation of the object, whether
  it is one compact blob, how sharp its edge is, how busy its texture is. The
  background is black (the NIH mask, the padding) or the colour around the crop's
  edge, so crops that keep their smear background are measured like NIH crops;
- **the model's own features**: the Mahalanobis distance of the penultimate-layer
  activations to the training cells of each class (Lee et al., 2018), and the
  energy score of the logits (Liu et al., 2020).

A cell is rejected when any signal falls outside the range that covers all but a
small, fitted fraction of real cells: NIH cells as imaged and, by default, the same
cells changed the way other laboratories' images differ (smaller, softer, other
stain, smear background: :func:`malaria_classifier.stress.draw_lab_variant`). The
limits are stored beside the model in ``ood.json`` (plain JSON: nothing is unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from malaria_classifier.background import DARK_LEVEL, MIN_BORDER_AGREEMENT, erode_cross
from malaria_classifier.background import TOLERANCE as BORDER_TOLERANCE

OOD_FILE = "ood.json"
OOD_OTHER_LABS_FILE = "ood_other_labs.json"
# Which limits ``Predictor(not_a_cell=...)`` applies: "strict" (fitted on NIH cells as
# imaged: rejects the most non-cells) or "other-labs" (also fitted on other-laboratory
# variants: accepts smaller, softer, re-stained cells and smear backgrounds, at the
# cost of letting more non-cells through; see docs/benchmarks.md section 5).
NOT_A_CELL_FILES: dict[str, str] = {"strict": OOD_FILE, "other-labs": OOD_OTHER_LABS_FILE}

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
FEATURE_SIGNALS: tuple[str, ...] = ("feature_distance", "energy")
SIGNAL_NAMES: tuple[str, ...] = STATISTIC_NAMES + FEATURE_SIGNALS

# What each signal means, in words for the person who sent the image (the dashboard and
# the API show them; the signal names follow in brackets for engineers).
SIGNAL_MEANINGS: dict[str, str] = {
    "dark_fraction": "the amount of background around it",
    "border_dark_fraction": "the background at the picture's edge",
    "content_dark_fraction": "the background inside the picture",
    "enclosed_dark_fraction": "black gaps between objects (a mosaic of crops?)",
    "foreground_red": "colour",
    "foreground_green": "colour",
    "foreground_blue": "colour",
    "foreground_saturation": "colour strength",
    "foreground_texture": "texture",
    "largest_blob_fraction": "being several separate objects",
    "relative_edge_sharpness": "outline sharpness (focus)",
    "thickness": "shape (not one compact, round object)",
    "box_edge_dark_fraction": "running on past the picture's edge",
    "feature_distance": "what the model sees in it",
    "energy": "the model's response to it",
}

# Signals where only one side is suspicious: being *closer* to training cells or
# more confident (lower energy) than they are is never a reason to reject.
ONE_SIDED_HIGH: frozenset[str] = frozenset({"feature_distance", "energy"})


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


def feature_model(model: Any) -> Any:
    """A Keras model returning ``(probabilities, penultimate features)`` in one pass.

    The features are the input of the final softmax layer (dropout is the identity
    at inference), so the extra output costs nothing beyond the usual forward pass.
    """
    import keras

    final = model.layers[-1]
    return keras.Model(model.inputs, [model.outputs[0], final.input], name="with_features")


FinalLayer = tuple[np.ndarray, np.ndarray]  # the softmax layer's (kernel, bias)


def final_layer_weights(model: Any) -> FinalLayer:
    """The kernel ``(features, classes)`` and bias of a Keras model's final dense layer."""
    kernel, bias = (np.asarray(weight) for weight in model.layers[-1].get_weights()[:2])
    return kernel, bias


def logits_from_features(final_layer: FinalLayer, features: np.ndarray) -> np.ndarray:
    """Pre-softmax logits ``features @ W + b`` of the final dense layer."""
    kernel, bias = final_layer
    return np.asarray(features, dtype=np.float64) @ kernel + bias


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """Energy ``-logsumexp(logits)``: low for inputs like the training data."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1)
    return -(top + np.log(np.exp(logits - top[:, None]).sum(axis=1)))


@dataclass
class FeatureDensity:
    """Class-conditional Gaussians with one shared covariance, over penultimate features."""

    means: np.ndarray  # (classes, dims)
    precision: np.ndarray  # (dims, dims), inverse of the shared covariance

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Smallest Mahalanobis distance of each row to any class mean."""
        features = np.asarray(features, dtype=np.float64)
        squared = []
        for mean in self.means:
            centred = features - mean
            squared.append(np.einsum("ij,jk,ik->i", centred, self.precision, centred))
        return np.sqrt(np.maximum(np.min(squared, axis=0), 0.0))


def fit_feature_density(features: np.ndarray, labels: np.ndarray) -> FeatureDensity:
    """Fit :class:`FeatureDensity` on training cells (``labels``: 0/1 class indices).

    A small ridge keeps the covariance invertible: ReLU features are often zero.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels).astype(int)
    classes = sorted(set(labels.tolist()))
    means = np.stack([features[labels == c].mean(axis=0) for c in classes])
    centred = features - means[np.searchsorted(classes, labels)]
    covariance = centred.T @ centred / max(1, len(features) - len(classes))
    ridge = 1e-3 * float(np.trace(covariance)) / len(covariance) + 1e-9
    precision = np.linalg.inv(covariance + ridge * np.eye(len(covariance)))
    return FeatureDensity(means=means, precision=precision)


def describe_signals(signals: str, most: int = 3) -> str:
    """Plain words for a comma-separated list of tripped signals (``OodCheck.reasons``).

    At most ``most`` descriptions (a blank image trips a dozen), then every signal
    name in brackets, for the engineer.

    Example:
        >>> describe_signals("thickness, foreground_red")
        'shape (not one compact, round object), colour (thickness, foreground_red)'
    """
    names = [name.strip() for name in signals.split(",") if name.strip()]
    meanings = list(dict.fromkeys(SIGNAL_MEANINGS.get(name, name) for name in names))
    words = ", ".join(meanings[:most])
    if len(meanings) > most:
        words += f" and {len(meanings) - most} more"
    return f"{words} ({', '.join(names)})"


# The signals a picture without stain colour trips (with the model's own unease).
_COLOUR_SIGNALS = frozenset(
    {"foreground_red", "foreground_green", "foreground_blue", "foreground_saturation"}
)

CROP_ADVICE = "Send one stained red blood cell per image, cropped close"
COLOUR_ADVICE = (
    "Send a colour picture of one Giemsa-stained red blood cell: a grayscale or unstained "
    "picture has no stain colour for the model to read"
)


def not_a_cell_advice(signals: str) -> str:
    """What to send instead, for a comma-separated list of tripped signals.

    A picture that is off only in colour strength (and perhaps hue and what the model
    sees) is most often a grayscale export or an unstained cell, and re-cropping would
    not help it; every other pattern is met by a close crop of one stained cell.

    Example:
        >>> not_a_cell_advice("foreground_saturation, feature_distance")[:30]
        'Send a colour picture of one G'
    """
    names = {name.strip() for name in signals.split(",") if name.strip()}
    if "foreground_saturation" in names and names <= _COLOUR_SIGNALS | set(FEATURE_SIGNALS):
        return COLOUR_ADVICE
    return CROP_ADVICE


def combine_signals(
    statistics: np.ndarray,
    features: np.ndarray | None,
    density: FeatureDensity | None,
    final_layer: FinalLayer | None,
) -> np.ndarray:
    """Image statistics plus feature distance and energy, shape ``(n, len(SIGNAL_NAMES))``.

    ``final_layer`` is :func:`final_layer_weights` of the model (or a serving copy's).
    The two feature signals are ``nan`` (never tripping a limit) when unavailable.
    """
    extra = np.full((len(statistics), len(FEATURE_SIGNALS)), np.nan)
    if features is not None and density is not None and final_layer is not None:
        extra[:, 0] = density.distances(features)
        extra[:, 1] = energy_scores(logits_from_features(final_layer, features))
    return np.concatenate([np.asarray(statistics, dtype=np.float64), extra], axis=1)


@dataclass
class OodCheck:
    """The fitted "Not a cell" rule: signal limits, and the feature density they use."""

    lower: dict[str, float]
    upper: dict[str, float]
    density: FeatureDensity | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def reasons(self, signals: np.ndarray) -> list[str]:
        """Per image, the signals outside their limits ("" when it looks like a cell)."""
        out_of_range = np.zeros(signals.shape, dtype=bool)
        for column, name in enumerate(SIGNAL_NAMES):
            values = signals[:, column]
            with np.errstate(invalid="ignore"):
                if name in self.lower:
                    out_of_range[:, column] |= values < self.lower[name]
                if name in self.upper:
                    out_of_range[:, column] |= values > self.upper[name]
        return [
            ", ".join(name for name, bad in zip(SIGNAL_NAMES, row, strict=True) if bad)
            for row in out_of_range
        ]

    def rejected_share(self, signals: np.ndarray) -> float:
        """Share of the rows rejected (0.0 for no rows)."""
        reasons = self.reasons(signals)
        return float(np.mean([bool(reason) for reason in reasons])) if reasons else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (lists of floats only)."""
        return {
            "signals": list(SIGNAL_NAMES),
            "lower": self.lower,
            "upper": self.upper,
            "feature_density": None
            if self.density is None
            else {
                "means": self.density.means.tolist(),
                "precision": self.density.precision.tolist(),
            },
            "fitted_on": self.fitted_on,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OodCheck:
        """Rebuild from :meth:`to_dict` output."""
        density_data = data.get("feature_density")
        density = None
        if density_data:
            density = FeatureDensity(
                means=np.asarray(density_data["means"], dtype=np.float64),
                precision=np.asarray(density_data["precision"], dtype=np.float64),
            )
        return cls(
            lower={k: float(v) for k, v in data.get("lower", {}).items()},
            upper={k: float(v) for k, v in data.get("upper", {}).items()},
            density=density,
            fitted_on=data.get("fitted_on", {}),
        )


def fit_limits(
    signals: np.ndarray, tail_fraction: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Limits that leave ``tail_fraction`` of the given cells outside, per signal and side.

    Two-sided signals get the ``tail_fraction`` and ``1 - tail_fraction`` quantiles;
    one-sided ones only the upper.
    """
    lower, upper = {}, {}
    for column, name in enumerate(SIGNAL_NAMES):
        values = signals[:, column]
        values = values[np.isfinite(values)]
        if len(values) == 0:
            continue
        upper[name] = float(np.quantile(values, 1.0 - tail_fraction))
        if name not in ONE_SIDED_HIGH:
            lower[name] = float(np.quantile(values, tail_fraction))
    return lower, upper


def fit_ood_check(
    train_signals: np.ndarray,
    validation_signals: np.ndarray,
    density: FeatureDensity | None,
    max_false_rejection: float = 0.005,
    train_variant_signals: np.ndarray | None = None,
    validation_variant_signals: np.ndarray | None = None,
    max_variant_rejection: float = 0.01,
) -> OodCheck:
    """Fit limits on training cells, tightest that reject ≤ ``max_false_rejection`` of validation.

    The per-signal tail is searched on a grid from generous to tight; the tightest
    tail whose combined rule still rejects at most ``max_false_rejection`` of the
    validation cells wins, so the union of many one-signal tests stays honest.

    With variant signals (the same kind of cells changed to look like other
    laboratories' images), the limits are fitted on training cells and their
    variants together, and the chosen tail must also reject at most
    ``max_variant_rejection`` of the validation variants. They get a budget of their
    own, reported separately, so NIH cells keep their stricter one.
    """
    fit_on = train_signals
    if train_variant_signals is not None:
        fit_on = np.concatenate([train_signals, train_variant_signals])
    # An image with no object (all background) is never a cell: a variant whose cell
    # faded into its background must not stretch the limits to admit blank images.
    fit_on = fit_on[fit_on[:, SIGNAL_NAMES.index("dark_fraction")] < 1.0]
    budgets = {"validation_false_rejection": (validation_signals, max_false_rejection)}
    if validation_variant_signals is not None:
        budgets["validation_variant_false_rejection"] = (
            validation_variant_signals,
            max_variant_rejection,
        )
    best = None
    for tail in (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2):
        check = _check_within(fit_on, tail, density, budgets)
        if check.fitted_on["within_budget"]:
            best = check
    # No tail keeps within the budgets: the training extremes, and the record says so.
    return best or _check_within(fit_on, 0.0, density, budgets)


def _check_within(
    fit_on: np.ndarray,
    tail: float,
    density: FeatureDensity | None,
    budgets: dict[str, tuple[np.ndarray, float]],
) -> OodCheck:
    """Limits at ``tail``, with each budgeted set's rejected share recorded in ``fitted_on``."""
    lower, upper = fit_limits(fit_on, tail)
    check = OodCheck(lower, upper, density, {"tail_fraction_per_signal": tail})
    within = True
    for name, (signals, budget) in budgets.items():
        check.fitted_on[name] = check.rejected_share(signals)
        check.fitted_on[name.replace("validation_", "max_")] = budget
        within = within and check.fitted_on[name] <= budget
    check.fitted_on["within_budget"] = within
    return check


def save_ood_check(check: OodCheck, path: Path) -> None:
    """Write ``ood.json`` atomically."""
    from malaria_classifier.model_card import write_json_atomically

    write_json_atomically(check.to_dict(), Path(path))


def load_ood_check(path: Path) -> OodCheck | None:
    """Read ``ood.json``; None when the model has none.

    Raises:
        ValueError: If the file exists but is not a valid OOD file.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return OodCheck.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"{path} is not a valid out-of-distribution file ({error}). Delete it or re-run "
            f"`malaria calibrate`."
        ) from None
