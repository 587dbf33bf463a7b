"""A training run killed with SIGKILL at random moments keeps its model and resumes cleanly.

Kill points are drawn from a seeded generator, so a failure can be replayed: the first
kill lands somewhere after the first best model is saved (maybe mid-save), the later
ones anywhere in a resumed run, start-up included. After every kill the previous
model must still load, and the run folder's split and settings must be unchanged.
Tuning's kill test is tests/test_tune_kill.py.
"""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time

import keras
import pytest
from _synthetic import write_synthetic_dataset

CONFIG = """\
image_size: 32
base_filters: 8
conv_blocks: 2
dense_units: 16
batch_size: 16
epochs: 8
early_stopping_patience: 8
validation_fraction: 0.25
test_fraction: 0.25
"""
KILLS = 3
SEED = int(os.environ.get("MALARIA_KILL_SEED", "20261126"))


def _train(data, config, run_dir, *extra):
    command = [sys.executable, "-m", "malaria_classifier.cli", "train", "--data", str(data)]
    command += ["--config", str(config), "--output", str(run_dir), *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _kill(process, delay):
    time.sleep(delay)
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigkill_at_random_points_leaves_a_good_model_and_resume_finishes(tmp_path):
    rng = random.Random(SEED)
    data = write_synthetic_dataset(tmp_path / "cells", patients=12, size=32)
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    run_dir = tmp_path / "run"
    model_path = run_dir / "model.keras"

    process = _train(data, config, run_dir)
    deadline = time.monotonic() + 120
    while not model_path.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert model_path.exists(), process.stderr.read().decode()
    fixed = {name: _digest(run_dir / name) for name in ("manifest.csv", "config.yaml")}
    _kill(process, rng.uniform(0.0, 1.5))
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"

    for _ in range(KILLS - 1):
        assert keras.saving.load_model(model_path, compile=False).output_shape == (None, 2)
        assert {name: _digest(run_dir / name) for name in fixed} == fixed
        _kill(_train(data, config, run_dir, "--resume"), rng.uniform(0.5, 6.0))

    assert keras.saving.load_model(model_path, compile=False).output_shape == (None, 2)
    assert {name: _digest(run_dir / name) for name in fixed} == fixed
    resumed = _train(data, config, run_dir, "--resume")
    _, errors = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, errors.decode()
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(1, 9))
    assert (run_dir / "model_card.json").is_file()
    assert keras.saving.load_model(model_path, compile=False) is not None
