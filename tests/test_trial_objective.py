"""The objective of a tuning trial: one recipe, several training seeds, same patients."""

from malaria_classifier.config import TrainingConfig
from malaria_classifier.trial_objective import seed_configs

BASE = TrainingConfig(validation_fraction=0.25, test_fraction=0.25, early_stopping_patience=2)


def test_seed_configs_change_only_the_training_seed():
    configs = seed_configs(BASE, 3)
    assert configs[0] == BASE
    assert [config.randomness_seed for config in configs] == [42, 43, 44]
    assert {config.seed for config in configs} == {BASE.seed}  # same split, same patients
    assert all(config.replace(training_seed=None) == BASE for config in configs)
