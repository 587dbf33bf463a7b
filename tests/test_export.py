"""Exports (SavedModel, TFLite, ONNX) agree with the Keras model on real cells."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from _synthetic import on_smear, save_tiny_model
from conftest import interrupt_file_writes

from malaria_classifier.constants import POSITIVE_INDEX
from malaria_classifier.export import (
    EXPORT_FORMATS,
    ONNX_OUTPUT_NAME,
    default_export_path,
    export_model,
)
from malaria_classifier.images import load_for_model
from malaria_classifier.model import load_model
from malaria_classifier.model_card import default_model_path, read_model_card
from malaria_classifier.prediction import Predictor, label_for
from malaria_classifier.runtimes import onnx_forward, tflite_forward

CELLS_PER_CLASS = 32  # 64 real cells in all
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def keras_predictor():
    return Predictor(runtime="keras")


@pytest.fixture(scope="module")
def real_cells(shared_data_dir, keras_predictor):
    """64 real cells, half of each class, spread over the folder (many patients)."""
    files = []
    for label in ("Parasitized", "Uninfected"):
        candidates = sorted((shared_data_dir / label).glob("*.png"))
        files += candidates[:: len(candidates) // CELLS_PER_CLASS][:CELLS_PER_CLASS]
    return np.stack([load_for_model(path, keras_predictor.image_size) for path in files])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    folder = tmp_path_factory.mktemp("exports")
    return {
        export_format: export_model(default_model_path(), export_format, folder / name)
        for export_format, name in (
            ("saved_model", "model_saved_model"),
            ("tflite", "model.tflite"),
            ("onnx", "model.onnx"),
        )
    }


def _assert_agrees(expected: np.ndarray, actual: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)
    expected_labels = [label_for(p) for p in expected[:, POSITIVE_INDEX]]
    assert [label_for(p) for p in actual[:, POSITIVE_INDEX]] == expected_labels


def _keras_probabilities(predictor: Predictor, cells: np.ndarray) -> np.ndarray:
    return np.asarray(predictor.model(cells, training=False))


def test_real_cells_cover_both_classes(keras_predictor, real_cells):
    """Guards the parity tests below: they must compare confident calls of both labels."""
    probabilities = _keras_probabilities(keras_predictor, real_cells)[:, POSITIVE_INDEX]
    assert len(real_cells) == 2 * CELLS_PER_CLASS
    assert (probabilities > 0.9).sum() >= 20 and (probabilities < 0.1).sum() >= 20


def test_onnx_export_matches_keras_on_real_cells(exports, keras_predictor, real_cells):
    forward = onnx_forward(exports["onnx"].path.read_bytes())
    _assert_agrees(_keras_probabilities(keras_predictor, real_cells), forward(real_cells))


def test_tflite_export_matches_keras_on_real_cells(exports, keras_predictor, real_cells):
    forward = tflite_forward(exports["tflite"].path.read_bytes())
    expected = _keras_probabilities(keras_predictor, real_cells)
    _assert_agrees(expected, forward(real_cells))
    # A different batch size re-allocates the interpreter and must still agree.
    _assert_agrees(expected[:5], forward(real_cells[:5]))


@pytest.mark.parametrize("export_format", ["onnx", "tflite"])
def test_per_cell_colour_normalization_survives_export(export_format, real_cells, tmp_path):
    path = save_tiny_model(tmp_path / "model.keras", image_size=64, colour_normalization="per_cell")
    exported = export_model(path, export_format, tmp_path / f"model.{export_format}")
    forward = onnx_forward if export_format == "onnx" else tflite_forward
    model = load_model(str(path))
    # Also crops that kept a light smear all round the cell, which the layer masks out
    # like the black: the cells at half size in the middle of a smear, padded black.
    framed = np.zeros_like(real_cells)
    framed[:, 16:48, 16:48] = real_cells[:, ::2, ::2]
    cells = np.concatenate([real_cells, on_smear(framed, padding_rows=4)])
    expected = np.asarray(model(cells, training=False))
    actual = forward(exported.path.read_bytes())(cells)
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE)


def test_the_export_card_recipe_for_crops_on_a_smear_gives_what_predict_gives(
    exports, keras_predictor, shared_data_dir, tmp_path
):
    """The graph does not cut a cell out of its smear: the card says to do it first."""
    from PIL import Image

    from malaria_classifier.images import load_rgb_image, resize_with_pad

    files = sorted((shared_data_dir / "Uninfected").glob("*.png"))[::500][:6]
    rng = np.random.default_rng(0)
    crops = []
    for index, path in enumerate(files):
        cell = load_rgb_image(path)  # NIH crop: the cell on black, as the original
        smear = np.array([200.0, 170.0, 180.0]) + rng.normal(0.0, 4.0, cell.shape)
        on_pink = np.where(cell.max(axis=-1, keepdims=True) < 30, smear, cell)
        crops.append(tmp_path / f"smear_{index}.png")
        Image.fromarray(np.clip(np.rint(on_pink), 0, 255).astype(np.uint8)).save(crops[-1])
    expected = np.array(
        [row.uncalibrated_probability for row in keras_predictor.predict_paths(crops)]
    )
    forward = onnx_forward(exports["onnx"].path.read_bytes())
    size = keras_predictor.image_size
    recipe = np.stack([resize_with_pad(load_rgb_image(crop), size) for crop in crops])
    np.testing.assert_allclose(forward(recipe)[:, POSITIVE_INDEX], expected, atol=TOLERANCE)
    card = json.loads(exports["onnx"].card_path.read_text())
    assert "isolate_cell" in card["input"]["before_resize"] and "smear" in card["not_included"]
    # Skipping the step the card names scores healthy cells on a smear as parasitized.
    plain = np.stack([resize_with_pad(load_rgb_image(c), size, cut_out_smear=False) for c in crops])
    skipped = forward(plain)[:, POSITIVE_INDEX]
    assert expected.max() < 0.1 and skipped.mean() > 0.5


def test_saved_model_round_trip_serves_the_same_probabilities(exports, keras_predictor, real_cells):
    loaded = tf.saved_model.load(str(exports["saved_model"].path))
    serve = loaded.signatures["serving_default"]
    outputs = serve(image=tf.constant(real_cells))
    assert list(outputs) == ["output_0"]
    expected = _keras_probabilities(keras_predictor, real_cells)
    _assert_agrees(expected, outputs["output_0"].numpy())


def test_onnx_graph_has_named_uint8_input_and_output(exports):
    import onnxruntime

    session = onnxruntime.InferenceSession(exports["onnx"].path.read_bytes())
    (model_input,) = session.get_inputs()
    assert (model_input.name, model_input.type) == ("image", "tensor(uint8)")
    assert model_input.shape[1:] == [64, 64, 3]
    assert [output.name for output in session.get_outputs()] == [ONNX_OUTPUT_NAME]


def test_every_export_carries_a_card_with_the_serving_contract(exports):
    for export_format, result in exports.items():
        card = json.loads(result.card_path.read_text())
        assert card["format"] == export_format
        assert card["class_order"] == ["Uninfected", "Parasitized"]
        assert card["input"]["dtype"] == "uint8" and card["input"]["shape"] == [None, 64, 64, 3]
        source = read_model_card(default_model_path())
        assert card["decision_threshold"] == source["decision_threshold"]
        assert card["calibration"]["temperature"] == source["calibration"]["temperature"]
        assert result.size_bytes > 100_000  # the weights are inside, not left behind


@pytest.mark.parametrize("runtime", ["onnx", "tflite"])
def test_predictor_runtimes_give_the_keras_rows(runtime, shared_data_dir):
    files = (
        sorted((shared_data_dir / "Parasitized").glob("*.png"))[:10]
        + sorted((shared_data_dir / "Uninfected").glob("*.png"))[:10]
    )
    # ONNX and LiteRT give probabilities only, so the comparison runs without the
    # Not-a-cell check, which needs the Keras model's features.
    expected = list(Predictor(check_ood=False).predict_paths(files))
    rows = list(Predictor(runtime=runtime, batch_size=8, check_ood=False).predict_paths(files))
    assert [row.label for row in rows] == [row.label for row in expected]
    np.testing.assert_allclose(
        [row.probability for row in rows], [row.probability for row in expected], atol=TOLERANCE
    )


def test_onnx_runtime_gives_the_keras_rows_with_the_not_a_cell_check(
    keras_predictor, shared_data_dir, tmp_path
):
    """ONNX Runtime runs the two-output graph, so decisions (Not a cell too) match Keras."""
    from PIL import Image

    files = (
        sorted((shared_data_dir / "Parasitized").glob("*.png"))[:6]
        + sorted((shared_data_dir / "Uninfected").glob("*.png"))[:6]
    )
    blank = tmp_path / "blank.png"
    Image.new("RGB", (80, 60), (30, 120, 200)).save(blank)
    expected = list(keras_predictor.predict_paths([*files, blank]))
    rows = list(Predictor(runtime="onnx").predict_paths([*files, blank]))
    assert expected[-1].decision == "Not a cell"
    assert [row.decision for row in rows] == [row.decision for row in expected]
    np.testing.assert_allclose(
        [row.probability for row in rows], [row.probability for row in expected], atol=TOLERANCE
    )


def test_auto_runtime_is_onnx_and_falls_back_to_keras_when_conversion_fails(
    keras_predictor, real_cells, monkeypatch, caplog
):
    assert Predictor(runtime="auto").runtime == "onnx"

    def refuse(model):
        raise ValueError("this graph has an op tf2onnx does not know")

    monkeypatch.setattr("malaria_classifier.export.convert_to_onnx", refuse)
    # As for a model without a serving copy (tests/test_serving.py), which converts.
    monkeypatch.setattr("malaria_classifier.prediction.read_serving_copy", lambda path: None)
    with caplog.at_level("WARNING", logger="malaria_classifier.runtimes"):
        fallback = Predictor(runtime="auto")

    assert fallback.runtime == "keras"
    assert "op tf2onnx does not know" in caplog.text and "using Keras" in caplog.text
    np.testing.assert_array_equal(
        fallback.predict_arrays(real_cells), keras_predictor.predict_arrays(real_cells)
    )


def test_tflite_runtime_says_how_to_run_without_the_not_a_cell_check():
    with pytest.raises(ValueError, match="check_ood=False"):
        Predictor(runtime="tflite")


def test_unknown_runtime_and_format_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown runtime 'torch'; use one of auto, keras, onnx"):
        Predictor(runtime="torch")
    with pytest.raises(ValueError, match="Unknown export format 'coreml'; use one of"):
        export_model(default_model_path(), "coreml", tmp_path / "model.mlmodel")
    assert not (tmp_path / "model.mlmodel").exists()


def test_export_never_overwrites(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    output = tmp_path / "model.onnx"
    output.write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="already exists.*; remove it or choose another"):
        export_model(model, "onnx", output)
    assert output.read_bytes() == b"keep me"


def test_export_never_overwrites_a_card_left_from_an_earlier_export(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    card = tmp_path / "model.onnx.model_card.json"
    card.write_text("{}", encoding="utf-8")
    with pytest.raises(FileExistsError, match="model_card.json already exists"):
        export_model(model, "onnx", tmp_path / "model.onnx")
    assert card.read_text(encoding="utf-8") == "{}"
    assert not (tmp_path / "model.onnx").exists()


def test_an_output_named_for_another_format_is_refused(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    with pytest.raises(ValueError, match=r"named like a tflite model but --format is onnx"):
        export_model(model, "onnx", tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()


def test_a_failed_write_names_the_output_and_leaves_no_partial_file(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model.keras")
    real_write_bytes = Path.write_bytes

    def disk_full(self, data):
        real_write_bytes(self, data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    output = tmp_path / "model.onnx"
    with pytest.raises(OSError, match="No space left on device") as caught:
        export_model(model, "onnx", output)
    assert caught.value.filename == str(output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]


def test_export_of_a_missing_model_names_it(tmp_path):
    with pytest.raises(ValueError, match="missing.keras does not exist"):
        export_model(tmp_path / "missing.keras", "tflite", tmp_path / "model.tflite")
    assert not (tmp_path / "model.tflite").exists()


def test_default_export_paths_follow_the_model_name(tmp_path):
    names = [default_export_path(tmp_path / "best.keras", name).name for name in EXPORT_FORMATS]
    assert names == ["best_saved_model", "best.tflite", "best.onnx"]


def test_a_model_left_without_its_card_is_named_as_an_interrupted_export(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    (tmp_path / "model.onnx").write_bytes(b"written before a kill")
    with pytest.raises(FileExistsError, match=r"without its model\.onnx\.model_card\.json"):
        export_model(model, "onnx", tmp_path / "model.onnx")


def test_each_runtime_runs_its_export_by_the_names_the_card_gives(exports, keras_predictor):
    """What a TF Serving, LiteRT or ONNX Runtime engineer does with the card alone."""
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    cells = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    expected = _keras_probabilities(keras_predictor, cells)
    cards = {name: json.loads(result.card_path.read_text()) for name, result in exports.items()}

    card = cards["saved_model"]
    assert "<model_base_path>/1/" in card["tensorflow_serving"]
    serve = tf.saved_model.load(str(exports["saved_model"].path)).signatures[
        card["signature"]["name"]
    ]
    outputs = serve(**{card["input"]["name"]: tf.constant(cells, dtype=card["input"]["dtype"])})
    _assert_agrees(expected, outputs[card["output"]["name"]].numpy())

    card = cards["tflite"]
    interpreter = Interpreter(model_path=str(exports["tflite"].path))
    (details,) = interpreter.get_input_details()
    assert details["dtype"] == np.dtype(card["input"]["dtype"])
    assert list(details["shape_signature"]) == [-1, *card["input"]["shape"][1:]]
    run = interpreter.get_signature_runner(card["signature"]["name"])
    outputs = run(**{card["input"]["name"]: cells})
    _assert_agrees(expected, outputs[card["output"]["name"]])

    card = cards["onnx"]
    session = onnxruntime.InferenceSession(str(exports["onnx"].path))
    (probabilities,) = session.run([card["output"]["name"]], {card["input"]["name"]: cells})
    _assert_agrees(expected, probabilities)


def test_the_export_cards_calibration_recipe_gives_the_predicted_probability(
    exports, keras_predictor, real_cells
):
    """A serving stack following the card gets `malaria predict`'s calibrated P."""
    card = json.loads(exports["onnx"].card_path.read_text())
    softmax = onnx_forward(exports["onnx"].path.read_bytes())(real_cells).astype(np.float64)
    temperature = card["calibration"]["temperature"]
    logit = np.log(softmax[:, 1]) - np.log(softmax[:, 0])
    recipe = 1.0 / (1.0 + np.exp(-logit / temperature))
    np.testing.assert_allclose(recipe, keras_predictor.predict_arrays(real_cells), atol=TOLERANCE)


