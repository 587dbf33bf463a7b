"""What cutting cells out of a smear background costs, against decoding the same files.

Every image passes through :func:`malaria_classifier.background.isolate_cell` before its
resize. On an NIH crop it only looks at the corners; on a crop that keeps the smear it
does the full cut-out. Both are timed here beside the decode of the same files (the
baseline, measured in the same run), one core, median of ``--rounds``.

    python bench/background_cost.py --data ../shared/data/nih-cell-images --images 1000
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from _cells import cell_files, spread

from malaria_classifier.background import isolate_cell
from malaria_classifier.images import load_rgb_image
from malaria_classifier.stress import add_context


def per_image_seconds(function, items, rounds: int) -> float:
    """Median over rounds of the mean time per item."""
    timings = []
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            function(item)
        timings.append((time.perf_counter() - start) / len(items))
    return statistics.median(timings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    paths = spread(cell_files(args.data), args.images)
    cells = [load_rgb_image(path) for path in paths]
    rng = np.random.default_rng(0)
    smear_crops = [add_context(cell, rng) for cell in cells]

    decode = per_image_seconds(load_rgb_image, paths, args.rounds)
    nih = per_image_seconds(isolate_cell, cells, args.rounds)
    smear = per_image_seconds(isolate_cell, smear_crops, args.rounds)
    untouched = sum(isolate_cell(cell) is cell for cell in cells)
    isolated = sum(isolate_cell(crop) is not crop for crop in smear_crops)
    print(f"{len(paths)} files, one core, median of {args.rounds} rounds")
    print("| step | µs per image | ratio to decoding |")
    print("|---|---|---|")
    print(f"| decode PNG (baseline) | {1e6 * decode:.0f} | 1.00 |")
    print(
        f"| isolate_cell, NIH crop (left as it is: {untouched}/{len(cells)}) "
        f"| {1e6 * nih:.0f} | {nih / decode:.3f} |"
    )
    print(
        f"| isolate_cell, crop with smear context (cut out: {isolated}/{len(cells)}) "
        f"| {1e6 * smear:.0f} | {smear / decode:.2f} |"
    )


if __name__ == "__main__":
    main()
