"""The "Not a cell" check: image statistics, limits, storage, and the bundled model on data."""

import json

import numpy as np
import pytest
from _noncells import make_non_cells
from _synthetic import draw_cell
from PIL import Image, ImageDraw

from malaria_classifier.images import resize_with_pad
from malaria_classifier.ood import (
    SIGNAL_NAMES,
    STATISTIC_NAMES,
    OodCheck,
    fit_feature_density,
    fit_ood_check,
    image_statistics,
    load_ood_check,
    save_ood_check,
)


def _stat(statistics, name):
    return statistics[:, STATISTIC_NAMES.index(name)]


def _cells(count, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([np.asarray(draw_cell(64, i % 2 == 0, rng)) for i in range(count)])


def test_statistics_of_a_drawn_cell_a_blank_and_a_mosaic():
    cell = _cells(1)
    blank = np.zeros((1, 64, 64, 3), np.uint8)
    tile = Image.new("RGB", (32, 32))
    ImageDraw.Draw(tile).ellipse([0, 0, 31, 31], fill=(220, 150, 170))  # a crop: disc fills box
    mosaic = np.tile(np.asarray(tile), (2, 2, 1))[None]
    statistics = image_statistics(np.concatenate([cell, blank, mosaic]))
    assert statistics.shape == (3, len(STATISTIC_NAMES))
    # a disc in its box: the corners (about 1 - pi/4 of the box) are black, none enclosed
    assert 0.1 < _stat(statistics, "content_dark_fraction")[0] < 0.35
    assert _stat(statistics, "enclosed_dark_fraction")[0] == 0.0
    assert _stat(statistics, "largest_blob_fraction")[0] == 1.0
    assert _stat(statistics, "dark_fraction")[1] == 1.0
    # four touching discs: black enclosed between them
    assert _stat(statistics, "enclosed_dark_fraction")[2] > 0.0


def test_fitted_limits_accept_cells_and_reject_what_lies_outside():
    cells = _cells(200)
    signals = np.c_[image_statistics(cells), np.full((200, 2), np.nan)]
    check = fit_ood_check(signals[:150], signals[150:], density=None, max_false_rejection=0.05)
    rejected = [bool(reason) for reason in check.reasons(signals[150:])]
    assert np.mean(rejected) <= 0.05
    noise = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    noise_signals = np.c_[image_statistics(noise), np.full((5, 2), np.nan)]
    assert all(check.reasons(noise_signals))


def test_feature_distance_is_small_near_the_training_features():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 8))
    labels = (np.arange(500) % 2).astype(int)
    features[labels == 1] += 3.0
    density = fit_feature_density(features, labels)
    near = density.distances(features[:10])
    far = density.distances(features[:10] + 20.0)
    assert near.max() < far.min()


def test_ood_check_round_trips_through_json(tmp_path):
    rng = np.random.default_rng(0)
    density = fit_feature_density(rng.normal(size=(50, 4)), np.arange(50) % 2)
    check = OodCheck({"dark_fraction": 0.1}, {"energy": -1.0}, density, {"note": "x"})
    save_ood_check(check, tmp_path / "ood.json")
    loaded = load_ood_check(tmp_path / "ood.json")
    assert loaded.lower == check.lower and loaded.upper == check.upper
    assert np.allclose(loaded.density.precision, density.precision)
    assert json.loads((tmp_path / "ood.json").read_text())["signals"] == list(SIGNAL_NAMES)


def test_a_corrupt_ood_file_is_a_clear_error(tmp_path):
    (tmp_path / "ood.json").write_text("{not json")
    with pytest.raises(ValueError, match="re-run `malaria calibrate`"):
        load_ood_check(tmp_path / "ood.json")
    assert load_ood_check(tmp_path / "absent.json") is None


def test_bundled_model_keeps_held_out_cells_and_rejects_non_cells(shared_data_dir):
    """300 cells of the default model's test patients; 5 non-cells of every kind."""
    from malaria_classifier.data import patient_id_from_name
    from malaria_classifier.images import load_rgb_image
    from malaria_classifier.prediction import Predictor

    predictor = Predictor()
    test_patients = set(predictor.card["split"]["patients"]["test"])
    files = [
        path
        for label in ("Parasitized", "Uninfected")
        for path in sorted((shared_data_dir / label).iterdir())
        if patient_id_from_name(path.name) in test_patients
    ][::10][:300]
    rows = list(predictor.predict_paths(files))
    assert sum(row.decision == "Not a cell" for row in rows) <= 3  # <= 1 %
    cells = [load_rgb_image(path) for path in files[:40]]
    non_cells = make_non_cells(5, seed=2, cells=cells)
    decisions = [
        row.decision
        for row in predictor.predict_images([resize_with_pad(image, 64) for _, image in non_cells])
    ]
    assert np.mean([decision == "Not a cell" for decision in decisions]) >= 0.95
