"""Is this a stained red-blood-cell crop at all? The "Not a cell" check.

A classifier trained on two kinds of cells gives a confident answer for anything,
so a photo, a screenshot or a blank image must be stopped before its score is shown.
Two families of real signals are combined, each with limits fitted on *training and
validation cells only* (never on the non-cell images used to test the check):

- **image statistics** of the model's input (the 64x64 padded crop): how much
  background surrounds the object, the colour and saturation of the object, whether
  it is one compact blob, how sharp its edge is, how busy its texture is. The
  background is black (the NIH mask, the padding) or the colour around the crop's
  edge, so crops that keep their smear background are measured like NIH crops
  (computed in :mod:`malaria_classifier.ood_statistics`);
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.ood_statistics import STATISTIC_NAMES

OOD_FILE = "ood.json"
OOD_OTHER_LABS_FILE = "ood_other_labs.json"
# Which limits ``Predictor(not_a_cell=...)`` applies: "strict" (fitted on NIH cells as
# imaged: rejects the most non-cells) or "other-labs" (also fitted on other-laboratory
# variants: accepts smaller, softer, re-stained cells and smear backgrounds, at the
# cost of letting more non-cells through; see docs/benchmarks.md section 5).
NOT_A_CELL_FILES: dict[str, str] = {"strict": OOD_FILE, "other-labs": OOD_OTHER_LABS_FILE}

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
            lower=_limits_from_json(data.get("lower", {})),
            upper=_limits_from_json(data.get("upper", {})),
            density=density,
            fitted_on=data.get("fitted_on", {}),
        )


def _limits_from_json(limits: dict[str, Any]) -> dict[str, float]:
    # A limit fitted on no finite value is NaN (it never trips); JSON holds it as null.
    return {name: math.nan if value is None else float(value) for name, value in limits.items()}


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
