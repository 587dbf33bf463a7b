"""Distributed training: TF_CONFIG checks, replica scaling, and real two-replica runs.

The runs happen in subprocesses: logical devices and multi-worker collectives must be
set up before TensorFlow starts, and this test process has started it already.
"""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from _synthetic import write_synthetic_dataset

from malaria_classifier.config import TrainingConfig
from malaria_classifier.distribute import (
    check_strategy,
    describe,
    is_chief_task,
    make_distribution,
    parse_tf_config,
    scale_for_replicas,
)
from malaria_classifier.model import load_model

TESTS_DIR = Path(__file__).resolve().parent
SOURCE_DIR = TESTS_DIR.parent / "src"
TINY_FLAGS = [
    "--epochs",
    "1",
    "--batch-size",
    "8",
    "--image-size",
    "32",
    "--learning-rate",
    "0.002",
]
TIMEOUT_SECONDS = 240


def _tf_config(workers: list[str], task_type: str = "worker", index: int = 0) -> str:
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": task_type, "index": index}})


def test_batch_size_and_learning_rate_scale_with_replicas():
    config = TrainingConfig(batch_size=64, learning_rate=0.001)
    scaled = scale_for_replicas(config, 4)
    assert (scaled.batch_size, scaled.learning_rate) == (256, 0.004)
    assert scale_for_replicas(config, 1) is config
    with pytest.raises(ValueError, match=r"0.3 x 4 replicas = 1.2 is too large"):
        scale_for_replicas(config.replace(learning_rate=0.3), 4)


def test_default_strategy_is_one_replica_and_recorded():
    distribution = make_distribution("none")
    assert (distribution.replicas, distribution.workers, distribution.is_chief) == (1, 1, True)
    assert describe(distribution, TrainingConfig(batch_size=32))["global_batch_size"] == 32


def test_unknown_strategy_is_refused_by_name():
    with pytest.raises(ValueError, match="Unknown strategy 'horovod'; use one of none, mirrored"):
        check_strategy("horovod")


