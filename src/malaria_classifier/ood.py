"""Is this a stained red-blood-cell crop at all? The "Not a cell" check.

A classifier trained on two kinds of cells gives a confident answer for anything,
so a photo, a screenshot or a blank image must be stopped before its score is shown.
Two families of real signals are combined, each with limits fitted on *training and
validation cells only* (never on the non-cell images used to test the check):

- **image statistics** of the model's input (the 64x64 padded crop): how much black
  background surrounds the object, the colour and saturation of the object, whether
  it is one blob, how sharp its edge is, how busy its texture is;
- **the model's own features**: the Mahalanobis distance of the penultimate-layer
  activations to the training cells of each class (Lee et al., 2018), and the
  energy score of the logits (Liu et al., 2020).

A cell is rejected when any signal falls outside the range that covers all but a
small, fitted fraction of real cells. The limits are stored beside the model in
``ood.json`` (plain JSON: nothing is unpickled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

OOD_FILE = "ood.json"

# A pixel whose brightest channel is below this is background (NIH crops: black).
DARK_LEVEL = 30

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
    "edge_sharpness",
)
FEATURE_SIGNALS: tuple[str, ...] = ("feature_distance", "energy")
SIGNAL_NAMES: tuple[str, ...] = STATISTIC_NAMES + FEATURE_SIGNALS

# Signals where only one side is suspicious: being *closer* to training cells or
# more confident (lower energy) than they are is never a reason to reject.
ONE_SIDED_HIGH: frozenset[str] = frozenset({"feature_distance", "energy"})


def image_statistics(batch: np.ndarray) -> np.ndarray:
    """Simple statistics of model-input images, shape ``(n, len(STATISTIC_NAMES))``.

    Computed for the whole batch at once (about 0.1 ms an image), because this runs on
    every prediction.

    Args:
        batch: uint8 array ``(n, size, size, 3)``: images as the model sees them.
    """
    batch = np.asarray(batch, dtype=np.uint8)
    n, height, width, _ = batch.shape
    # One float copy; colour sums are one batched matrix product. (numpy reductions
    # over a last axis of length 3 are slow, so channels are combined elementwise.)
    pixels = batch.astype(np.float32)
    red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    brightest = np.maximum(np.maximum(red, green), blue)
    darkest = np.minimum(np.minimum(red, green), blue)
    dark = brightest < DARK_LEVEL
    foreground = ~dark
    count = foreground.sum(axis=(1, 2)).astype(np.float64)
    safe_count = np.maximum(count, 1.0)
    weights = foreground.reshape(n, 1, height * width).astype(np.float32)
    colour_sums = np.matmul(weights, pixels.reshape(n, height * width, 3))[:, 0, :]
    colour = colour_sums / (safe_count[:, None] * 255.0)
    saturation_map = (brightest - darkest) / np.maximum(brightest, 1.0)
    saturation = (saturation_map * foreground).sum(axis=(1, 2)) / safe_count
    gray = (red + green + blue) / 3.0
    border = np.concatenate(
        [dark[:, 0], dark[:, -1], dark[:, 1:-1, 0], dark[:, 1:-1, -1]], axis=1
    ).mean(axis=1)
    statistics = np.stack(
        [
            dark.mean(axis=(1, 2)),
            border,
            *_background_layout(dark),
            colour[:, 0],
            colour[:, 1],
            colour[:, 2],
            saturation,
            _foreground_texture(gray, foreground),
            _largest_blob_fraction(foreground, safe_count),
            _edge_sharpness(gray, dark),
        ],
        axis=1,
    ).astype(np.float64)
    # Nothing but background: give the values no cell has, so every limit trips.
    empty = count == 0
    statistics[empty] = [1.0, 1.0, 1.0] + [0.0] * (len(STATISTIC_NAMES) - 3)
    return statistics.reshape(n, len(STATISTIC_NAMES))


# Neighbours within one image only: the batch axis is never "adjacent".
_PLANE = np.zeros((3, 3, 3), dtype=bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _background_layout(dark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Background inside the picture itself, and background walled in by the object.

    The picture is the box left after trimming all-black rows and columns (the
    padding added by ``resize_with_pad``). A cell crop is a round object in its
    bounding box: about a fifth of the box is black, in the corners, touching the
    edge. A smear field has almost no black; a mosaic of crops has black patches
    enclosed between its cells ("holes": dark regions that do not reach the border).
    """
    content_rows = ~dark.all(axis=2)
    content_columns = ~dark.all(axis=1)
    box_area = content_rows.sum(axis=1) * content_columns.sum(axis=1)
    inside = content_rows[:, :, None] & content_columns[:, None, :]
    content_dark = (dark & inside).sum(axis=(1, 2)) / np.maximum(box_area, 1)
    labels, regions = ndimage.label(dark, structure=_PLANE)
    # A lookup table over region labels (not np.isin): a few microseconds a batch.
    reaches_border = np.zeros(regions + 1, dtype=bool)
    for edge in (labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]):
        reaches_border[edge] = True
    enclosed = dark & ~reaches_border[labels]
    return content_dark, enclosed.sum(axis=(1, 2)) / np.maximum(box_area, 1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Binary erosion of each image by a 3x3 cross, outside the image counting as empty."""
    eroded = mask.copy()
    eroded[:, 1:, :] &= mask[:, :-1, :]
    eroded[:, :-1, :] &= mask[:, 1:, :]
    eroded[:, :, 1:] &= mask[:, :, :-1]
    eroded[:, :, :-1] &= mask[:, :, 1:]
    eroded[:, [0, -1], :] = False
    eroded[:, :, [0, -1]] = False
    return eroded


def _foreground_texture(gray: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Mean absolute neighbour difference inside the object, away from its edge."""
    inner = _erode(_erode(foreground))
    dx_mask = inner[:, :, 1:] & inner[:, :, :-1]
    dy_mask = inner[:, 1:, :] & inner[:, :-1, :]
    total = (np.abs(np.diff(gray, axis=2)) * dx_mask).sum(axis=(1, 2)) + (
        np.abs(np.diff(gray, axis=1)) * dy_mask
    ).sum(axis=(1, 2))
    pairs = dx_mask.sum(axis=(1, 2)) + dy_mask.sum(axis=(1, 2))
    return np.where(pairs >= 4, total / np.maximum(pairs, 1) / 255.0, 0.0)


def _largest_blob_fraction(foreground: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Share of the object pixels in its largest connected piece (one cell: near 1)."""
    labels, blobs = ndimage.label(foreground, structure=_PLANE)
    if blobs == 0:
        return np.zeros(len(foreground))
    sizes = np.bincount(labels.ravel(), minlength=blobs + 1)
    owner = np.zeros(blobs + 1, dtype=np.int64)
    image_of_pixel = np.broadcast_to(np.arange(len(foreground))[:, None, None], labels.shape)
    owner[labels.ravel()] = image_of_pixel.ravel()
    largest = np.zeros(len(foreground))
    np.maximum.at(largest, owner[1:], sizes[1:])
    return largest / count


def _edge_sharpness(gray: np.ndarray, dark: np.ndarray) -> np.ndarray:
    """How steep the object's boundary is: the 90th-percentile gradient on the boundary.

    A stained cell on black has a crisp edge; a heavily blurred image does not.
    """
    boundary = (dark ^ _erode(dark)) | (~dark ^ _erode(~dark))
    # Leave the image border out: padding and crop edges are not object edges.
    boundary[:, [0, -1], :] = False
    boundary[:, :, [0, -1]] = False
    gy, gx = np.gradient(gray, axis=(1, 2))
    # Sorting with non-boundary pixels set to -1 puts them first; the 90th percentile of
    # the boundary values is then a fixed offset from the end of each row.
    magnitude = np.where(boundary, np.hypot(gx, gy), -1.0).reshape(len(gray), -1)
    magnitude.sort(axis=1)
    on_boundary = boundary.sum(axis=(1, 2))
    position = magnitude.shape[1] - on_boundary + np.floor(0.9 * (on_boundary - 1)).astype(int)
    values = magnitude[np.arange(len(gray)), np.clip(position, 0, magnitude.shape[1] - 1)]
    return np.where(on_boundary >= 4, values / 255.0, 0.0)


def feature_model(model: Any) -> Any:
    """A Keras model returning ``(probabilities, penultimate features)`` in one pass.

    The features are the input of the final softmax layer (dropout is the identity
    at inference), so the extra output costs nothing beyond the usual forward pass.
    """
    import keras

    final = model.layers[-1]
    return keras.Model(model.inputs, [model.outputs[0], final.input], name="with_features")


def logits_from_features(model: Any, features: np.ndarray) -> np.ndarray:
    """Pre-softmax logits ``features @ W + b`` of the model's final dense layer."""
    kernel, bias = (np.asarray(weight) for weight in model.layers[-1].get_weights()[:2])
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


def combine_signals(
    statistics: np.ndarray,
    features: np.ndarray | None,
    density: FeatureDensity | None,
    model: Any,
) -> np.ndarray:
    """Image statistics plus feature distance and energy, shape ``(n, len(SIGNAL_NAMES))``.

    The two feature signals are ``nan`` (never tripping a limit) when unavailable.
    """
    extra = np.full((len(statistics), len(FEATURE_SIGNALS)), np.nan)
    if features is not None and density is not None and model is not None:
        extra[:, 0] = density.distances(features)
        extra[:, 1] = energy_scores(logits_from_features(model, features))
    return np.concatenate([np.asarray(statistics, dtype=np.float64), extra], axis=1)


@dataclass
class OodCheck:
    """The fitted "Not a cell" rule: signal limits, and the feature density they use."""

    lower: dict[str, float]
    upper: dict[str, float]
    density: FeatureDensity | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def signals(self, batch: np.ndarray, features: np.ndarray | None, model: Any) -> np.ndarray:
        """All signals for a batch, shape ``(n, len(SIGNAL_NAMES))``; nan where unavailable."""
        return combine_signals(image_statistics(batch), features, self.density, model)

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
) -> OodCheck:
    """Fit limits on training cells, tightest that reject ≤ ``max_false_rejection`` of validation.

    The per-signal tail is searched on a grid from generous to tight; the tightest
    tail whose combined rule still rejects at most ``max_false_rejection`` of the
    validation cells wins, so the union of many one-signal tests stays honest.
    """
    best = None
    for tail in (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2):
        lower, upper = fit_limits(train_signals, tail)
        check = OodCheck(lower, upper, density)
        rejected = np.mean([bool(reason) for reason in check.reasons(validation_signals)])
        if rejected <= max_false_rejection:
            best = OodCheck(
                lower,
                upper,
                density,
                {
                    "tail_fraction_per_signal": tail,
                    "validation_false_rejection": float(rejected),
                    "max_false_rejection": max_false_rejection,
                },
            )
    if best is None:
        lower, upper = fit_limits(train_signals, 0.0)
        best = OodCheck(lower, upper, density, {"tail_fraction_per_signal": 0.0})
    return best


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
