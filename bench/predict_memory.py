"""Benchmark: memory of `Predictor.predict_paths` + CSV streaming from 5,000 to 100,000 files.

Usage:
    python bench/predict_memory.py [--data ../shared/data/nih-cell-images] [--files 100000]
        [--runtime auto] [--decode processes]

Builds a temporary folder under /tmp holding ``--files`` symbolic links to the shared
cells (cycled; 100 links per subfolder), predicts it exactly as ``malaria predict DIR
--output FILE`` does (folder walked lazily, rows streamed to a CSV file), and samples
the resident memory (RSS, psutil) of the process and of its decode worker processes
every 1,000 rows. The folder is deleted afterwards. Target: RSS at 100,000 within
200 MB of RSS at 5,000 (main process, and main plus workers).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
from _cells import cell_files


def make_link_folder(data_dir: Path, count: int, root: Path) -> Path:
    """``count`` symlinks to the shared PNGs, cycled, in subfolders of 100."""
    sources = cell_files(data_dir)
    folder = root / "cells"
    for index in range(count):
        subfolder = folder / f"{index // 100:05d}"
        if index % 100 == 0:
            subfolder.mkdir(parents=True)
        source = sources[index % len(sources)]
        os.symlink(source.resolve(), subfolder / f"{index:06d}_{source.name}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runtime", default="auto")
    parser.add_argument("--decode", choices=("processes", "threads"), default="processes")
    args = parser.parse_args()
    process = psutil.Process()

    from malaria_classifier.prediction import Predictor, write_rows

    root = Path(tempfile.mkdtemp(prefix="malaria-memory-", dir="/tmp"))
    try:
        started = time.perf_counter()
        folder = make_link_folder(args.data, args.files, root)
        print(f"made {args.files:,} links in {time.perf_counter() - started:.1f} s")
        predictor = Predictor(runtime=args.runtime, decode_processes=args.decode == "processes")
        samples: dict[int, float] = {0: process.memory_info().rss / 2**20}
        with_workers: dict[int, float] = {}

        def sampled(rows) -> Iterator:
            for index, row in enumerate(rows, start=1):
                if index % 1000 == 0:
                    samples[index] = process.memory_info().rss / 2**20
                    workers = sum(child.memory_info().rss for child in process.children())
                    with_workers[index] = samples[index] + workers / 2**20
                yield row

        started = time.perf_counter()
        with open(root / "predictions.csv", "w", newline="", encoding="utf-8") as handle:
            counts = write_rows(sampled(predictor.predict_paths([folder])), handle, "csv")
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, runtime "
        f"{predictor.runtime}, decode in {args.decode}"
    )
    print(f"rows: {counts}; {seconds:.1f} s = {sum(counts.values()) / seconds:,.0f} img/s")
    at_5k, at_end = samples[5000], samples[max(samples)]
    print(f"RSS before predicting: {samples[0]:,.0f} MiB")
    print(f"RSS after  5,000 rows: {at_5k:,.0f} MiB")
    print(f"RSS after {max(samples):,} rows: {at_end:,.0f} MiB (peak {max(samples.values()):,.0f})")
    print(f"growth 5,000 -> {max(samples):,}: {at_end - at_5k:+,.0f} MiB (target: within 200 MB)")
    marks = [n for n in (10_000, 25_000, 50_000, 75_000) if n in samples]
    print("RSS at " + ", ".join(f"{n:,}: {samples[n]:,.0f} MiB" for n in marks))
    last = max(with_workers)
    print(
        f"main + decode workers: {with_workers[5000]:,.0f} MiB at 5,000 rows, "
        f"{with_workers[last]:,.0f} MiB at {last:,} (growth {with_workers[last] - with_workers[5000]:+,.0f} MiB)"
    )


if __name__ == "__main__":
    main()
