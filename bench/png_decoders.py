"""Benchmark: decoding NIH PNG cells with Pillow vs libspng, and the whole load_for_model.

Usage:
    python bench/png_decoders.py [--data ../shared/data/nih-cell-images] [--images 3000] [--rounds 3]

One thread, files read from memory (OS cache warmed first), rounds alternated and
medians compared, since this shared machine's speed drifts from minute to minute.
Also checks that both paths give identical pixels on every file measured.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import time
from pathlib import Path

import imagecodecs
import numpy as np
from _cells import cell_files, spread
from PIL import Image

from malaria_classifier import images


def pick_files(data_dir: Path, count: int) -> list[Path]:
    return spread(cell_files(data_dir), count)


def pillow_load_for_model(path: Path) -> np.ndarray:
    """``load_for_model`` as it was before the libspng path: Pillow decodes every file."""
    data = path.read_bytes()
    return images._fit_square(images._decode_rgb_image(data, str(path), 10**8), 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    files = pick_files(args.data, args.images)
    encoded = [path.read_bytes() for path in files]

    mismatches = sum(
        not np.array_equal(images.load_for_model(path, 64), pillow_load_for_model(path))
        for path in files
    )
    work = {
        "Pillow decode only (bytes in memory)": lambda: [
            Image.open(io.BytesIO(data)).convert("RGB").load() for data in encoded
        ],
        "libspng decode only (bytes in memory)": lambda: [
            imagecodecs.spng_decode(data) for data in encoded
        ],
        "load_for_model, Pillow path (before)": lambda: [
            pillow_load_for_model(path) for path in files
        ],
        "load_for_model, libspng path (now)": lambda: [
            images.load_for_model(path, 64) for path in files
        ],
    }
    rates: dict[str, list[float]] = {name: [] for name in work}
    for _ in range(args.rounds):
        for name, run in work.items():
            started = time.perf_counter()
            run()
            rates[name].append(len(files) / (time.perf_counter() - started))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, one thread")
    print(f"{len(files)} PNG cells from {args.data}; pixel mismatches between paths: {mismatches}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name}: median {medians[name]:,.0f} img/s, rounds {[round(v) for v in values]}")
    decode_ratio = (
        medians["libspng decode only (bytes in memory)"]
        / medians["Pillow decode only (bytes in memory)"]
    )
    load_ratio = (
        medians["load_for_model, libspng path (now)"]
        / medians["load_for_model, Pillow path (before)"]
    )
    print(f"ratio libspng / Pillow, decode only: {decode_ratio:.2f}")
    print(f"ratio now / before, load_for_model: {load_ratio:.2f}")


if __name__ == "__main__":
    main()
