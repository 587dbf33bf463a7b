"""Score the cells of a training run's splits once, for calibration.

:func:`score_run_splits` checks the run (:mod:`calibration_inputs`), loads the model and
scores the cells of each split of its manifest (a sample of the training cells), and,
for the "Not a cell" check's other-labs limits, one other-laboratory variant of each
training and validation cell (:func:`stress.draw_lab_variant`). Each cell's raw
P(Parasitized), penultimate features and image statistics are kept in a
:class:`SplitScores`; :mod:`calibrate` fits the trust layer on them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.calibration_inputs import (
    check_cells_present,
    check_model_matches_run,
    check_splits,
)
from malaria_classifier.constants import POSITIVE_CLASS, POSITIVE_INDEX
from malaria_classifier.data import find_class_root
from malaria_classifier.decoding import iter_images
from malaria_classifier.images import ImageLoadError, load_rgb_image, resize_with_pad
from malaria_classifier.ood import feature_model
from malaria_classifier.ood_statistics import image_statistics
from malaria_classifier.splits import read_manifest
from malaria_classifier.stress import draw_lab_variant


@dataclass
class SplitScores:
    """Everything measured once per cell of one split."""

    labels: np.ndarray  # 1 = Parasitized
    patients: np.ndarray
    probabilities: np.ndarray  # uncalibrated P(Parasitized)
    features: np.ndarray
    statistics: np.ndarray
    variants: np.ndarray | None = None  # per cell, the other-lab changes made (None: as imaged)


def score_cells(
    model: Any,
    paths: Sequence[Path],
    labels: Sequence[str],
    patients: Sequence[str],
    variant_seed: int | None = None,
    forward: Any = None,
) -> SplitScores:
    """Raw scores, penultimate features and image statistics of the readable cells.

    Args:
        model: The Keras model.
        paths: Cell image files.
        labels: The class name of each cell.
        patients: The patient of each cell.
        variant_seed: When given, each cell is first changed into one random
            other-laboratory variant (:func:`stress.draw_lab_variant`, drawn from a
            generator seeded by ``(variant_seed, position)``, so runs repeat).
        forward: The compiled feature function (:func:`feature_forward`); pass one
            built once when scoring several splits, or TensorFlow traces it again for
            every call (and warns about retracing).

    Raises:
        ValueError: If none of the files can be read.
    """
    size = int(model.input_shape[1])
    forward = forward or feature_forward(model)
    kept, images, variants = [], [], []
    outputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for index, (image, variant) in enumerate(_model_inputs(list(paths), size, variant_seed)):
        if image is None:
            continue
        kept.append(index)
        images.append(image)
        variants.append(variant)
        if len(images) == 256:
            outputs.append(_score_batch(forward, np.stack(images)))
            images = []
    if images:
        outputs.append(_score_batch(forward, np.stack(images)))
    if not kept:
        raise ValueError("None of the cells in the manifest could be read; check --data.")
    probabilities, features, statistics = (
        np.concatenate(parts) for parts in zip(*outputs, strict=True)
    )
    return SplitScores(
        labels=np.array([labels[i] == POSITIVE_CLASS for i in kept], dtype=int),
        patients=np.array([patients[i] for i in kept]),
        probabilities=probabilities,
        features=features,
        statistics=statistics,
        variants=None if variant_seed is None else np.array(variants),
    )


def feature_forward(model: Any) -> Any:
    """The model's probabilities and penultimate features as one compiled function."""
    import tensorflow as tf

    network = feature_model(model)
    size = int(model.input_shape[1])
    # Any batch size, one trace: the last batch of each split is smaller.
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8)]
    return tf.function(lambda batch: network(batch, training=False), input_signature=signature)


def _model_inputs(
    paths: list[Path], size: int, variant_seed: int | None
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield ``(model input or None if unreadable, variant name or None)`` per path."""
    if variant_seed is None:
        return ((image, None) for image, _error in iter_images(paths, size))
    return _iter_lab_variants(paths, size, variant_seed)


def _iter_lab_variants(
    paths: list[Path], size: int, seed: int, chunk: int = 256
) -> Iterator[tuple[np.ndarray | None, str | None]]:
    """Yield ``(model input, variant name)`` per path, ``(None, None)`` if unreadable.

    The variant is applied to the native-resolution crop, before the model's own
    resize-with-pad, as ``bench/stress_test.py`` does.
    """

    def vary(position: int) -> tuple[np.ndarray | None, str | None]:
        try:
            image = load_rgb_image(paths[position])
        except ImageLoadError:
            return None, None
        changed, name = draw_lab_variant(image, np.random.default_rng([seed, position]))
        return resize_with_pad(changed, size), name

    with ThreadPoolExecutor(max_workers=2) as executor:
        for start in range(0, len(paths), chunk):
            yield from executor.map(vary, range(start, min(start + chunk, len(paths))))


def _score_batch(forward: Any, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probabilities, features = forward(batch)
    return (
        probabilities.numpy()[:, POSITIVE_INDEX].astype(np.float64),
        features.numpy().astype(np.float64),
        image_statistics(batch),
    )


def score_run_splits(
    model_path: Path,
    run_dir: Path,
    data_dir: Path,
    train_cells: int = 6000,
    seed: int = 0,
    ood_variants: bool = False,
) -> tuple[Any, dict[str, SplitScores]]:
    """Load the model and score its train (a sample), validation and test cells.

    With ``ood_variants``, the same train and validation cells are scored once more,
    each changed into one random other-laboratory variant, as ``"train_variants"``
    and ``"validation_variants"`` (for fitting the "Not a cell" check; test cells
    are never varied here, so they stay the untouched report set).

    Raises:
        ValueError: If the run folder has no manifest.
    """
    from malaria_classifier.model import load_model

    manifest = Path(run_dir) / "manifest.csv"
    if not manifest.is_file():
        raise ValueError(
            f"{manifest} does not exist. Pass --run: the `malaria train` run folder whose "
            f"manifest.csv says which patients are validation and test."
        )
    rows = read_manifest(manifest)
    root = find_class_root(data_dir)
    check_model_matches_run(model_path, rows, manifest)
    check_splits(rows, manifest)
    check_cells_present(rows, root, manifest)
    model = load_model(str(model_path))
    rng = np.random.default_rng(seed)
    forward = feature_forward(model)
    scores = {}
    for split in ("train", "validation", "test"):
        chosen = [row for row in rows if row.split == split]
        if split == "train" and len(chosen) > train_cells:
            chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), train_cells, False))]
        columns = (
            [root / row.path for row in chosen],
            [row.label for row in chosen],
            [row.patient for row in chosen],
        )
        scores[split] = score_cells(model, *columns, forward=forward)
        if ood_variants and split != "test":
            # Its own seed per split: the i-th training and validation cells must not
            # draw the same changes.
            variant_seed = seed + 1 + ("train", "validation").index(split)
            scores[f"{split}_variants"] = score_cells(
                model, *columns, variant_seed=variant_seed, forward=forward
            )
    return model, scores
