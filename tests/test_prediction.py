"""Predictor rows, bad files in a batch, output formats, and the bundled model on real cells."""

import csv
import io
import json
import os
import re

import numpy as np
import pytest
from _synthetic import save_tiny_model, write_synthetic_dataset
from PIL import Image

from malaria_classifier.images import load_for_model
from malaria_classifier.prediction import (
    OUTPUT_COLUMNS,
    Predictor,
    label_for,
    write_rows,
)


@pytest.fixture(scope="module")
def tiny_predictor(tmp_path_factory):
    path = save_tiny_model(tmp_path_factory.mktemp("model") / "model.keras")
    return Predictor(path, batch_size=4)


def test_label_for_uses_the_threshold_and_positive_class():
    assert label_for(0.5) == "Parasitized"
    assert label_for(0.49) == "Uninfected"
    assert label_for(0.7, threshold=0.8) == "Uninfected"


def test_a_closed_predictor_says_so(tmp_path, mixed_folder):
    with Predictor(save_tiny_model(tmp_path / "model.keras"), runtime="keras") as predictor:
        assert len(list(predictor.predict_paths([mixed_folder / "cell_0.png"]))) == 1
    predictor.close()  # closing twice is harmless
    for use in (
        lambda: predictor.predict_paths([mixed_folder]),  # at the call, before any row
        lambda: predictor.predict_images([np.zeros((8, 8, 3), np.uint8)]),
        lambda: predictor.predict_arrays([np.zeros((8, 8, 3), np.uint8)]),
    ):
        with pytest.raises(ValueError, match="This Predictor is closed"):
            use()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"model_path": ""}, "model_path is empty"), ({"batch_size": 0}, "batch_size must be")],
)
def test_an_empty_model_path_or_batch_size_is_refused(arguments, message):
    with pytest.raises(ValueError, match=message):
        Predictor(**arguments)


def test_one_bad_file_never_stops_the_batch(tiny_predictor, mixed_folder):
    rows = list(tiny_predictor.predict_paths([mixed_folder]))
    by_name = {os.path.basename(row.path): row for row in rows}
    assert len(rows) == 8
    for name in ("broken.png", "empty.png"):
        assert by_name[name].label == ""
        assert name in by_name[name].error
        assert by_name[name].probability is None
    good = [row for row in rows if not row.error]
    assert len(good) == 6
    for row in good:
        assert row.label in ("Parasitized", "Uninfected")
        assert 0.0 <= row.probability <= 1.0
        expected = row.probability if row.label == "Parasitized" else 1 - row.probability
        assert row.confidence == pytest.approx(expected)
        assert row.confidence >= 0.5


def test_rows_keep_input_order_across_batches(tiny_predictor, mixed_folder):
    files = sorted(mixed_folder.glob("cell_*.png")) * 3  # more than one batch of 4
    rows = list(tiny_predictor.predict_paths(files))
    assert [row.path for row in rows] == [str(path) for path in files]
    first = {row.path: row.probability for row in rows[:5]}
    for row in rows[5:]:
        assert row.probability == pytest.approx(first[row.path], abs=1e-6)


def test_predict_arrays_matches_predict_paths(tiny_predictor, mixed_folder):
    path = mixed_folder / "cell_0.png"
    from_path = next(tiny_predictor.predict_paths([path])).probability
    from_array = tiny_predictor.predict_arrays([load_for_model(path, 32)])[0]
    assert from_array == pytest.approx(from_path, abs=1e-6)


def test_write_rows_csv_has_the_documented_columns(tiny_predictor, mixed_folder):
    buffer = io.StringIO()
    counts = write_rows(tiny_predictor.predict_paths([mixed_folder]), buffer, "csv")
    lines = list(csv.reader(io.StringIO(buffer.getvalue())))
    assert tuple(lines[0]) == OUTPUT_COLUMNS
    assert OUTPUT_COLUMNS[:6] == ("path", "label", "probability", "confidence", "error", "decision")
    assert OUTPUT_COLUMNS[6:] == ("reason",)
    assert counts == {"predicted": 6, "failed": 2}
    assert len(lines) == 9
    decisions = {line[0].rsplit("/", 1)[-1]: line[5] for line in lines[1:]}
    assert decisions["broken.png"] == ""
    assert decisions["cell_0.png"] in ("Parasitized", "Uninfected", "Uncertain", "Not a cell")


