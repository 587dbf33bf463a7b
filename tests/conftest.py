"""Shared fixtures: tiny synthetic PNGs, an NIH-layout data folder, the shared data subset.

``synthetic_dataset`` builds ``tmp_path/cell_images/{Parasitized,Uninfected}`` with NIH-style
names and returns the ``cell_images`` folder. Its layout (every image's content is unique, so
no two files share a SHA-256):

- 6 infected patients ``P1``..``P6`` (slides ``C33``..``C38``), each with
  4 cells in ``Parasitized/`` and 3 cells in ``Uninfected/``;
- 4 healthy donors ``C1``, ``C2`` (``C<n>_thinF_IMG_...``), ``C205`` (``C205NThinF_IMG_...``)
  and ``C3`` (``C3thin_original_IMG_...``), each with 4 cells in ``Uninfected/`` only.

So 24 parasitized and 34 uninfected images, 10 patients, 6 of them with parasitized cells.
Widths and heights each run over 20 to 40 px (both ends occur).

``synthetic_cells`` (drawn cells of 12 patients) and ``finished_run`` (a tiny run trained on
them once per session) serve the tests of training, checkpoints, run folder and run report.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from _synthetic import draw_cell, write_synthetic_dataset
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

INFECTED_PATIENTS = {f"P{n}": f"C{32 + n}P{n}thinF_IMG_20150619_1147{50 + n}a" for n in range(1, 7)}
HEALTHY_DONORS = {
    "C1": "C1_thinF_IMG_20150604_104722",
    "C2": "C2_thinF_IMG_20150604_105130",
    "C205": "C205NThinF_IMG_20151106_150155",
    "C3": "C3thin_original_IMG_20150608_162922",
}
PARASITIZED_PER_INFECTED = 4
UNINFECTED_PER_INFECTED = 3
CELLS_PER_HEALTHY = 4
N_PARASITIZED = len(INFECTED_PATIENTS) * PARASITIZED_PER_INFECTED
N_UNINFECTED = (
    len(INFECTED_PATIENTS) * UNINFECTED_PER_INFECTED + len(HEALTHY_DONORS) * CELLS_PER_HEALTHY
)

MakePng = Callable[..., Path]


def write_png(
    path: str | Path,
    size: tuple[int, int] = (24, 24),
    color: tuple[int, ...] | int = (200, 30, 60),
    mode: str = "RGB",
) -> Path:
    """Write a one-colour image of ``size`` = (width, height) in Pillow ``mode``; return its path.

    The format follows the suffix (``.png`` unless told otherwise); parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_cells(folder: Path, count: int) -> list[str]:
    """``count`` one-colour PNGs ``cell_0000.png``.. in ``folder``, sizes and colours varied.

    Returns their paths as strings, in order.
    """
    paths = []
    for index in range(count):
        size = (12 + index % 9, 10 + index % 13)
        color = (index % 256, (7 * index) % 256, (13 * index) % 256)
        paths.append(str(write_png(folder / f"cell_{index:04d}.png", size=size, color=color)))
    return paths


def interrupt_file_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``Path.write_bytes`` write a few bytes, then stop as Ctrl+C would."""
    real_write_bytes = Path.write_bytes

    def interrupted(self: Path, data: bytes) -> int:
        real_write_bytes(self, data[:10])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", interrupted)


def kill_workers() -> None:
    """SIGKILL every live child process of this one (decode and scoring workers)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)


@pytest.fixture
def make_png() -> MakePng:
    """The :func:`write_png` helper.

    Call it as ``make_png(path, size=(w, h), color=(r, g, b), mode="RGB")``.
    """
    return write_png


def _unique_image(index: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """Size and colour of the ``index``-th synthetic cell; the colour alone is unique per index."""
    size = (20 + (index * 5) % 21, 20 + (index * 11) % 21)
    color = (10 + 3 * index, 250 - 2 * index, (index * 37) % 256)
    return size, color


@pytest.fixture
def synthetic_dataset(tmp_path: Path) -> Path:
    """An NIH-layout folder (see the module docstring); returns ``tmp_path/cell_images``."""
    root = tmp_path / "cell_images"
    index = 0

    def add(label: str, field_name: str, cells: int) -> None:
        nonlocal index
        for cell in range(1, cells + 1):
            size, color = _unique_image(index)
            write_png(root / label / f"{field_name}_cell_{cell}.png", size=size, color=color)
            index += 1

    for field_name in INFECTED_PATIENTS.values():
        add("Parasitized", field_name, PARASITIZED_PER_INFECTED)
        add("Uninfected", field_name, UNINFECTED_PER_INFECTED)
    for field_name in HEALTHY_DONORS.values():
        add("Uninfected", field_name, CELLS_PER_HEALTHY)
    return root


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """``tmp_path/batch``: five drawn cells ``cell_0..4.png``, a grey ``nested/gray.png``,
    a broken and an empty ``.png``, and a ``notes.txt`` that is not an image."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "batch"
    (folder / "nested").mkdir(parents=True)
    for index in range(5):
        draw_cell(30 + index, index % 2 == 0, rng).save(folder / f"cell_{index}.png")
    draw_cell(50, True, rng).convert("L").save(folder / "nested" / "gray.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The NIH subset in ``../shared/data/nih-cell-images``; skips the test when it is absent."""
    path = (REPO_ROOT / ".." / "shared" / "data" / "nih-cell-images").resolve()
    if not (path / "Parasitized").is_dir() or not (path / "Uninfected").is_dir():
        pytest.skip(f"shared NIH data subset not found at {path} (needs Parasitized/, Uninfected/)")
    return path


@pytest.fixture(scope="session")
def synthetic_cells(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Drawn cells of 12 patients in the NIH layout, plus one truncated PNG to skip."""
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cells", patients=12)
    (root / "Parasitized" / "C20P10thinF_IMG_truncated_cell_99.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 10
    )
    return root


@pytest.fixture(scope="session")
def finished_run(synthetic_cells: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished two-epoch run of ``_training_run.TINY`` on ``synthetic_cells``.

    Shared by every test file that asks for it; tests that change a run copy it first.
    """
    from _training_run import TINY

    from malaria_classifier.training import train_model

    run_dir = tmp_path_factory.mktemp("runs") / "run"
    return train_model(synthetic_cells, TINY, run_dir, verbose=0)
