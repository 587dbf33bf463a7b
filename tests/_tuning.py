"""A tiny search space and base training settings shared by the tuning tests."""

from __future__ import annotations

from malaria_classifier.config import TrainingConfig
from malaria_classifier.search_space import SearchSpace

TINY_SPACE = SearchSpace(
    image_sizes=(16,),
    base_filters=(4,),
    conv_blocks=(2, 2),
    convs_per_block=(1, 1),
    dense_units=(8,),
    batch_sizes=(16,),
    max_epochs=2,
)
BASE = TrainingConfig(validation_fraction=0.25, test_fraction=0.25, early_stopping_patience=2)