def test_write_rows_json_is_valid(tiny_predictor, mixed_folder):
    buffer = io.StringIO()
    write_rows(tiny_predictor.predict_paths([mixed_folder]), buffer, "json")
    records = json.loads(buffer.getvalue())
    assert len(records) == 8
    assert set(records[0]) == set(OUTPUT_COLUMNS)


def test_write_rows_rejects_unknown_format():
    with pytest.raises(ValueError, match=r"^Unknown output format 'xml'; use 'csv' or 'json'\.$"):
        write_rows([], io.StringIO(), "xml")


def test_predictor_rejects_missing_model(tmp_path):
    missing = tmp_path / "nope.keras"
    with pytest.raises(
        ValueError,
        match=f"^Model file {re.escape(str(missing))} does not exist\\. Pass a \\.keras file",
    ):
        Predictor(missing)


def test_predictor_arguments_are_checked_before_the_model_is_loaded(tmp_path, monkeypatch):
    import malaria_classifier.prediction as prediction

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(prediction.Predictor, "_load", never)
    with pytest.raises(ValueError, match=r"nope.keras does not exist\. .*model_path in Python"):
        Predictor(tmp_path / "nope.keras")
    with pytest.raises(ValueError, match=f"^Model {re.escape(str(tmp_path))} is a folder; pass"):
        Predictor(tmp_path)
    with pytest.raises(ValueError, match=r"threshold must be between 0 and 1 .* got '0.5'"):
        Predictor(threshold="0.5")
    with pytest.raises(ValueError, match=r"threshold must be .* got 1.5"):
        Predictor(threshold=1.5)
    with pytest.raises(ValueError, match="test_time_views must be True or False, got 'no'"):
        Predictor(test_time_views="no")
    with pytest.raises(ValueError, match="check_ood must be True or False, got None"):
        Predictor(check_ood=None)


def test_predictor_rejects_a_file_that_is_not_a_model(tmp_path):
    fake = tmp_path / "model.keras"
    fake.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a Keras model: a .keras file is a zip archive"):
        Predictor(fake)


def test_inputs_are_never_modified(tiny_predictor, mixed_folder):
    before = {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in mixed_folder.rglob("*") if p.is_file()
    }
    list(tiny_predictor.predict_paths([mixed_folder]))
    after = {
        p: (p.read_bytes(), p.stat().st_mtime_ns) for p in mixed_folder.rglob("*") if p.is_file()
    }
    assert before == after


def test_default_model_is_bundled_and_described():
    predictor = Predictor()
    card = predictor.card
    assert card["class_order"] == ["Uninfected", "Parasitized"]
    assert card["positive_class"] == "Parasitized"
    assert card["input"]["shape"] == [predictor.image_size, predictor.image_size, 3]
    assert predictor.model_path.stat().st_size < 3 * 2**20
    assert card["weights"]["bytes"] < 1_000_000  # "well under 1 MB of weights"
    test_metrics = card["metrics"]["test"]["metrics"]
    assert test_metrics["accuracy"]["ci95"][0] <= test_metrics["accuracy"]["value"]


def test_default_model_separates_real_cells_of_its_test_patients(shared_data_dir):
    """The shipped model on 100 cells of each class from its own held-out test patients."""
    predictor = Predictor()
    test_patients = set(predictor.card["split"]["patients"]["test"])
    from malaria_classifier.data import patient_id_from_name

    correct = 0
    for label in ("Parasitized", "Uninfected"):
        files = sorted(
            path
            for path in (shared_data_dir / label).iterdir()
            if patient_id_from_name(path.name) in test_patients
        )[:100]
        assert len(files) == 100
        rows = list(predictor.predict_paths(files))
        correct += sum(row.label == label for row in rows)
    assert correct / 200 >= 0.9


def test_synthetic_folder_layout_is_usable(tmp_path, tiny_predictor):
    root = write_synthetic_dataset(tmp_path / "cells", patients=4, cells_per_class=2)
    rows = list(tiny_predictor.predict_paths([root]))
    assert len(rows) == 4 * 2 + 3 * 2 and not any(row.error for row in rows)


