"""Benchmark: `malaria predict` throughput vs plain Pillow decoding of the same files.

Usage:
    python bench/predict_throughput.py [--data ../shared/data/nih-cell-images] [--images 5000] [--rounds 3]
        [--runtimes keras,onnx,tflite] [--decode threads,processes] [--profile 1000]
        [--models MODEL.keras,OTHER.keras]

``--decode processes`` is what ``malaria predict`` does (files decoded in one worker
process per core, started with the predictor and reused by every call, so starting
them counts as start-up); ``threads`` is the API default (its forward pass: ``auto``, i.e. onnx).

Both are measured in the same run on the same files (file cache warmed first), so
the ratio is comparable across machines. Start-up (importing TensorFlow, loading
the model) is measured separately and excluded from the throughput. ``--models``
measures several models (e.g. the bundled default before and after a retraining)
in the same alternating rounds; the CLI line always uses the bundled default.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import io
import itertools
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _cells import cell_files, spread
from PIL import Image


def pick_files(data_dir: Path, count: int) -> list[Path]:
    return spread(cell_files(data_dir), count)


def pillow_decode(files: list[Path]) -> tuple[float, float]:
    """Pillow decoding of every file on one thread: images/s and CPU milliseconds an image."""
    cpu_started, started = time.process_time(), time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image.convert("RGB").load()
    cpu_ms = (time.process_time() - cpu_started) / len(files) * 1e3
    return len(files) / (time.perf_counter() - started), cpu_ms


def cpu_seconds() -> float | None:
    """CPU time (user + system) of this process and its live decode workers so far.

    CPU time per image is the steady figure on a VM that gives this process one core
    for some stretches and two for others; psutil (the ``bench`` extra) reads the
    workers', else None.
    """
    try:
        import psutil
    except ImportError:
        return None
    me = psutil.Process()
    total = 0.0
    for process in (me, *me.children(recursive=True)):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def forward_rate(predictor, batch: np.ndarray, repeats: int = 10) -> float:
    """Forward pass alone, batch of 256 decoded cells (no file reading or decoding)."""
    predictor._predict_batch(batch)
    started = time.perf_counter()
    for _ in range(repeats):
        predictor._predict_batch(batch)
    return repeats * len(batch) / (time.perf_counter() - started)


def profile_predict(predictor, files: list[Path]) -> str:
    """Where `predict_paths` spends its time (cProfile, top functions by own time).

    cProfile sees the main thread only; decoding runs in worker threads, so we also
    profile one decode+resize per file on the main thread.
    """
    from malaria_classifier.images import load_for_model

    report = io.StringIO()
    for title, work in (
        ("predict_paths (main thread)", lambda: list(predictor.predict_paths(files))),
        (
            "load_for_model on one thread (what each decode worker does)",
            lambda: [load_for_model(path, predictor.image_size) for path in files],
        ),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        work()
        profiler.disable()
        report.write(f"--- {title}, {len(files)} files\n")
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(12)
    return report.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runtimes", default="keras,onnx,tflite")
    parser.add_argument(
        "--decode",
        default="threads,processes",
        help="where files are decoded: threads (API default), processes (malaria predict)",
    )
    parser.add_argument("--profile", type=int, default=0, help="cProfile this many files")
    parser.add_argument(
        "--models", default="", help="comma-separated .keras files (default: the bundled model)"
    )
    args = parser.parse_args()
    models = [Path(path) for path in args.models.split(",") if path] or [None]
    files = pick_files(args.data, args.images)
    for path in files:  # warm the OS file cache so both sides read from memory
        path.read_bytes()

    from malaria_classifier.images import load_for_model
    from malaria_classifier.prediction import Predictor

    predictors, startups = {}, {}
    for model, runtime, decode in itertools.product(
        models, args.runtimes.split(","), args.decode.split(",")
    ):
        name = f"{runtime}, decode in {decode}"
        if model is not None:
            name = f"{model}: {name}"
        started = time.perf_counter()
        predictors[name] = Predictor(model, runtime=runtime, decode_processes=decode == "processes")
        list(predictors[name].predict_paths(files[:64]))  # trace / allocate once
        startups[name] = time.perf_counter() - started
    batch = np.stack([load_for_model(path, 64) for path in files[:256]])
    forward_rates = {name: forward_rate(p, batch) for name, p in predictors.items()}

    # Alternate the measurements and take medians: this shared 2-core machine's
    # speed drifts by up to 2x from minute to minute.
    pillow_rates: list[float] = []
    pillow_cpu: list[float] = []
    api_rates: dict[str, list[float]] = {name: [] for name in predictors}
    api_cpu: dict[str, list[float]] = {name: [] for name in predictors}
    for _ in range(args.rounds):
        rate, cpu_ms = pillow_decode(files)
        pillow_rates.append(rate)
        pillow_cpu.append(cpu_ms)
        for name, predictor in predictors.items():
            cpu_before = cpu_seconds()
            started = time.perf_counter()
            rows = list(predictor.predict_paths(files))
            api_rates[name].append(len(rows) / (time.perf_counter() - started))
            if cpu_before is not None:
                api_cpu[name].append((cpu_seconds() - cpu_before) / len(rows) * 1e3)
    pillow_rate = statistics.median(pillow_rates)

    with tempfile.TemporaryDirectory() as folder:
        list_file = Path(folder) / "out.csv"
        started = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "malaria_classifier.cli",
                "predict",
                *map(str, files),
                "--output",
                str(list_file),
            ],
            check=True,
            capture_output=True,
        )
        cli_seconds = time.perf_counter() - started
        with open(list_file) as handle:
            cli_rows = sum(1 for _ in csv.DictReader(handle))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )
    print(f"images: {len(files)} PNG cells from {args.data}")
    print(
        f"Pillow decode only (1 thread): median {pillow_rate:,.0f} img/s, rounds {[round(r) for r in pillow_rates]}; "
        f"CPU {statistics.median(pillow_cpu):.3f} ms an image"
    )
    for name in predictors:
        rate = statistics.median(api_rates[name])
        cpu = (
            f"; CPU {statistics.median(api_cpu[name]):.3f} ms an image (all processes)"
            if api_cpu[name]
            else ""
        )
        print(
            f"[{name}] start-up (load model, convert, first batch) {startups[name]:.2f} s; "
            f"forward pass alone {forward_rates[name]:,.0f} img/s; "
            f"predict_paths median {rate:,.0f} img/s, rounds {[round(r) for r in api_rates[name]]}; "
            f"ratio predict / Pillow decode {rate / pillow_rate:.2f}{cpu}"
        )
    print(
        f"`malaria predict` CLI end to end incl. start-up: {cli_seconds:.2f} s for {cli_rows} images "
        f"= {cli_rows / cli_seconds:,.0f} img/s"
    )
    if args.profile:
        print(profile_predict(next(iter(predictors.values())), files[: args.profile]))


if __name__ == "__main__":
    main()
