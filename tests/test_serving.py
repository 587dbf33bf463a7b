"""The TensorFlow-free serving copy: same rows as Keras, never stale, never imports TensorFlow."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from _synthetic import save_tiny_model
from conftest import interrupt_file_writes, write_png

from malaria_classifier.model import load_model
from malaria_classifier.model_card import default_model_path
from malaria_classifier.prediction import Predictor
from malaria_classifier.serving import read_serving_copy, serving_paths, write_serving_copy


def _cells(folder, count: int = 12) -> list[str]:
    paths = []
    for index in range(count):
        colour = (index * 20 % 256, 90, 140)
        paths.append(str(write_png(folder / f"cell_{index}.png", (20 + index % 9, 24), colour)))
    return paths


@pytest.fixture()
def tiny_with_copy(tmp_path):
    model_path = save_tiny_model(tmp_path / "model" / "model.keras")
    write_serving_copy(load_model(str(model_path)), model_path)
    return model_path


def test_the_copy_sits_beside_the_model_and_reads_back(tiny_with_copy):
    onnx_path, info_path = serving_paths(tiny_with_copy)

    copy = read_serving_copy(tiny_with_copy)

    assert onnx_path.name == "model.serving.onnx" and info_path.name == "model.serving.json"
    assert copy is not None and copy.image_size == 32
    kernel, bias = copy.final_layer
    expected_kernel, expected_bias = load_model(str(tiny_with_copy)).layers[-1].get_weights()
    np.testing.assert_array_equal(kernel, expected_kernel)
    np.testing.assert_array_equal(bias, expected_bias)


def test_rows_from_the_copy_equal_the_keras_rows(tiny_with_copy, tmp_path):
    paths = _cells(tmp_path / "cells")
    with_copy = Predictor(tiny_with_copy, runtime="auto")
    keras_rows = list(Predictor(tiny_with_copy, runtime="keras").predict_paths(paths))

    rows = list(with_copy.predict_paths(paths))

    assert with_copy.runtime == "onnx" and with_copy._model is None  # Keras never loaded
    assert [row.label for row in rows] == [row.label for row in keras_rows]
    np.testing.assert_allclose(
        [row.probability for row in rows], [row.probability for row in keras_rows], atol=1e-5
    )


def test_a_copy_of_an_older_model_is_never_used(tiny_with_copy, tmp_path):
    # Retrain in place: a different model now sits at the same path.
    replacement = save_tiny_model(tmp_path / "other" / "model.keras", image_size=24)
    tiny_with_copy.write_bytes(replacement.read_bytes())

    predictor = Predictor(tiny_with_copy, runtime="auto")

    assert read_serving_copy(tiny_with_copy) is None
    assert predictor.image_size == 24  # the new model, converted in memory
    row = next(iter(predictor.predict_paths(_cells(tmp_path / "cells", 1))))
    assert row.error == "" and row.label


@pytest.mark.parametrize("damage", ["truncated onnx", "bad json", "missing json"])
def test_a_damaged_copy_is_ignored(tiny_with_copy, damage):
    onnx_path, info_path = serving_paths(tiny_with_copy)
    if damage == "truncated onnx":
        onnx_path.write_bytes(onnx_path.read_bytes()[:100])
    elif damage == "bad json":
        info_path.write_text("{not json")
    else:
        info_path.unlink()

    assert read_serving_copy(tiny_with_copy) is None
    assert Predictor(tiny_with_copy, runtime="auto").runtime == "onnx"  # converted instead


def test_the_bundled_default_model_ships_a_current_copy():
    model_path = default_model_path()
    copy = read_serving_copy(model_path)

    assert copy is not None, "run write_serving_copy on the bundled model after replacing it"
    info = json.loads(serving_paths(model_path)[1].read_text())
    assert info["outputs"] == ["probabilities", "features"]


def test_the_copy_agrees_with_keras_on_real_cells(shared_data_dir):
    paths = [
        *sorted((shared_data_dir / "Parasitized").glob("*.png"))[:32],
        *sorted((shared_data_dir / "Uninfected").glob("*.png"))[:32],
    ]
    from_copy = list(Predictor(runtime="auto").predict_paths(paths))
    from_keras = list(Predictor(runtime="keras").predict_paths(paths))

    assert [row.decision for row in from_copy] == [row.decision for row in from_keras]
    np.testing.assert_allclose(
        [row.uncalibrated_probability for row in from_copy],
        [row.uncalibrated_probability for row in from_keras],
        atol=1e-4,
    )


def test_malaria_predict_with_the_default_model_never_imports_tensorflow(tmp_path):
    folder = tmp_path / "cells"
    _cells(folder, 300)  # over PROCESS_DECODE_MIN_FILES: the worker processes run too
    output = tmp_path / "rows.csv"
    script = textwrap.dedent(
        f"""
        import sys
        from malaria_classifier.cli import app
        if __name__ == "__main__":
            try:
                app(["predict", {str(folder)!r}, "--output", {str(output)!r}])
            except SystemExit as exit:
                assert not exit.code, exit.code
            loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
            print("LOADED", loaded)
        """
    )
    script_path = tmp_path / "run_predict.py"
    script_path.write_text(script)

    done = subprocess.run(
        [sys.executable, str(script_path)], capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert "LOADED []" in done.stdout, done.stdout
    assert "(forward pass: onnx)" in done.stderr
    assert len(output.read_text().splitlines()) == 301


def test_the_api_default_predictor_never_imports_tensorflow(tmp_path):
    """``Predictor()`` serves like ``malaria predict``: an engineer's script starts fast."""
    folder = tmp_path / "cells"
    _cells(folder, 20)
    script = textwrap.dedent(
        f"""
        import sys
        from malaria_classifier import Predictor
        predictor = Predictor()
        rows = list(predictor.predict_paths([{str(folder)!r}]))
        assert len(rows) == 20 and all(row.label for row in rows), rows
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras"))
        print("RUNTIME", predictor.runtime, "LOADED", loaded)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert "RUNTIME onnx LOADED []" in done.stdout, done.stdout


def test_ctrl_c_while_rewriting_the_copy_keeps_the_old_one_and_leaves_no_partial_file(
    tiny_with_copy, monkeypatch
):
    onnx_path, _ = serving_paths(tiny_with_copy)
    before = onnx_path.read_bytes()
    interrupt_file_writes(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        write_serving_copy(load_model(str(tiny_with_copy)), tiny_with_copy)

    assert not [path.name for path in onnx_path.parent.iterdir() if path.name.startswith(".")]
    assert onnx_path.read_bytes() == before and read_serving_copy(tiny_with_copy) is not None