def test_threshold_comes_from_the_model_card_unless_given(tmp_path):
    import json

    path = save_tiny_model(tmp_path / "model.keras")
    assert Predictor(path).threshold == 0.5
    (tmp_path / "model_card.json").write_text(json.dumps({"decision_threshold": 0.3}))
    assert Predictor(path).threshold == 0.3
    assert Predictor(path, threshold=0.7).threshold == 0.7
    with pytest.raises(ValueError, match="threshold must be between 0 and 1"):
        Predictor(path, threshold=1.5)


def test_model_without_calibration_decides_by_its_threshold(tiny_predictor, mixed_folder):
    rows = [row for row in tiny_predictor.predict_paths([mixed_folder]) if not row.error]
    assert len(rows) == 6  # not vacuous: every readable cell of the folder
    for row in rows:
        above = row.probability >= tiny_predictor.threshold
        assert row.decision == row.label == ("Parasitized" if above else "Uninfected")
        assert row.uncalibrated_probability == pytest.approx(row.probability)


def test_predict_images_gives_the_same_rows_as_files(tiny_predictor, mixed_folder):
    path = mixed_folder / "cell_1.png"
    from_file = next(tiny_predictor.predict_paths([path]))
    from_array = tiny_predictor.predict_images([load_for_model(path, 32)], names=["upload"])[0]
    assert from_array.path == "upload"
    assert from_array.probability == pytest.approx(from_file.probability, abs=1e-6)
    assert from_array.decision == from_file.decision
    with pytest.raises(ValueError, match="one each"):
        tiny_predictor.predict_images([load_for_model(path, 32)], names=[])
    from_generator = tiny_predictor.predict_images(
        (load_for_model(path, 32) for _ in range(2)), names=iter(["a", "b"])
    )
    assert [row.path for row in from_generator] == ["a", "b"]
    assert from_generator[1].probability == pytest.approx(from_file.probability, abs=1e-6)


def test_an_array_of_the_input_size_on_a_smear_is_cut_out_as_its_file_is(
    tiny_predictor, shared_data_dir, tmp_path
):
    from malaria_classifier.background import isolate_cell

    rng = np.random.default_rng(0)
    files, arrays = [], []
    for index, path in enumerate(sorted((shared_data_dir / "Uninfected").glob("*.png"))[:4]):
        cell = load_for_model(path, tiny_predictor.image_size)  # 32x32, the cell on black
        smear = np.array([200.0, 170.0, 180.0]) + rng.normal(0.0, 4.0, cell.shape)
        on_smear = np.where(cell.max(axis=-1, keepdims=True) < 30, smear, cell)
        arrays.append(np.clip(np.rint(on_smear), 0, 255).astype(np.uint8))
        files.append(tmp_path / f"smear_{index}.png")
        Image.fromarray(arrays[-1]).save(files[-1])
    assert any(isolate_cell(array) is not array for array in arrays)  # there is a smear to cut
    from_files = list(tiny_predictor.predict_paths(files))
    from_arrays = tiny_predictor.predict_images(arrays)
    for from_file, from_array in zip(from_files, from_arrays, strict=True):
        assert from_array.probability == pytest.approx(from_file.probability, abs=1e-6)
        assert from_array.decision == from_file.decision
    np.testing.assert_allclose(
        tiny_predictor.predict_arrays(iter(arrays)),
        [row.probability for row in from_files],
        atol=1e-6,
    )


def test_temperature_in_the_card_changes_probability_not_order(tmp_path, mixed_folder):
    path = save_tiny_model(tmp_path / "model.keras")
    files = sorted(mixed_folder.glob("cell_*.png"))
    plain = list(Predictor(path).predict_paths(files))
    card = {"decision_threshold": 0.5, "calibration": {"temperature": 4.0}}
    (tmp_path / "model_card.json").write_text(json.dumps(card))
    scaled = list(Predictor(path).predict_paths(files))
    for before, after in zip(plain, scaled, strict=True):
        assert after.uncalibrated_probability == pytest.approx(before.probability, abs=1e-6)
        # a temperature of 4 pulls every probability towards 0.5, keeping its side
        assert abs(after.probability - 0.5) <= abs(before.probability - 0.5) + 1e-9
        assert (after.probability >= 0.5) == (before.probability >= 0.5)


