"""Images that are *not* single stained red-blood-cell crops, made programmatically.

Used to test the "Not a cell" check (tests/test_ood.py, bench/trust_report.py).
Nothing is downloaded. Kinds that need real cells (mosaics, smear fields, blurred
cells) take them as arguments, so the caller decides which cells (never test
patients' cells for anything that is fitted).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

WORDS = (
    "malaria",
    "invoice",
    "hello world",
    "screenshot",
    "Patient ID 4711",
    "ERROR 404",
    "lorem ipsum dolor",
    "Total: $12.50",
)


def _size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(40, 400)), int(rng.integers(40, 400))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def uniform_noise(rng: np.random.Generator) -> np.ndarray:
    """Every pixel random."""
    width, height = _size(rng)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def smooth_noise(rng: np.random.Generator) -> np.ndarray:
    """Blobby colour noise (coarse noise upsampled): looks like an out-of-focus photo."""
    width, height = _size(rng)
    coarse = rng.integers(0, 256, size=(int(rng.integers(2, 9)), int(rng.integers(2, 9)), 3))
    image = Image.fromarray(coarse.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    return np.asarray(image)


def flat_colour(rng: np.random.Generator) -> np.ndarray:
    """One colour everywhere (includes black, white and pink-ish colours)."""
    width, height = _size(rng)
    choice = rng.integers(0, 4)
    colour = [(0, 0, 0), (255, 255, 255), (220, 150, 170), _colour(rng)][int(choice)]
    return np.asarray(Image.new("RGB", (width, height), colour))


def gradient(rng: np.random.Generator) -> np.ndarray:
    """A linear or radial blend between two random colours."""
    width, height = _size(rng)
    start, end = np.array(_colour(rng), float), np.array(_colour(rng), float)
    yy, xx = np.mgrid[0:height, 0:width]
    if rng.random() < 0.5:
        angle = rng.uniform(0, np.pi)
        t = xx * np.cos(angle) + yy * np.sin(angle)
    else:
        t = np.hypot(xx - width / 2, yy - height / 2)
    t = (t - t.min()) / max(1e-9, np.ptp(t))
    return (start + (end - start) * t[..., None]).astype(np.uint8)


def text(rng: np.random.Generator) -> np.ndarray:
    """Rendered words on a plain background, like a document or a screenshot."""
    width, height = _size(rng)
    background = (255, 255, 255) if rng.random() < 0.6 else _colour(rng)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=int(rng.integers(10, 40)))
    for line in range(int(rng.integers(1, 6))):
        word = WORDS[int(rng.integers(0, len(WORDS)))]
        position = (int(rng.integers(0, width // 2 + 1)), int(line * height / 6 + 2))
        draw.text(position, word, fill=(0, 0, 0) if rng.random() < 0.7 else _colour(rng), font=font)
    return np.asarray(image)


def screenshot(rng: np.random.Generator) -> np.ndarray:
    """A window: title bar, side panel, buttons and text lines."""
    width, height = int(rng.integers(200, 400)), int(rng.integers(150, 400))
    image = Image.new("RGB", (width, height), (240, 240, 240))
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, width, 24], fill=_colour(rng))
    draw.rectangle([0, 24, width // 4, height], fill=(225, 228, 232))
    for row in range(30, height - 10, 18):
        draw.rectangle([width // 4 + 10, row, width - int(rng.integers(10, 120)), row + 8], fill=80)
    draw.rounded_rectangle([width - 90, height - 40, width - 10, height - 12], 6, fill=_colour(rng))
    return np.asarray(image)


def scene(rng: np.random.Generator) -> np.ndarray:
    """A natural-looking scene: sky, ground, sun, hills, a house, some texture."""
    width, height = _size(rng)
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    horizon = int(height * rng.uniform(0.4, 0.7))
    sky = (int(rng.integers(90, 170)), int(rng.integers(150, 210)), int(rng.integers(200, 256)))
    ground = (int(rng.integers(40, 120)), int(rng.integers(100, 180)), int(rng.integers(20, 80)))
    draw.rectangle([0, 0, width, horizon], fill=sky)
    draw.rectangle([0, horizon, width, height], fill=ground)
    radius = int(min(width, height) * rng.uniform(0.05, 0.15))
    x, y = int(rng.integers(0, width)), int(rng.integers(0, max(1, horizon // 2)))
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(255, 230, 90))
    for _ in range(int(rng.integers(1, 4))):
        x = int(rng.integers(0, width))
        span = int(rng.integers(20, 120))
        draw.polygon([(x - span, horizon), (x, horizon - span // 2), (x + span, horizon)], fill=80)
    x0, y0 = int(rng.integers(0, width * 3 // 4)), horizon - int(rng.integers(10, 40))
    draw.rectangle([x0, y0, x0 + 30, horizon + 5], fill=(150, 60, 40))
    array = np.asarray(image).astype(np.int16)
    array += rng.integers(-12, 13, size=array.shape, dtype=np.int16)
    return np.clip(array, 0, 255).astype(np.uint8)


def smear_field(rng: np.random.Generator, cells: Sequence[np.ndarray]) -> np.ndarray:
    """A field of view: many cells pasted on the light background of a thin smear."""
    width, height = int(rng.integers(300, 640)), int(rng.integers(240, 480))
    background = np.array([rng.integers(190, 235), rng.integers(170, 215), rng.integers(180, 225)])
    field = np.ones((height, width, 3)) * background
    for _ in range(int(rng.integers(8, 30))):
        cell = cells[int(rng.integers(0, len(cells)))]
        h, w = cell.shape[:2]
        if h >= height or w >= width:
            continue
        y, x = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        mask = cell.max(axis=2, keepdims=True) > 30
        field[y : y + h, x : x + w] = np.where(mask, cell, field[y : y + h, x : x + w])
    return field.astype(np.uint8)


def cell_mosaic(rng: np.random.Generator, cells: Sequence[np.ndarray]) -> np.ndarray:
    """A grid of 2x2 to 4x4 cell crops on black, like a contact sheet of crops."""
    rows, columns = int(rng.integers(2, 5)), int(rng.integers(2, 5))
    tile = 100
    mosaic = np.zeros((rows * tile, columns * tile, 3), np.uint8)
    for row in range(rows):
        for column in range(columns):
            cell = cells[int(rng.integers(0, len(cells)))]
            fitted = np.asarray(Image.fromarray(cell).resize((tile - 4, tile - 4)))
            mosaic[
                row * tile + 2 : (row + 1) * tile - 2, column * tile + 2 : (column + 1) * tile - 2
            ] = fitted
    return mosaic


def blurred_cell(rng: np.random.Generator, cells: Sequence[np.ndarray]) -> np.ndarray:
    """A real cell blurred far beyond focus (Gaussian radius 6-12% of its size... and more)."""
    cell = cells[int(rng.integers(0, len(cells)))]
    radius = max(cell.shape[:2]) * rng.uniform(0.08, 0.2)
    return np.asarray(Image.fromarray(cell).filter(ImageFilter.GaussianBlur(radius)))


STANDALONE_KINDS: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "uniform_noise": uniform_noise,
    "smooth_noise": smooth_noise,
    "flat_colour": flat_colour,
    "gradient": gradient,
    "text": text,
    "screenshot": screenshot,
    "scene": scene,
}
CELL_BASED_KINDS: dict[str, Callable[[np.random.Generator, Sequence[np.ndarray]], np.ndarray]] = {
    "smear_field": smear_field,
    "cell_mosaic": cell_mosaic,
    "blurred_cell": blurred_cell,
}


def make_non_cells(
    per_kind: int, seed: int, cells: Sequence[np.ndarray] | None = None
) -> list[tuple[str, np.ndarray]]:
    """``per_kind`` images of every kind as ``(kind, RGB uint8 array)`` pairs.

    Args:
        per_kind: Images per kind.
        seed: Random seed; the same seed gives the same images.
        cells: Real cell crops (RGB arrays) for the kinds built from cells; those
            kinds are left out when None or empty.
    """
    rng = np.random.default_rng(seed)
    images = []
    for kind, make in STANDALONE_KINDS.items():
        images += [(kind, make(rng)) for _ in range(per_kind)]
    if cells:
        for kind, make in CELL_BASED_KINDS.items():
            images += [(kind, make(rng, cells)) for _ in range(per_kind)]
    return images
