"""Training settings: one flat, typed, frozen dataclass; defaults < YAML file < flags.

The resolved config is written next to every trained model, so a run can be
reproduced from its folder alone (``malaria train --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from malaria_classifier.outputs import open_output

COLOUR_NORMALIZATIONS: tuple[str, ...] = ("fixed", "per_cell")


@dataclass(frozen=True)
class TrainingConfig:
    """Everything that decides what ``malaria train`` produces.

    The defaults are the bundled model's recipe: per-cell stain standardization with
    low-resolution and blur augmentation, which tied the plain recipe in paired
    patient-level cross-validation and is far less thrown by smaller or paler cells
    from other laboratories (docs/benchmarks.md §9.7b, §9.10).

    Attributes:
        image_size: Side of the square model input, in pixels.
        base_filters: Filters of the first convolution block; each block doubles them.
        conv_blocks: Number of convolution blocks (each halves the resolution).
        convs_per_block: Convolutions in each block before its pooling.
        residual_separable_blocks: How many of the last blocks end with a
            depthwise-separable convolution added back onto its input (a residual
            connection) before their pooling: depth where the feature maps are small,
            for about a quarter of the CPU time of another full convolution there
            (docs/benchmarks.md section 9.14; 0 turns it off).
        dense_units: Width of the fully connected layer before the softmax.
        colour_normalization: How the model scales its uint8 input. ``"fixed"`` maps
            0..255 to -1..1 for every image; ``"per_cell"`` standardizes each image's
            cell pixels per channel (mean 0, standard deviation 1; the black
            background stays 0), so a paler, deeper or differently tinted stain from
            another laboratory reaches the convolutions looking like an NIH one.
        dropout_rate: Dropout before the softmax (0 turns it off).
        batch_size: Images per training step.
        learning_rate: Adam's initial learning rate (cosine-decayed over ``epochs``).
        label_smoothing: Cross-entropy label smoothing; softens the few percent of
            doubtful labels in the NIH set (0 turns it off).
        loss_drop_fraction: Share of each batch's cells, those with the largest loss,
            left out of the loss (rounded down: 0.02 of a batch of 64 is its one
            worst-fitting cell). The cells a model contradicts most strongly are mostly
            mislabelled ones in the NIH set (docs/benchmarks.md section 9.9), whose
            gradient pulls the model towards the wrong label; 0 turns it off.
        mixup_alpha: Mixup (Zhang et al. 2018): each augmented training image is
            blended with a random partner from its batch, weight ``lambda`` drawn from
            Beta(alpha, alpha), and its one-hot target with the same weight, so a
            mislabelled cell pulls the model less towards a hard wrong answer. Applied
            after all other augmentation, only when ``augment`` is on; 0 turns it off
            (measured worse on NIH patients, docs/benchmarks.md section 9.18). With it
            on, the training split's loss and AUC in the history are measured against
            the blended targets; only the validation figures compare with a run
            without mixup.
        epochs: Upper limit on training epochs.
        early_stopping_patience: Epochs without validation improvement before stopping.
        augment: Whether to augment the training split.
        zoom_range: Largest relative zoom in or out during augmentation.
        shift_range: Largest shift, as a fraction of the image side.
        brightness_delta: Largest brightness change (pixel fraction).
        contrast_range: Largest relative contrast change.
        saturation_range: Largest relative saturation change.
        hue_delta: Largest hue shift (fraction of the colour circle).
        channel_gain_range: Largest relative gain per RGB channel, drawn per image: a
            different Giemsa batch or white balance tints every cell of a slide.
        low_resolution_probability: Share of training cells shrunk to a random side
            between ``low_resolution_min_side`` and ``image_size`` and enlarged back, as
            the model sees cells from labs that image at lower magnification.
        low_resolution_min_side: Smallest side (px) of that simulation (capped at
            ``image_size``).
        blur_probability: Share of training cells blurred (Gaussian; out-of-focus camera).
        blur_max_sigma: Largest blur standard deviation, in model-input pixels.
        background_probability: Share of training cells whose black background is
            replaced by a random smear-like colour with noise, as crops from labs that
            keep the smear around the cell look.
        validation_fraction: Share of cells (by patient) for validation.
        test_fraction: Share of cells (by patient) for the test split.
        seed: Seeds the split (and the folds of cross-validation); also the weights,
            the shuffling and the augmentation unless ``training_seed`` is set.
        training_seed: Seeds only the weights, the shuffling and the augmentation, so
            that several models can be trained on the same patients (seed-to-seed
            spread, ensembles); None means ``seed``.
    """

    image_size: int = 64
    base_filters: int = 16
    conv_blocks: int = 4
    convs_per_block: int = 1
    residual_separable_blocks: int = 0
    dense_units: int = 64
    colour_normalization: str = "per_cell"
    dropout_rate: float = 0.3
    batch_size: int = 64
    learning_rate: float = 0.001
    label_smoothing: float = 0.0
    loss_drop_fraction: float = 0.0
    mixup_alpha: float = 0.0
    epochs: int = 20
    early_stopping_patience: int = 20
    augment: bool = True
    zoom_range: float = 0.1
    shift_range: float = 0.05
    brightness_delta: float = 0.08
    contrast_range: float = 0.15
    saturation_range: float = 0.15
    hue_delta: float = 0.02
    channel_gain_range: float = 0.0
    low_resolution_probability: float = 0.25
    low_resolution_min_side: int = 12
    blur_probability: float = 0.15
    blur_max_sigma: float = 1.5
    background_probability: float = 0.0
    validation_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    training_seed: int | None = None

    @property
    def randomness_seed(self) -> int:
        """The seed of everything random in training except the split."""
        return self.seed if self.training_seed is None else self.training_seed

    def __post_init__(self) -> None:
        _check_finite(self)
        _check_ranges(self, _RANGES)
        for name in ("seed", "training_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise ValueError(
                    f"{name} must be an integer from 0 to {2**32 - 1} (TensorFlow and NumPy "
                    f"seeds are 32-bit), got {value}."
                )
        if self.validation_fraction + self.test_fraction >= 0.9:
            raise ValueError(
                f"validation_fraction + test_fraction = "
                f"{self.validation_fraction + self.test_fraction:.2f} leaves almost nothing "
                f"to train on; keep their sum below 0.9."
            )
        _check_positive(
            self, ("image_size", "base_filters", "conv_blocks", "convs_per_block", "dense_units")
        )
        _check_positive(self, ("batch_size", "epochs", "early_stopping_patience"))
        if not 0.0 < self.learning_rate < 1.0:
            raise ValueError(f"learning_rate must be in (0, 1), got {self.learning_rate}.")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}.")
        if not 0.0 <= self.loss_drop_fraction < 0.5:
            raise ValueError(
                f"loss_drop_fraction must be in [0, 0.5), got {self.loss_drop_fraction}."
            )
        if not 0.0 <= self.mixup_alpha <= 10.0:
            raise ValueError(
                f"mixup_alpha must be in [0, 10] (0 turns mixup off; 0.2-0.4 is usual), "
                f"got {self.mixup_alpha}."
            )
        if self.colour_normalization not in COLOUR_NORMALIZATIONS:
            raise ValueError(
                f"colour_normalization must be one of {', '.join(COLOUR_NORMALIZATIONS)}, "
                f"got {self.colour_normalization!r}."
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}.")
        for name in ("low_resolution_probability", "blur_probability", "background_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.low_resolution_min_side < 2:
            raise ValueError(
                f"low_resolution_min_side must be at least 2 px, got "
                f"{self.low_resolution_min_side}."
            )
        if not 0 <= self.residual_separable_blocks <= self.conv_blocks:
            raise ValueError(
                f"residual_separable_blocks must be between 0 and conv_blocks "
                f"({self.conv_blocks}), got {self.residual_separable_blocks}."
            )
        if self.image_size < 2**self.conv_blocks:
            raise ValueError(
                f"image_size {self.image_size} is too small for {self.conv_blocks} conv blocks "
                f"(each halves the resolution); use image_size >= {2**self.conv_blocks}."
            )

    def replace(self, **changes: Any) -> TrainingConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict in field order, for YAML and the model card."""
        return dataclasses.asdict(self)