def test_test_time_views_make_asymmetric_near_threshold_cells_uncertain(tmp_path):
    path = save_tiny_model(tmp_path / "model.keras")
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8) for _ in range(16)]
    plain = Predictor(path).predict_images(images)
    probabilities = np.array([row.probability for row in plain])
    # put the threshold in the middle of the scores so some views must straddle it
    threshold = float(np.median(probabilities))
    viewed = Predictor(path, threshold=threshold, test_time_views=True).predict_images(images)
    unstable = [row for row in viewed if row.reason == "flipped or rotated copies disagree"]
    assert unstable and all(row.decision == "Uncertain" for row in unstable)
    stable = Predictor(path, threshold=threshold).predict_images(images)
    assert all(row.decision != "Uncertain" for row in stable)


def test_bundled_model_is_calibrated_and_has_a_verdict_rule():
    predictor = Predictor()
    calibration = predictor.card["calibration"]
    assert calibration["temperature"] > 0
    assert predictor.threshold == pytest.approx(predictor.card["decision_threshold"])
    assert predictor.rule.ood is not None and predictor.rule.ood.density is not None
    assert predictor.verdict_rule is not None
    report = predictor.card["calibration_report"]["test"]
    assert report["reliability_calibrated"]["expected_calibration_error"] <= 0.02


def test_bundled_model_says_not_a_cell_for_blank_and_text_images():
    from PIL import Image, ImageDraw

    text = Image.new("RGB", (200, 80), "white")
    ImageDraw.Draw(text).text((10, 30), "hello world", fill="black")
    images = [
        np.zeros((64, 64, 3), np.uint8),
        np.full((100, 100, 3), 255, np.uint8),
        np.asarray(text),
    ]
    rows = Predictor().predict_images(images)
    assert [row.decision for row in rows] == ["Not a cell"] * 3
    assert all(row.reason.startswith("unlike the training cells") for row in rows)
    for row in rows:  # plain words first, signal names only in the brackets, then what to do
        words, names = row.reason.removeprefix("unlike the training cells in ").split(" (", 1)
        assert words and "_" not in words
        assert names.split(")")[0].replace("_", "").replace(", ", "").isalpha()
        assert row.reason.endswith("Send one stained red blood cell per image, cropped close")


def test_a_grayscale_cell_is_told_to_send_the_colour_picture(shared_data_dir):
    from PIL import Image

    path = sorted((shared_data_dir / "Parasitized").glob("*.png"))[5]
    gray = np.asarray(Image.open(path).convert("L").convert("RGB"))
    [colour_row, gray_row] = Predictor().predict_images([np.asarray(Image.open(path)), gray])
    assert colour_row.decision != "Not a cell"
    assert gray_row.decision == "Not a cell"
    assert "(foreground_saturation" in gray_row.reason
    assert gray_row.reason.endswith(
        "a grayscale or unstained picture has no stain colour for the model to read"
    )


def test_one_path_given_alone_is_one_input_not_its_characters(tiny_predictor, mixed_folder):
    path = mixed_folder / "cell_0.png"
    for single in (str(path), path):
        rows = list(tiny_predictor.predict_paths(single))
        assert [row.path for row in rows] == [str(path)]


def test_arrays_that_are_not_uint8_rgb_are_refused_by_name(tiny_predictor, mixed_folder):
    image = load_for_model(mixed_folder / "cell_0.png", 32)
    with pytest.raises(ValueError, match=r"Image 1 is float32; expected uint8"):
        tiny_predictor.predict_arrays([image, image.astype(np.float32) / 255])
    with pytest.raises(ValueError, match=r"Image 0 has shape \(32, 32\); expected"):
        tiny_predictor.predict_arrays([image[..., 0]])
    with pytest.raises(ValueError, match="pass a list of images"):
        tiny_predictor.predict_arrays(image)
    with pytest.raises(ValueError, match="Got no images"):
        tiny_predictor.predict_arrays([])
