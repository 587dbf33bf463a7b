"""The tf.data pipeline feeds the model the same pixels prediction sees."""

import numpy as np
import pytest
from _synthetic import write_synthetic_dataset

from malaria_classifier.config import TrainingConfig
from malaria_classifier.data import discover_images
from malaria_classifier.images import load_for_model
from malaria_classifier.pipeline import iter_images, make_color_augmenter, make_dataset, one_hot

CONFIG = TrainingConfig(image_size=32, batch_size=5, conv_blocks=2, seed=7)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cells", patients=4)
    return discover_images(root).records


def test_one_hot_follows_the_fixed_class_order():
    assert one_hot(["Uninfected", "Parasitized"]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_evaluation_dataset_is_unaugmented_ordered_and_uint8(records):
    dataset = make_dataset([r.path for r in records], [r.label for r in records], CONFIG, False)
    images, targets = zip(*[(x.numpy(), y.numpy()) for x, y in dataset.unbatch()], strict=True)
    assert images[0].dtype == np.uint8 and images[0].shape == (32, 32, 3)
    for record, image, target in zip(records, images, targets, strict=True):
        np.testing.assert_array_equal(image, load_for_model(record.path, 32))
        assert target.argmax() == (record.label == "Parasitized")


def test_training_dataset_is_augmented_but_keeps_labels(records):
    dataset = make_dataset([r.path for r in records], [r.label for r in records], CONFIG, True)
    batches = list(dataset)
    assert sum(len(x) for x, _ in batches) == len(records)
    assert all(x.dtype == "uint8" for x, _ in batches)
    labels = np.concatenate([y.numpy().argmax(axis=1) for _, y in batches])
    assert sorted(labels.tolist()) == sorted(int(r.label == "Parasitized") for r in records)
    originals = {load_for_model(r.path, 32).tobytes() for r in records}
    augmented = [image.tobytes() for x, _ in batches for image in x.numpy()]
    assert sum(image not in originals for image in augmented) > len(records) // 2


def test_flips_and_turns_alone_only_move_pixels():
    config = CONFIG.replace(
        brightness_delta=0.0, contrast_range=0.0, saturation_range=0.0, hue_delta=0.0
    )
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    augmented, _ = make_color_augmenter(config)(image, np.zeros(2, np.float32))
    augmented = augmented.numpy()
    assert sorted(augmented.reshape(-1, 3).tolist()) == sorted(image.reshape(-1, 3).tolist())


def test_iter_images_reports_bad_files_in_place(records, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"garbage")
    paths = [records[0].path, bad, records[1].path]
    results = list(iter_images(paths, 32, workers=2, lookahead=2))
    assert [error is None for _, error in results] == [True, False, True]
    assert "bad.png" in results[1][1]