def test_rerunning_over_a_finished_export_names_both_files_in_the_way(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    first = export_model(model, "onnx", tmp_path / "model.onnx")
    written = first.path.read_bytes()
    with pytest.raises(
        FileExistsError,
        match=r"model\.onnx and .*model\.onnx\.model_card\.json already exist; remove them",
    ):
        export_model(model, "onnx", tmp_path / "model.onnx")
    assert first.path.read_bytes() == written


def test_an_existing_folder_as_a_one_file_output_says_to_name_a_file_inside(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    (tmp_path / "exports").mkdir()
    with pytest.raises(FileExistsError, match=r"exports is a folder; a tflite export is one file"):
        export_model(model, "tflite", tmp_path / "exports")
    assert list((tmp_path / "exports").iterdir()) == []


def test_an_output_under_a_file_is_refused_before_converting(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model.keras")
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    monkeypatch.setattr("malaria_classifier.export.convert_to_onnx", _must_not_convert)
    with pytest.raises(ValueError, match=r"notes\.txt is a file, not a folder"):
        export_model(model, "onnx", tmp_path / "notes.txt" / "sub" / "model.onnx")


def test_an_output_in_a_read_only_folder_is_refused_before_converting(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model.keras")
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: have the folder look as it does to a user
        real_access = os.access
        monkeypatch.setattr(
            os, "access", lambda path, mode: Path(path) != read_only and real_access(path, mode)
        )
    monkeypatch.setattr("malaria_classifier.export.convert_to_onnx", _must_not_convert)
    try:
        with pytest.raises(ValueError, match=r"the folder .*read_only is not writable"):
            export_model(model, "onnx", read_only / "new" / "model.onnx")
        assert list(read_only.iterdir()) == []
    finally:
        read_only.chmod(0o755)


def _must_not_convert(model):
    raise AssertionError("converted although the output could never be written")


def test_a_model_card_that_describes_another_model_is_refused(tmp_path):
    """Its threshold and temperature would go into the export card as if they were this
    model's: wrong calls in production with nothing to show it."""
    model = save_tiny_model(tmp_path / "run" / "model.keras")
    card_path = tmp_path / "run" / "model_card.json"
    card_path.write_text(json.dumps({"model_sha256": "0" * 64, "decision_threshold": 0.3}))
    with pytest.raises(ValueError, match=r"model_card\.json describes another model than"):
        export_model(model, "onnx", tmp_path / "model.onnx")
    calibration = {"temperature": 1.5, "model_sha256": "0" * 64, "fit_id": "x"}
    card_path.write_text(json.dumps({"decision_threshold": 0.3, "calibration": calibration}))
    with pytest.raises(ValueError, match=r"has changed since it was calibrated"):
        export_model(model, "onnx", tmp_path / "model.onnx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_an_unreadable_model_card_leaves_no_export_behind(tmp_path):
    """The card is read before the export is written, not after (which left the
    export without its card, named as an interrupted export by the next run)."""
    model = save_tiny_model(tmp_path / "run" / "model.keras")
    (tmp_path / "run" / "model_card.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"model_card\.json is unreadable"):
        export_model(model, "onnx", tmp_path / "model.onnx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_a_model_without_its_card_is_exported_with_a_warning(tmp_path, caplog):
    model = save_tiny_model(tmp_path / "model.keras")
    with caplog.at_level("WARNING", logger="malaria_classifier.export"):
        result = export_model(model, "onnx", tmp_path / "model.onnx")
    card = json.loads(result.card_path.read_text())
    assert card["decision_threshold"] == 0.5 and card["calibration"] is None
    assert "model.keras has no model card (model_card.json beside it)" in caplog.text


def test_ctrl_c_while_writing_leaves_no_partial_file(tmp_path, monkeypatch):
    model = save_tiny_model(tmp_path / "model.keras")
    interrupt_file_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        export_model(model, "onnx", tmp_path / "model.onnx")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.keras"]


def test_cleaning_up_killed_exports_removes_only_their_own_folders(tmp_path):
    """Names are compared as text: `*` or `[` in --output are not glob patterns, and a
    user's hidden folder that merely starts like the export's name is kept."""
    model = save_tiny_model(tmp_path / "model.keras")
    killed = tmp_path / ".*.abcd1234.export-partial"
    (killed / "saved_model").mkdir(parents=True)
    kept = [tmp_path / ".my.settings", tmp_path / ".*.backup", tmp_path / ".*.abcd1234"]
    for folder in kept:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")

    export_model(model, "saved_model", tmp_path / "*")

    assert not killed.exists()
    assert all((folder / "keep.txt").read_text() == "mine" for folder in kept)
    assert (tmp_path / "*" / "saved_model.pb").is_file()


@pytest.mark.skipif(os.name != "posix", reason="needs POSIX signals")
def test_sigkill_mid_save_leaves_no_export_and_the_next_run_succeeds(tmp_path):
    model = save_tiny_model(tmp_path / "model.keras")
    output = tmp_path / "model_saved_model"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        import malaria_classifier.export as export

        def killed_mid_save(model, folder):
            folder.mkdir()
            (folder / "saved_model.pb").write_bytes(b"half a graph")
            os.kill(os.getpid(), signal.SIGKILL)

        export.save_saved_model = killed_mid_save
        export.export_model({str(model)!r}, "saved_model", {str(output)!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr.decode()
    assert not output.exists()
    (leftover,) = [path for path in tmp_path.iterdir() if path.name.startswith(".")]

    result = export_model(model, "saved_model", output)

    assert (result.path / "saved_model.pb").stat().st_size > 1000 and not leftover.exists()