def test_multiworker_without_tf_config_says_what_to_set(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        make_distribution("multiworker")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "TF_CONFIG is not valid JSON"),
        ('{"task": {"type": "worker", "index": 0}}', 'needs "cluster"'),
        (_tf_config(["10.0.0.1"]), "'10.0.0.1' of 'worker' is not 'host:port'"),
        (_tf_config(["a:1", "b:2"], index=2), "task index 2 is out of range"),
        (_tf_config(["a:1"], task_type="chief"), "task type 'chief' is not in the cluster"),
        ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}}', "has a 'ps' job"),
        ('{"cluster": {"worker": ["a:1"]}}', 'needs "task"'),
    ],
)
def test_bad_tf_config_is_explained(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tf_config(text)


def test_chief_is_worker_zero_unless_a_chief_is_named():
    assert is_chief_task(parse_tf_config(_tf_config(["a:1", "b:2"], index=0)))
    assert not is_chief_task(parse_tf_config(_tf_config(["a:1", "b:2"], index=1)))
    with_chief = {"cluster": {"chief": ["c:0"], "worker": ["a:1"]}}
    assert not is_chief_task({**with_chief, "task": {"type": "worker", "index": 0}})
    assert is_chief_task({**with_chief, "task": {"type": "chief", "index": 0}})


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cells", cells_per_class=4)


def _environment(**extra: str) -> dict[str, str]:
    environment = {key: value for key, value in os.environ.items() if key != "TF_CONFIG"}
    paths = [str(SOURCE_DIR), str(TESTS_DIR), environment.get("PYTHONPATH", "")]
    return {**environment, "PYTHONPATH": os.pathsep.join(filter(None, paths)), **extra}


MIRRORED_SCRIPT = textwrap.dedent(
    """
    import sys
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from malaria_classifier.cli import app

    data, run, *flags = sys.argv[1:]
    common = ["train", "--data", data, "--output", run, "--strategy", "mirrored"]
    app([*common, *flags], standalone_mode=False)
    # Resume from the checkpoint for one more epoch, still on two replicas.
    config = open(run + "/config.yaml").read().replace("epochs: 1", "epochs: 2")
    open(run + "/config.yaml", "w").write(config)
    app([*common, "--resume"], standalone_mode=False)
    """
)


def test_mirrored_training_on_two_cpu_replicas_scales_and_resumes(cells, tmp_path):
    run = tmp_path / "run"
    completed = subprocess.run(
        [sys.executable, "-c", MIRRORED_SCRIPT, str(cells), str(run), *TINY_FLAGS],
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    card = json.loads((run / "model_card.json").read_text())
    assert card["distribution"] == {
        "strategy": "mirrored",
        "replicas": 2,
        "workers": 1,
        "per_replica_batch_size": 8,
        "global_batch_size": 16,
        "learning_rate": 0.004,
    }
    assert card["config"]["batch_size"] == 8  # the run's config stays per replica
    history = json.loads((run / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert history[0]["learning_rate"] == pytest.approx(0.004)  # cosine starts at 2 x 0.002
    for name in ("model.keras", "checkpoint/epoch-002.keras"):
        model = load_model(str(run / name))
        probabilities = np.asarray(model(np.zeros((3, 32, 32, 3), np.uint8)))
        assert probabilities.shape == (3, 2) and np.allclose(probabilities.sum(axis=1), 1.0)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def _run_two_workers(
    cells: Path, outputs: list[Path], flags: list[str], scratch: Path | None = None
) -> list[tuple[int, str, str]]:
    """``malaria train --strategy multiworker`` as worker 0 and worker 1 on 127.0.0.1.

    Each worker gets its own ``--output`` (the same folder, or a copy standing for the
    run folder on another machine); worker 1's temporary folder is ``scratch`` if given.
    Returns each worker's exit status, stdout and stderr.
    """
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    processes = []
    for index, output in enumerate(outputs):
        command = [sys.executable, "-m", "malaria_classifier.cli", "train", "--data", str(cells)]
        command += ["--output", str(output), "--strategy", "multiworker", *flags]
        extra = {"TMPDIR": str(scratch)} if scratch is not None and index == 1 else {}
        processes.append(
            subprocess.Popen(
                command,
                env=_environment(TF_CONFIG=_tf_config(workers, index=index), **extra),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        finished = [process.communicate(timeout=TIMEOUT_SECONDS) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [
        (process.returncode, stdout, stderr)
        for process, (stdout, stderr) in zip(processes, finished, strict=True)
    ]


@pytest.fixture(scope="module")
def two_worker_run(cells, tmp_path_factory):
    """A one-epoch run of two local workers sharing one run folder (read-only for tests)."""
    run = tmp_path_factory.mktemp("multiworker") / "run"
    return run, _run_two_workers(cells, [run, run], TINY_FLAGS)


def test_multiworker_training_with_two_local_workers(two_worker_run):
    """Two processes on 127.0.0.1 form the cluster; only worker 0 writes the run folder."""
    run, results = two_worker_run
    for returncode, _stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
    assert "Model: " in results[0][1] and "Worker done" in results[1][1]
    card = json.loads((run / "model_card.json").read_text())
    assert card["distribution"]["workers"] == 2 and card["distribution"]["replicas"] == 2
    assert card["distribution"]["global_batch_size"] == 16
    assert (
        keras.saving.load_model(run / "checkpoint" / "epoch-001.keras", compile=False) is not None
    )


def _file_digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_multiworker_resume_refuses_stale_copies_then_continues_from_the_chiefs_epoch(
    cells, two_worker_run, tmp_path
):
    """docs/distributed.md's resume without a shared file system, on two local workers.

    Worker 1's --output is a copy of the chief's run folder, as on another machine. The
    chief's run was given a second epoch. A copy made before that is finished, and
    worker 1 used to return alone and leave the chief waiting for ever; a copy without
    the checkpoint would start worker 1 from epoch 0. Both workers refuse each before
    anything changes. With a fresh whole copy both resume from epoch 1; the chief's
    checkpoint folder keeps only what state.json names, model.keras is the best epoch's
    file, and worker 1 neither writes into its run folder nor leaves its scratch behind.
    """
    assert all(returncode == 0 for returncode, _, _ in two_worker_run[1])
    run = tmp_path / "run"
    shutil.copytree(two_worker_run[0], run)
    finished_copy = tmp_path / "worker-1" / "finished"
    shutil.copytree(run, finished_copy)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("epochs: 1", "epochs: 2"))
    chief_files = _file_digests(run)
    stale = tmp_path / "worker-1" / "stale"
    stale.mkdir(parents=True)
    for name in ("config.yaml", "manifest.csv"):
        shutil.copy(run / name, stale / name)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    advice = "A worker other than the chief resumes from the run folder at its own --output"

    refused = _run_two_workers(cells, [run, finished_copy], ["--resume"], scratch)

    for index, (returncode, _stdout, stderr) in enumerate(refused):
        assert returncode == 2, stderr[-3000:]
        mine = f"{run}, is not finished" if index == 0 else f"{finished_copy}, is finished"
        assert (
            f"Error: The 2 workers would not train the same model: the run is finished in "
            f"some of their run folders and not in others (this worker's, {mine}). {advice}"
        ) in " ".join(stderr.split())

    refused = _run_two_workers(cells, [run, stale], ["--resume"], scratch)

    for index, (returncode, _stdout, stderr) in enumerate(refused):
        assert returncode == 2, stderr[-3000:]
        mine = f"1 of {run}" if index == 0 else f"0 of {stale}"
        assert (
            f"Error: The 2 workers would not train the same model: they would resume from "
            f"different epochs (0, 1; this worker from epoch {mine}). {advice}"
        ) in " ".join(stderr.split())
    assert _file_digests(run) == chief_files  # card and metrics not retired, nothing trained

    copy = tmp_path / "worker-1" / "copy"
    shutil.copytree(run, copy)
    results = _run_two_workers(cells, [run, copy], ["--resume"], scratch)

    for returncode, _stdout, stderr in results:
        assert returncode == 0, stderr[-3000:]
        assert "Resuming from epoch 1" in stderr
    assert "Worker done" in results[1][1]
    history = json.loads((run / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    state = json.loads((run / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 2 and [entry["epoch"] for entry in state["history"]] == [1, 2]
    named = {"state.json", state["checkpoint"], state["best_checkpoint"]}
    assert {path.name for path in (run / "checkpoint").iterdir()} == named
    assert state["checkpoint"] == "epoch-002.keras"
    best = run / "checkpoint" / state["best_checkpoint"]
    assert (run / "model.keras").read_bytes() == best.read_bytes()
    card = json.loads((run / "model_card.json").read_text())
    assert card["training"]["epochs_run"] == 2 and card["distribution"]["workers"] == 2
    assert _file_digests(copy) == chief_files  # worker 1 only read its run folder
    assert list(scratch.iterdir()) == []
