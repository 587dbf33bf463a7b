"""Synthetic cell images and tiny models shared by the tests (no real data needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from malaria_classifier.images import resize_with_pad

# Drawn cells are pinks up to (240, 170, 190): on the stress smear colour (205, 185, 190)
# some would vanish, so the synthetic tests use a lighter smear, as real smears are.
LIGHT_SMEAR = (232, 218, 222)


def draw_cell(size: int, parasitized: bool, rng: np.random.Generator) -> Image.Image:
    """A pink disc on black; parasitized cells carry a dark purple dot, like a ring form."""
    image = Image.new("RGB", (size, size), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    margin = int(rng.integers(1, max(2, size // 8)))
    pink = tuple(int(v) for v in rng.integers([200, 130, 150], [240, 170, 190]))
    draw.ellipse([margin, margin, size - margin, size - margin], fill=pink)
    if parasitized:
        radius = max(2, size // 7)
        x, y = rng.integers(size // 3, 2 * size // 3, size=2)
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=(80, 20, 110))
    return image


def drawn_cells(count: int, seed: int = 0) -> np.ndarray:
    """``count`` drawn 64 px cells ``(count, 64, 64, 3)``, every other one parasitized."""
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(draw_cell(64, i % 2 == 0, rng)) for i in range(count)])


def native_cells(count: int, seed: int = 0) -> list[np.ndarray]:
    """Drawn cells at NIH-like native sizes (80-130 px), black background."""
    rng = np.random.default_rng(seed)
    return [
        np.asarray(draw_cell(int(rng.integers(80, 131)), i % 2 == 0, rng)) for i in range(count)
    ]


def model_inputs(images) -> np.ndarray:
    """The 64 px model inputs, smear left in: the tests are about the check's own handling."""
    return np.stack([resize_with_pad(image, 64, cut_out_smear=False) for image in images])


def write_synthetic_dataset(
    root: Path, patients: int = 8, cells_per_class: int = 6, size: int = 40, seed: int = 0
) -> Path:
    """An NIH-layout folder: infected patients P1.. with both classes, healthy donors C9xx."""
    rng = np.random.default_rng(seed)
    for label in ("Parasitized", "Uninfected"):
        (root / label).mkdir(parents=True, exist_ok=True)
    for patient in range(1, patients + 1):
        infected = patient <= patients * 3 // 4
        for cell in range(cells_per_class):
            if infected:
                name = f"C{patient + 10}P{patient}thinF_IMG_2015_{patient}_cell_{cell}.png"
                draw_cell(size, True, rng).save(root / "Parasitized" / name)
                prefix = f"C{patient + 10}P{patient}thinF_IMG_2015_{patient}"
            else:
                prefix = f"C{900 + patient}NThinF_IMG_2015_{patient}"
            draw_cell(size, False, rng).save(root / "Uninfected" / f"{prefix}_cell_{cell + 50}.png")
    return root


def on_smear(images: np.ndarray, padding_rows: int = 2, seed: int = 1) -> np.ndarray:
    """Model inputs ``(n, h, w, 3)`` with their black background turned into a light smear.

    The top and bottom ``padding_rows`` stay black, as the padding of a wide crop that
    kept its smear and that ``background.isolate_cell`` did not cut out.
    """
    rng = np.random.default_rng(seed)
    smeared = images.copy()
    black = images.max(axis=-1) < 30
    noise = rng.normal(0.0, 4.0, images.shape)
    smear = np.clip(np.rint(np.array([205.0, 185.0, 192.0]) + noise), 0, 255).astype(np.uint8)
    smeared[black] = smear[black]
    smeared[:, :padding_rows] = 0
    smeared[:, -padding_rows:] = 0
    return smeared


def save_tiny_model(path: Path, image_size: int = 32, colour_normalization: str = "fixed") -> Path:
    """An untrained, very small model saved like `malaria train` saves its best model.

    Its weights are seeded, so tests that depend on its (arbitrary) scores are repeatable.
    """
    import keras

    from malaria_classifier.checkpoints import save_model_atomically
    from malaria_classifier.config import TrainingConfig
    from malaria_classifier.model import build_model, compile_model

    config = TrainingConfig(
        image_size=image_size,
        base_filters=4,
        conv_blocks=2,
        dense_units=8,
        colour_normalization=colour_normalization,
    )
    keras.utils.set_random_seed(config.seed)
    model = compile_model(build_model(config), config.learning_rate)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model_atomically(model, path, include_optimizer=False)
    return path
