"""The tuning search space: a trial's recipe takes every searched setting."""

import optuna
import pytest
from _tuning import BASE

from malaria_classifier.search_space import (
    AUGMENTATION_AT_STRENGTH_ONE,
    SearchSpace,
    scaled_augmentation,
    suggest_config,
)


def test_a_trial_recipe_takes_every_searched_setting():
    params = {
        "image_size": 80,
        "augmentation_strength": 0.5,
        "base_filters": 12,
        "conv_blocks": 5,
        "convs_per_block": 2,
        "residual_separable_blocks": 1,
        "dense_units": 32,
        "colour_normalization": "per_cell",
        "batch_size": 128,
        "learning_rate": 0.002,
        "dropout_rate": 0.25,
        "label_smoothing": 0.05,
        "epochs": 12,
    }
    config = suggest_config(optuna.trial.FixedTrial(params), BASE, SearchSpace())
    for name, value in params.items():
        if name != "augmentation_strength":
            assert getattr(config, name) == value, name
    assert config.saturation_range == pytest.approx(0.2)
    assert config.background_probability == pytest.approx(0.15)
    assert config.seed == BASE.seed and config.test_fraction == 0.25


def test_augmentation_strength_scales_ranges_and_caps_probabilities():
    assert scaled_augmentation(0.0) == dict.fromkeys(AUGMENTATION_AT_STRENGTH_ONE, 0.0)
    strong = scaled_augmentation(5.0)
    assert strong["blur_probability"] == 1.0
    assert strong["hue_delta"] == pytest.approx(0.2)
