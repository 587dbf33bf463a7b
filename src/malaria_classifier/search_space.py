"""What a tuning trial may choose: the search space and the recipe it draws.

:class:`SearchSpace` bounds the searched settings; :func:`suggest_config` turns one
Optuna trial's draws into a :class:`~malaria_classifier.config.TrainingConfig`, and
:func:`params_to_settings` turns a finished trial's parameters back into settings
(for ``best_config.yaml``). Augmentation is searched as one strength, the factor on
:data:`AUGMENTATION_AT_STRENGTH_ONE`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from malaria_classifier.config import TrainingConfig

# Augmentation at strength 1.0: the robustness recipe of docs/benchmarks.md section 9.
# A trial's strength scales every range and probability (probabilities capped at 1).
AUGMENTATION_AT_STRENGTH_ONE: dict[str, float] = {
    "zoom_range": 0.15,
    "shift_range": 0.05,
    "brightness_delta": 0.1,
    "contrast_range": 0.2,
    "saturation_range": 0.4,
    "hue_delta": 0.04,
    "channel_gain_range": 0.12,
    "low_resolution_probability": 0.3,
    "blur_probability": 0.2,
    "background_probability": 0.3,
}


@dataclass(frozen=True)
class SearchSpace:
    """What a trial may choose. Defaults suit the NIH cells on a CPU.

    Attributes:
        image_sizes: Model input sides to try (px).
        base_filters: Widths of the first conv block to try.
        conv_blocks: Smallest and largest depth (capped so the input is at least
            ``2**blocks`` px).
        convs_per_block: Smallest and largest number of convolutions per block.
        residual_separable_blocks: Smallest and largest number of last blocks given a
            depthwise-separable residual layer (capped at the trial's depth).
        dense_units: Widths of the dense layer to try.
        colour_normalizations: Input scalings to try (see ``TrainingConfig``).
        batch_sizes: Batch sizes to try.
        learning_rate: Range of Adam's initial rate (searched on a log scale).
        dropout_rate: Range of the dropout rate.
        label_smoothing: Range of label smoothing.
        max_epochs: Budget: a trial chooses its cosine-schedule length up to this, and
            early stopping (the config's patience) may end it sooner.
        augmentation_strength: Range of the factor on AUGMENTATION_AT_STRENGTH_ONE.
    """

    image_sizes: tuple[int, ...] = (48, 64, 80, 96)
    base_filters: tuple[int, ...] = (8, 12, 16, 24)
    conv_blocks: tuple[int, int] = (3, 5)
    convs_per_block: tuple[int, int] = (1, 2)
    residual_separable_blocks: tuple[int, int] = (0, 2)
    dense_units: tuple[int, ...] = (32, 64, 128)
    colour_normalizations: tuple[str, ...] = ("fixed", "per_cell")
    batch_sizes: tuple[int, ...] = (32, 64, 128)
    learning_rate: tuple[float, float] = (3e-4, 3e-3)
    dropout_rate: tuple[float, float] = (0.0, 0.5)
    label_smoothing: tuple[float, float] = (0.0, 0.1)
    max_epochs: int = 20
    augmentation_strength: tuple[float, float] = (0.0, 1.5)


def suggest_config(trial: Any, base: TrainingConfig, space: SearchSpace) -> TrainingConfig:
    """The recipe of one trial: ``base`` with the searched settings drawn by ``trial``."""
    image_size = trial.suggest_categorical("image_size", list(space.image_sizes))
    deepest = min(space.conv_blocks[1], int(math.log2(image_size)))
    strength = trial.suggest_float("augmentation_strength", *space.augmentation_strength)
    conv_blocks = trial.suggest_int("conv_blocks", space.conv_blocks[0], deepest)
    changes: dict[str, Any] = {
        "image_size": image_size,
        "base_filters": trial.suggest_categorical("base_filters", list(space.base_filters)),
        "conv_blocks": conv_blocks,
        "convs_per_block": trial.suggest_int("convs_per_block", *space.convs_per_block),
        "residual_separable_blocks": trial.suggest_int(
            "residual_separable_blocks",
            min(space.residual_separable_blocks[0], conv_blocks),
            min(space.residual_separable_blocks[1], conv_blocks),
        ),
        "dense_units": trial.suggest_categorical("dense_units", list(space.dense_units)),
        "colour_normalization": trial.suggest_categorical(
            "colour_normalization", list(space.colour_normalizations)
        ),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_sizes)),
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "dropout_rate": trial.suggest_float("dropout_rate", *space.dropout_rate),
        "label_smoothing": trial.suggest_float("label_smoothing", *space.label_smoothing),
        "epochs": trial.suggest_int("epochs", max(1, space.max_epochs // 3), space.max_epochs),
        "augment": True,
    }
    changes.update(scaled_augmentation(strength))
    return base.replace(**changes)


def scaled_augmentation(strength: float) -> dict[str, float]:
    """Augmentation settings at ``strength`` x AUGMENTATION_AT_STRENGTH_ONE."""
    return {
        name: min(1.0, value * strength) if name.endswith("probability") else value * strength
        for name, value in AUGMENTATION_AT_STRENGTH_ONE.items()
    }


def params_to_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The settings a trial's ``params`` stand for (the inverse of :func:`suggest_config`)."""
    settings = {key: value for key, value in params.items() if key != "augmentation_strength"}
    settings.update(scaled_augmentation(params.get("augmentation_strength", 1.0)))
    settings["augment"] = True
    return settings
