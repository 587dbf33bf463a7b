"""Hyper-parameter search: trial recipes, validation-only objective, resume, outputs."""

import csv
import json

import optuna
import pytest
from _synthetic import write_synthetic_dataset

import malaria_classifier.training as training_module
import malaria_classifier.tune as tune_module
from malaria_classifier.config import TrainingConfig, load_config
from malaria_classifier.splits import read_manifest
from malaria_classifier.tune import (
    AUGMENTATION_AT_STRENGTH_ONE,
    SearchSpace,
    scaled_augmentation,
    seed_configs,
    suggest_config,
    tune,
)

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


def test_search_uses_validation_patients_only_resumes_and_writes_a_usable_config(
    tmp_path, monkeypatch
):
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    seen_paths = []
    real_make_dataset = training_module.make_dataset

    def spying_make_dataset(paths, labels, config, training):
        seen_paths.extend(str(path) for path in paths)
        return real_make_dataset(paths, labels, config, training)

    monkeypatch.setattr(training_module, "make_dataset", spying_make_dataset)
    output = tmp_path / "tune"
    first = tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)

    test_paths = {
        str(data / row.path)
        for row in read_manifest(output / "manifest.csv")
        if row.split == "test"
    }
    assert test_paths and seen_paths and not test_paths & set(seen_paths)
    assert first.finished_trials == 2
    best = load_config(first.best_config_path)
    assert best.image_size == 16 and best.base_filters == 4 and best.test_fraction == 0.25
    assert (output / "study.db").is_file()
    assert (output / "figures" / "optimization_history.json").is_file()
    assert (output / "figures" / "optimization_history.html").is_file()

    storage = f"sqlite:///{output / 'study.db'}"
    values_before = [
        t.value for t in optuna.load_study(study_name="malaria", storage=storage).trials
    ]
    again = tune(data, 3, output, base=BASE, space=TINY_SPACE, progress=False)
    trials = optuna.load_study(study_name="malaria", storage=storage).trials
    assert again.finished_trials == 3 and len(trials) == 3
    assert [t.value for t in trials[:2]] == values_before
    with open(output / "trials.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3


def test_zero_trials_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--trials must be at least 1"):
        tune(tmp_path, 0, tmp_path / "tune")


def test_seed_configs_change_only_the_training_seed():
    configs = seed_configs(BASE, 3)
    assert configs[0] == BASE
    assert [config.randomness_seed for config in configs] == [42, 43, 44]
    assert {config.seed for config in configs} == {BASE.seed}  # same split, same patients
    assert all(config.replace(training_seed=None) == BASE for config in configs)


def test_several_seeds_per_trial_score_their_mean_and_a_study_keeps_its_count(
    tmp_path, monkeypatch
):
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    trainings = []
    real_train_trial = tune_module.train_trial

    def recording_train_trial(config, root, rows, trial, report=True):
        value = real_train_trial(config, root, rows, trial, report=report)
        trainings.append((trial.number, config.randomness_seed, report, value))
        return value

    monkeypatch.setattr(tune_module, "train_trial", recording_train_trial)
    output = tmp_path / "tune"
    result = tune(data, 1, output, base=BASE, space=TINY_SPACE, progress=False, seeds_per_trial=2)

    # Two trainings of the one trial, seeds 42 and 43, only the first one prunable.
    assert [(number, seed, report) for number, seed, report, _ in trainings] == [
        (0, 42, True),
        (0, 43, False),
    ]
    values = [value for *_, value in trainings]
    assert result.best_value == pytest.approx(sum(values) / 2)
    best = json.loads((output / "best_trial.json").read_text())
    assert best["seeds_per_trial"] == 2 and best["value_by_seed"] == pytest.approx(values)
    with open(output / "trials.csv", newline="") as handle:
        [row] = list(csv.DictReader(handle))
    assert [float(value) for value in row["validation_auc_by_seed"].split()] == pytest.approx(
        values, abs=1e-6
    )

    # One completed trial: no parameter-importance figure (it would rank nothing).
    assert not (output / "figures" / "param_importances.json").exists()
    assert (output / "figures" / "optimization_history.json").is_file()

    with pytest.raises(ValueError, match="scores each trial on 2 training seed"):
        tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)


def test_zero_seeds_per_trial_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--seeds-per-trial must be at least 1"):
        tune(tmp_path, 1, tmp_path / "tune", seeds_per_trial=0)


def test_progress_line_shows_each_seed_of_a_trial(capsys):
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr("validation_auc_by_seed", [0.98, 0.97])
    study.tell(trial, 0.975)

    tune_module._progress_printer(3, 0.0)(study, study.trials[0])

    line = capsys.readouterr().err
    assert "validation AUC 0.9750 (mean of seeds: 0.9800, 0.9700); 1/3 finished" in line


def test_a_study_refuses_to_continue_with_other_fixed_settings():
    study = optuna.create_study(direction="maximize")
    tune_module._check_fixed_settings(study, BASE, TINY_SPACE)
    tune_module._check_fixed_settings(study, BASE, TINY_SPACE)  # same settings: fine

    with pytest.raises(ValueError, match=r"other fixed settings \(seed\)"):
        tune_module._check_fixed_settings(study, BASE.replace(seed=7), TINY_SPACE)
    wider = SearchSpace(**{**TINY_SPACE.__dict__, "max_epochs": 5})
    with pytest.raises(ValueError, match=r"--max-epochs \(was 2\)"):
        tune_module._check_fixed_settings(study, BASE, wider)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"timeout": -5.0}, "--timeout must be a positive number of seconds, got -5.0"),
        ({"space": SearchSpace(max_epochs=0)}, "--max-epochs must be at least 1, got 0"),
        ({"storage": "not a url"}, "--storage 'not a url' could not be opened"),
        ({"output_dir": "inside"}, "is inside the data folder"),
    ],
)
def test_bad_tuning_arguments_are_refused_before_any_trial(tmp_path, arguments, message):
    data = tmp_path / "cells"
    data.mkdir()
    output = data / "inside" if arguments.pop("output_dir", None) else tmp_path / "tune"
    with pytest.raises(ValueError, match=message):
        tune(data, 1, output, progress=False, **arguments)
    assert not (tmp_path / "tune" / "manifest.csv").exists()
    assert not (data / "inside").exists()