# Closed ranges of the augmentation strengths and split shares. Each bound keeps the
# transform meaningful: a contrast or saturation factor drawn from 1 +- range must stay
# positive, a hue shift of half the colour circle is already the opposite colour, and a
# shift of half the side moves the cell out of the picture.
_RANGES: dict[str, tuple[float, float]] = {
    "zoom_range": (0.0, 0.9),
    "shift_range": (0.0, 0.5),
    "brightness_delta": (0.0, 1.0),
    "contrast_range": (0.0, 0.99),
    "saturation_range": (0.0, 0.99),
    "hue_delta": (0.0, 0.5),
    "channel_gain_range": (0.0, 0.99),
    "blur_max_sigma": (0.0, 10.0),
    "validation_fraction": (0.01, 0.8),
    "test_fraction": (0.01, 0.8),
}


def _check_finite(config: TrainingConfig) -> None:
    """Refuse NaN and infinity: every comparison with them is False, so they would
    otherwise slip through the range checks and poison training silently."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field.name} must be a finite number, got {value}.")


def _check_ranges(config: TrainingConfig, ranges: dict[str, tuple[float, float]]) -> None:
    for name, (low, high) in ranges.items():
        value = getattr(config, name)
        if not low <= value <= high:
            raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value}.")


def _check_positive(config: TrainingConfig, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def config_from_dict(values: dict[str, Any], source: str = "config") -> TrainingConfig:
    """Build a config from a mapping, rejecting unknown keys and wrong types.

    Raises:
        ValueError: Naming the offending key and the accepted ones.
    """
    fields = {field.name: field for field in dataclasses.fields(TrainingConfig)}
    unknown = sorted((key for key in values if key not in fields), key=repr)
    if unknown:
        raise ValueError(
            f"{source}: unknown setting(s) {unknown}. Accepted settings: {', '.join(fields)}."
        )
    converted: dict[str, Any] = {}
    hints = typing.get_type_hints(TrainingConfig)
    for name, value in values.items():
        allowed = typing.get_args(hints[name]) or (hints[name],)
        if value is None and type(None) in allowed:
            converted[name] = None  # an optional setting left unset
            continue
        expected = next(kind for kind in allowed if kind is not type(None))
        converted[name] = _convert(name, value, expected, source)
    try:
        return TrainingConfig(**converted)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


_ARTICLE = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
_HOW_TO_WRITE = {
    float: " Write a number without quotes, such as 0.001 or 1e-3.",
    int: " Write a whole number without quotes or a decimal point, such as 20.",
    bool: " Write true or false without quotes.",
}


def _convert(name: str, value: Any, expected: type, source: str) -> Any:
    is_bool = isinstance(value, bool)
    if expected is bool and is_bool:
        return value
    if expected is int and isinstance(value, int) and not is_bool:
        return value
    if expected is float and isinstance(value, int | float) and not is_bool:
        return float(value)
    if expected is str and isinstance(value, str):
        return value
    # Quoted values ("0.01", "true") are text in YAML: say how to write one that is not.
    hint = _HOW_TO_WRITE.get(expected, "")
    raise ValueError(
        f"{source}: {name} must be {_ARTICLE[expected]}, got {value!r} "
        f"({type(value).__name__}).{hint}"
    )


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads ``1e-3`` as a number, as YAML 1.2 does.

    PyYAML follows YAML 1.1, whose floats need a dot and a signed exponent
    (``1.0e-3``); ``learning_rate: 1e-3``, as users write it, would otherwise be the
    text ``"1e-3"``. Quoted scalars stay text: the resolver only sees plain ones.
    """


