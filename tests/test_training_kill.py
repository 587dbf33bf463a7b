"""A training run killed with SIGKILL keeps a loadable model and resumes cleanly."""

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


def _train(data, config, run_dir, *extra):
    command = [sys.executable, "-m", "malaria_classifier.cli", "train", "--data", str(data)]
    command += ["--config", str(config), "--output", str(run_dir), *extra]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigkill_mid_training_leaves_a_good_model_and_resume_finishes(tmp_path):
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
    time.sleep(random.uniform(0.0, 1.5))  # somewhere in a later epoch, maybe mid-save
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "training ended before it could be killed"

    assert keras.saving.load_model(model_path, compile=False).output_shape == (None, 2)

    resumed = _train(data, config, run_dir, "--resume")
    _, errors = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, errors.decode()
    history = json.loads((run_dir / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(1, 9))
    assert (run_dir / "model_card.json").is_file()
    assert keras.saving.load_model(model_path, compile=False) is not None
