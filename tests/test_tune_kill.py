"""A tuning run killed with SIGKILL keeps every finished trial and resumes cleanly.

The search runs in a subprocess on tiny synthetic cells; it is killed at a seeded
random moment after its first trial has finished (maybe mid-trial, maybe while the
study database is being written), then run again. The study must open, keep the
trials finished before the kill, run only the missing ones, and write a best config
that ``malaria train --config`` accepts. Kill moments replay with MALARIA_KILL_SEED.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from _synthetic import write_synthetic_dataset

from malaria_classifier.config import load_config

SEED = int(os.environ.get("MALARIA_KILL_SEED", "20261126"))
TRIALS = 4
SCRIPT = textwrap.dedent(
    """
    import sys
    from malaria_classifier.config import TrainingConfig
    from malaria_classifier.tune import SearchSpace, tune

    space = SearchSpace(
        image_sizes=(16,), base_filters=(4,), conv_blocks=(2, 2), convs_per_block=(1, 1),
        dense_units=(8,), batch_sizes=(16,), max_epochs=3,
    )
    base = TrainingConfig(
        validation_fraction=0.25, test_fraction=0.25, early_stopping_patience=2
    )
    tune(sys.argv[1], int(sys.argv[3]), sys.argv[2], base=base, space=space, progress=False)
    """
)


def _tune(data, output, trials=TRIALS):
    command = [sys.executable, "-c", SCRIPT, str(data), str(output), str(trials)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _finished_trials(storage):
    study = optuna.load_study(study_name="malaria", storage=storage)
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return [trial.number for trial in study.trials if trial.state in states]


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigkill_during_tuning_keeps_finished_trials_and_resume_completes(tmp_path):
    rng = random.Random(SEED)
    data = write_synthetic_dataset(tmp_path / "cells", patients=8, size=24)
    output = tmp_path / "tune"
    storage = f"sqlite:///{output / 'study.db'}"

    process = _tune(data, output)
    deadline = time.monotonic() + 180
    finished: list[int] = []
    while process.poll() is None and time.monotonic() < deadline:
        if (output / "study.db").exists():
            try:
                finished = _finished_trials(storage)
            except Exception:  # noqa: BLE001 - the study may not be created yet
                finished = []
            if finished:
                break
        time.sleep(0.2)
    assert finished, f"no trial finished before the kill: {process.stderr.read().decode()}"
    time.sleep(rng.uniform(0.0, 2.0))
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()
    kept = _finished_trials(storage)
    assert set(finished) <= set(kept)  # nothing finished before the kill was lost

    resumed = _tune(data, output)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    final = _finished_trials(storage)
    assert len(final) >= TRIALS and set(kept) <= set(final)
    best = json.loads((output / "best_trial.json").read_text())
    assert best["trial"] in final
    assert load_config(output / "best_config.yaml").image_size == 16

    # Killing a later, longer search must leave the outputs whole (old or new, never half).
    longer = _tune(data, output, trials=TRIALS + 3)
    time.sleep(rng.uniform(1.0, 6.0))
    if longer.poll() is None:
        longer.send_signal(signal.SIGKILL)
    longer.wait()
    assert load_config(output / "best_config.yaml").image_size == 16
    assert set(final) <= set(_finished_trials(storage))
    assert (output / "trials.csv").read_text().startswith("number,state,value")