_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_config(path: str | Path | None = None, **overrides: Any) -> TrainingConfig:
    """Resolve defaults < YAML file < explicit overrides (``None`` overrides are ignored).

    Raises:
        ValueError: If the file is missing, not a YAML mapping, or has bad settings.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ValueError(
                f"Config file {path} is a folder, not a YAML file. Pass the file itself "
                f"(such as {path / 'config.yaml'})."
            )
        if not path.is_file():
            raise ValueError(f"Config file {path} does not exist. Check the path.")
        try:
            # A SafeLoader subclass: plain data only, never Python objects.
            loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader)
        except UnicodeDecodeError:
            raise ValueError(
                f"{path} is not UTF-8 text. Save the config file as UTF-8 YAML "
                f"(e.g. a copy of a run's config.yaml)."
            ) from None
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{path} must hold a mapping of settings, got {type(loaded).__name__}."
            )
        values.update(loaded)
    given = {key: value for key, value in overrides.items() if value is not None}
    values.update(given)
    source = str(path) if path else "settings"
    if path and given:
        source += f" with the command-line settings {', '.join(sorted(given))}"
    return config_from_dict(values, source=source)


def save_config(config: TrainingConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    with open_output(path, newline=None) as handle:
        handle.write(yaml.safe_dump(config.to_dict(), sort_keys=False))
