"""Hyper-parameter search end to end: validation-only trials, resume, outputs."""

import csv
import json
import re
import shutil
from pathlib import Path

import optuna
import pytest
from _synthetic import write_synthetic_dataset
from _tuning import BASE, TINY_SPACE

import malaria_classifier.training as training_module
import malaria_classifier.trial_objective as objective_module
import malaria_classifier.tune as tune_module
from malaria_classifier.config import load_config
from malaria_classifier.data import check_dataset
from malaria_classifier.search_space import SearchSpace, suggest_config
from malaria_classifier.splits import read_manifest
from malaria_classifier.study_storage import (
    DATA_FINGERPRINT,
    check_fixed_settings,
    open_study,
    sqlite_url,
)
from malaria_classifier.tune import tune


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


def test_several_seeds_per_trial_score_their_mean_and_a_study_keeps_its_count(
    tmp_path, monkeypatch
):
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    trainings = []
    real_train_trial = objective_module.train_trial

    def recording_train_trial(config, root, rows, trial, report=True):
        value = real_train_trial(config, root, rows, trial, report=report)
        trainings.append((trial.number, config.randomness_seed, report, value))
        return value

    monkeypatch.setattr(objective_module, "train_trial", recording_train_trial)
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
    assert not (tmp_path / "tune").exists()  # not even an empty folder
    assert not (data / "inside").exists()


def _fast_objective(monkeypatch, calls=None):
    """Score a trial by its dropout rate instead of training it (milliseconds, not seconds)."""

    def score(config, root, rows, trial, seeds=1):
        if calls is not None:
            calls.append(trial.number)
        return config.dropout_rate

    monkeypatch.setattr(objective_module, "score_trial", score)


def _param_sets(output, study_name="malaria"):
    study = optuna.load_study(study_name=study_name, storage=sqlite_url(output / "study.db"))
    return [tuple(sorted(trial.params.items())) for trial in study.trials]


def test_a_resumed_search_draws_new_parameters_and_a_first_session_draws_as_before(
    tmp_path, monkeypatch
):
    _fast_objective(monkeypatch)
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    arguments = {"base": BASE, "space": TINY_SPACE, "progress": False}

    tune(data, 2, tmp_path / "resumed", **arguments)
    tune(data, 4, tmp_path / "resumed", **arguments)
    resumed = _param_sets(tmp_path / "resumed")
    assert len(resumed) == 4 and len(set(resumed)) == 4  # no replayed start-up draws

    tune(data, 4, tmp_path / "at_once", **arguments)
    at_once = _param_sets(tmp_path / "at_once")
    assert resumed[:2] == at_once[:2]
    # A first session draws exactly what the config's seed alone gives the sampler.
    reference = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=BASE.seed, n_startup_trials=5),
    )
    reference.optimize(lambda trial: suggest_config(trial, BASE, TINY_SPACE).dropout_rate, 4)
    assert at_once == [tuple(sorted(trial.params.items())) for trial in reference.trials]


def test_a_study_records_its_data_and_refuses_to_continue_on_other_data(tmp_path, monkeypatch):
    calls = []
    _fast_objective(monkeypatch, calls)
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    output = tmp_path / "tune"
    output.mkdir()
    # A study from before the data were recorded: one finished trial, no attributes.
    older = optuna.create_study(
        storage=sqlite_url(output / "study.db"), study_name="malaria", direction="maximize"
    )
    older.tell(older.ask(), 0.5)

    tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)
    study = optuna.load_study(study_name="malaria", storage=sqlite_url(output / "study.db"))
    recorded = study.user_attrs[DATA_FINGERPRINT]
    assert recorded["sha256"] == check_dataset(data).fingerprint()
    assert recorded["images"] == 8 * 4 + 6 * 4  # 6 infected patients have both classes

    # The same images in another folder are the same data.
    moved = shutil.copytree(data, tmp_path / "moved")
    tune(moved, 3, output, base=BASE, space=TINY_SPACE, progress=False)
    assert calls == [1, 2]

    changed = shutil.copytree(data, tmp_path / "changed")
    next(iter(sorted((changed / "Uninfected").iterdir()))).unlink()
    manifest = (output / "manifest.csv").read_bytes()
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"Study 'malaria' was scored on other data: its trials used the 56 images of "
            f"{data} as they were then, and --data {changed} (55 images) differs"
        )
        + r".* Pass the --data it started with to continue it, or a new --study-name or --output",
    ):
        tune(changed, 4, output, base=BASE, space=TINY_SPACE, progress=False)
    assert calls == [1, 2]  # refused before any training
    assert (output / "manifest.csv").read_bytes() == manifest
    assert (
        len(optuna.load_study(study_name="malaria", storage=sqlite_url(output / "study.db")).trials)
        == 3
    )


def test_an_output_folder_with_url_characters_keeps_the_study_in_it(tmp_path, monkeypatch):
    _fast_objective(monkeypatch)
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    output = tmp_path / "a?b %20c#d"

    tune(data, 1, output, base=BASE, space=TINY_SPACE, progress=False)
    again = tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)

    assert again.finished_trials == 2  # the second session found the first one's trial
    assert [path.relative_to(tmp_path) for path in tmp_path.rglob("*.db")] == [
        Path("a?b %20c#d/study.db")
    ]
    assert len(_param_sets(output)) == 2


def test_a_refused_start_removes_only_the_empty_folders_it_created(tmp_path):
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    fresh = tmp_path / "new" / "tune"
    with pytest.raises(ValueError, match="--storage 'not a url' could not be opened"):
        tune(data, 1, fresh, base=BASE, space=TINY_SPACE, storage="not a url", progress=False)
    assert not (tmp_path / "new").exists()

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(ValueError, match="could not be opened"):
        tune(data, 1, existing, base=BASE, space=TINY_SPACE, storage="not a url", progress=False)
    assert existing.is_dir()

    # A study kept elsewhere refuses other fixed settings: nothing is left in --output.
    storage = sqlite_url(tmp_path / "studies.db")
    check_fixed_settings(open_study(storage, "malaria", 42), BASE, TINY_SPACE)
    with pytest.raises(ValueError, match="other fixed settings"):
        tune(
            data,
            1,
            fresh,
            base=BASE.replace(seed=7),
            space=TINY_SPACE,
            storage=storage,
            progress=False,
        )
    assert not (tmp_path / "new").exists()

    # Data refused before a new study's file is created: no study.db, no folder.
    with pytest.raises(ValueError, match="No Parasitized/ and Uninfected/ folders found"):
        tune(tmp_path / "existing", 1, fresh, base=BASE, space=TINY_SPACE, progress=False)
    assert not (tmp_path / "new").exists()


def test_a_trial_stopped_by_ctrl_c_is_failed_and_replaced_on_resume(tmp_path, monkeypatch):
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, cells_per_class=4, size=20)
    output = tmp_path / "tune"

    def interrupted(config, root, rows, trial, seeds=1):
        raise KeyboardInterrupt

    monkeypatch.setattr(objective_module, "score_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)
    _fast_objective(monkeypatch)
    result = tune(data, 2, output, base=BASE, space=TINY_SPACE, progress=False)

    study = optuna.load_study(study_name="malaria", storage=sqlite_url(output / "study.db"))
    states = [trial.state.name for trial in study.trials]
    assert states == ["FAIL", "COMPLETE", "COMPLETE"] and result.finished_trials == 2
    assert len(set(_param_sets(output))) == 3  # the failed trial's recipe is not run again
