"""The NIH cell PNGs a benchmark reads, found the way `malaria data check` finds them.

Each script used to glob ``DATA/*/*.png`` itself: a parent folder such as
``cell_images/..``, or a wrong path, then gave no files and a ZeroDivisionError.
"""

from __future__ import annotations

from pathlib import Path

from malaria_classifier.data import DataLayoutError, find_class_root


def cell_files(data_dir: Path) -> list[Path]:
    """Every ``Parasitized/*.png`` then every ``Uninfected/*.png``, sorted.

    Raises:
        SystemExit: With a message naming the folder, when it holds no such cells.
    """
    try:
        root = find_class_root(data_dir)
    except DataLayoutError as error:
        raise SystemExit(f"--data {data_dir}: {error}") from None
    files = sorted((root / "Parasitized").glob("*.png")) + sorted(
        (root / "Uninfected").glob("*.png")
    )
    if not files:
        raise SystemExit(
            f"--data {data_dir}: no PNG cells in {root}/Parasitized or {root}/Uninfected. "
            f"Pass the NIH cell_images folder (../shared/data/nih-cell-images)."
        )
    return files


def spread(files: list[Path], count: int) -> list[Path]:
    """``count`` files taken at even steps, so both classes and many patients appear."""
    if count < 1:
        raise SystemExit(f"--images must be at least 1, got {count}.")
    return files[:: max(1, len(files) // count)][:count]
