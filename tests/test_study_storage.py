"""A tuning study records what it holds fixed and refuses to be resumed with other settings."""

import optuna
import pytest
from _tuning import BASE, TINY_SPACE

from malaria_classifier.search_space import SearchSpace
from malaria_classifier.study_storage import check_fixed_settings


def test_a_study_refuses_to_continue_with_other_fixed_settings():
    study = optuna.create_study(direction="maximize")
    check_fixed_settings(study, BASE, TINY_SPACE)
    check_fixed_settings(study, BASE, TINY_SPACE)  # same settings: fine

    with pytest.raises(ValueError, match=r"other fixed settings \(seed\)"):
        check_fixed_settings(study, BASE.replace(seed=7), TINY_SPACE)
    wider = SearchSpace(**{**TINY_SPACE.__dict__, "max_epochs": 5})
    with pytest.raises(ValueError, match=r"--max-epochs \(was 2\)"):
        check_fixed_settings(study, BASE, wider)
