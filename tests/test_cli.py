"""The `malaria` command: clear messages and exit codes, never a traceback for user errors."""

import csv

import pytest
from _synthetic import save_tiny_model, write_synthetic_dataset
from typer.testing import CliRunner

from malaria_classifier.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.keras")


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("data") / "cell_images", patients=4)


def _run(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def test_data_check_reports_counts_patients_and_problems(cells, tmp_path):
    report = tmp_path / "report.json"
    result = _run("data", "check", cells.parent, "--json", report)
    assert result.exit_code == 0, result.output
    assert "Parasitized" in result.output and "Uninfected" in result.output
    assert "Patients:    4 (3 with parasitized cells" in result.output
    assert report.is_file()


def test_wrong_layout_is_a_clear_error_without_traceback(tmp_path):
    (tmp_path / "pictures").mkdir()
    result = _run("data", "check", tmp_path / "pictures")
    assert result.exit_code == 2
    assert "No Parasitized/ and Uninfected/ folders" in result.output
    assert "Traceback" not in result.output


def test_predict_writes_csv_and_exits_zero_when_some_images_work(cells, tiny_model, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"junk")
    output = tmp_path / "predictions.csv"
    result = _run(
        "predict", cells, tmp_path / "junk.png", "--model", tiny_model, "--output", output
    )
    assert result.exit_code == 0, result.output
    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "probability", "confidence", "error"]
    assert rows[-1]["label"] == "" and "junk.png" in rows[-1]["error"]
    assert sum(1 for row in rows if row["label"]) == 42  # 3 infected x 12 + 1 healthy x 6


def test_predict_exits_non_zero_when_nothing_could_be_predicted(tiny_model, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"junk")
    result = _run("predict", tmp_path / "junk.png", tmp_path / "missing.png", "--model", tiny_model)
    assert result.exit_code == 1
    assert "0 predicted, 2 failed" in result.output


def test_predict_rejects_unknown_format(tiny_model, cells):
    result = _run("predict", cells, "--model", tiny_model, "--format", "xml")
    assert result.exit_code == 2 and "--format must be csv or json" in result.output


def test_train_rejects_a_bad_config_before_doing_work(cells, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("learning_rat: 0.01\n")
    result = _run("train", "--data", cells, "--config", config, "--output", tmp_path / "run")
    assert result.exit_code == 2
    assert "unknown setting(s) ['learning_rat']" in result.output
    assert not (tmp_path / "run").exists()


def test_train_resume_needs_an_output_folder(cells):
    result = _run("train", "--data", cells, "--resume")
    assert result.exit_code == 2 and "--resume needs --output" in result.output


def test_evaluate_writes_its_report(cells, tiny_model, tmp_path):
    result = _run("evaluate", "--data", cells, "--model", tiny_model, "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "positive class Parasitized" in result.output
    assert (tmp_path / "ev" / "metrics.json").is_file()


def test_download_failure_is_reported_cleanly(tmp_path):
    result = _run(
        "data", "download", "--dest", tmp_path, "--url", "http://127.0.0.1:9/cell_images.zip"
    )
    assert result.exit_code == 2
    assert "127.0.0.1:9" in result.output and "Traceback" not in result.output


def test_export_writes_an_onnx_model_and_its_card(tiny_model, tmp_path):
    output = tmp_path / "out" / "tiny.onnx"
    result = _run("export", "--model", tiny_model, "--format", "onnx", "--output", output)
    assert result.exit_code == 0, result.output
    assert output.stat().st_size > 1000 and f"{output}.model_card.json" in result.output
    assert (tmp_path / "out" / "tiny.onnx.model_card.json").is_file()


def test_export_defaults_to_the_model_name_in_the_current_folder(tiny_model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _run("export", "--model", tiny_model, "--format", "tflite")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "model.tflite").is_file()


def test_export_rejects_an_unknown_format_by_name(tiny_model, tmp_path):
    result = _run("export", "--model", tiny_model, "--format", "coreml")
    assert result.exit_code == 2
    assert "Unknown export format 'coreml'; use one of saved_model, tflite, onnx" in result.output
    assert "Traceback" not in result.output


def test_export_of_a_missing_model_is_a_clear_error(tmp_path):
    missing = tmp_path / "nowhere.keras"
    result = _run("export", "--model", missing, "--format", "saved_model")
    assert result.exit_code == 2
    assert f"Model file {missing} does not exist" in result.output
    assert not list(tmp_path.iterdir())
