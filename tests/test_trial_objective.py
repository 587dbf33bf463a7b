"""The objective of a tuning trial: one recipe, several training seeds, same patients."""

from _tuning import BASE

from malaria_classifier.trial_objective import seed_configs


def test_seed_configs_change_only_the_training_seed():
    configs = seed_configs(BASE, 3)
    assert configs[0] == BASE
    assert [config.randomness_seed for config in configs] == [42, 43, 44]
    assert {config.seed for config in configs} == {BASE.seed}  # same split, same patients
    assert all(config.replace(training_seed=None) == BASE for config in configs)
