"""The `malaria` command: clear messages and exit codes, never a traceback for user errors."""

import csv
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from _synthetic import save_tiny_model, write_synthetic_dataset
from typer.testing import CliRunner

from malaria_classifier.cli import app
from malaria_classifier.serving import read_serving_copy

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


def test_data_check_names_unlabelled_images_and_strict_fails_on_them(cells, tmp_path):
    data = tmp_path / "cell_images"
    shutil.copytree(cells, data)
    shutil.copy(next((data / "Parasitized").glob("*.png")), data / "stray.png")
    result = _run("data", "check", data)
    assert result.exit_code == 0, result.output
    assert "Images outside Parasitized/ and Uninfected/ (no label, not used): 1" in result.output
    assert "stray.png" in result.output
    result = _run("data", "check", data, "--strict")
    assert result.exit_code == 1 and "--strict: the data have problems" in result.output
    assert _run("data", "check", cells, "--strict").exit_code == 0  # clean data pass


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
    assert ",".join(rows[0]) == "path,label,probability,confidence,error,decision,reason"
    assert rows[-1]["label"] == "" and "junk.png" in rows[-1]["error"]
    assert sum(1 for row in rows if row["label"]) == 42  # 3 infected x 12 + 1 healthy x 6
    # The tiny model has no calibration: the README's "calibrated" does not hold for it.
    assert "is not calibrated: probability is the model's raw softmax output" in result.output


def test_predict_exits_non_zero_when_nothing_could_be_predicted(tiny_model, tmp_path):
    (tmp_path / "junk.png").write_bytes(b"junk")
    result = _run("predict", tmp_path / "junk.png", tmp_path / "missing.png", "--model", tiny_model)
    assert result.exit_code == 1
    assert "0 predicted, 2 failed" in result.output


def test_predict_starts_decode_workers_for_folders_only(cells, tiny_model, monkeypatch):
    from malaria_classifier.decoding import DecodePool

    started = []
    monkeypatch.setattr(DecodePool, "start", lambda pool: started.append(pool) or pool)
    one_file = next((cells / "Parasitized").glob("*.png"))

    assert _run("predict", one_file, "--model", tiny_model).exit_code == 0
    assert not started  # a few named files: no worker processes to start and wait for
    assert _run("predict", cells, "--model", tiny_model).exit_code == 0
    assert started  # a folder may hold thousands


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


def test_dashboard_rejects_a_missing_examples_folder_before_loading(tmp_path):
    result = _run("dashboard", "--examples", tmp_path / "nowhere")
    assert result.exit_code == 2
    assert "not a folder" in result.output and "Traceback" not in result.output


def test_dashboard_rejects_a_missing_model(tmp_path):
    result = _run("dashboard", "--model", tmp_path / "missing.keras")
    assert result.exit_code == 2
    assert "missing.keras" in result.output and "Traceback" not in result.output


def test_dashboard_serves_the_page_and_the_api(tmp_path):
    """`malaria dashboard` really starts a server on 127.0.0.1 (in a subprocess)."""
    import io
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import numpy as np
    from _synthetic import draw_cell
    from PIL import Image

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "malaria_classifier.cli", "dashboard", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                page = urllib.request.urlopen(url + "/", timeout=2).read().decode()
                break
            except OSError:
                assert server.poll() is None, server.stdout.read().decode()[-2000:]
                time.sleep(0.5)
        else:
            raise AssertionError("the dashboard did not start within 2 minutes")
        assert "Malaria cell classifier" in page
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(draw_cell(40, True, np.random.default_rng(0)))).save(
            buffer, format="PNG"
        )
        boundary = "malaria-test-boundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="c.png"\r\n'
                f"Content-Type: image/png\r\n\r\n"
            ).encode()
            + buffer.getvalue()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        request = urllib.request.Request(
            url + "/api/predict",
            data=body,
            headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        )
        [row] = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert row["path"] == "c.png" and row["label"] in ("Parasitized", "Uninfected")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_predict_summary_needs_group_by_and_a_verdict_rule(cells, tiny_model, tmp_path):
    result = _run("predict", cells, "--model", tiny_model, "--summary", tmp_path / "s.csv")
    assert result.exit_code == 2 and "--group-by and --summary go together" in result.output
    result = _run(
        "predict", cells, "--model", tiny_model, "--group-by", "patient", "--summary", "s.csv"
    )
    assert result.exit_code == 2 and "Run `malaria calibrate`" in result.output


def _write_manifest(data, run_dir):
    """A manifest splitting the synthetic patients: 4 train, 4 validation, 4 test."""
    from malaria_classifier.data import discover_images

    splits = {}
    for index, patient in enumerate(sorted({r.patient for r in discover_images(data).records})):
        splits[patient] = ("train", "validation", "test")[index % 3]
    run_dir.mkdir()
    with open(run_dir / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "patient", "split", "sha256"])
        for record in discover_images(data).records:
            relative = record.path.relative_to(data)
            writer.writerow([relative, record.label, record.patient, splits[record.patient], "0"])


def test_calibrate_then_predict_with_decisions_and_a_patient_summary(tmp_path):
    data = write_synthetic_dataset(tmp_path / "cell_images", patients=12, size=32)
    run_dir = tmp_path / "run"
    _write_manifest(data, run_dir)
    model = save_tiny_model(run_dir / "model.keras")
    assert read_serving_copy(model) is None  # as for a run trained by an older version
    result = _run("calibrate", "--data", data, "--run", run_dir, "--no-ood-variants")
    assert result.exit_code == 0, result.output
    assert read_serving_copy(model) is not None  # predict can start without TensorFlow
    assert json.loads((run_dir / "ood.json").read_text())["fitted_on"]["variants"].startswith(
        "none"
    )
    assert not (run_dir / "ood_other_labs.json").exists()
    result = _run("calibrate", "--data", data, "--run", run_dir)
    assert result.exit_code == 0, result.output
    assert "Temperature" in result.output and "Test patients: ECE" in result.output
    strict = json.loads((run_dir / "ood.json").read_text())["fitted_on"]
    assert strict["variants"].startswith("none")
    other_labs = json.loads((run_dir / "ood_other_labs.json").read_text())["fitted_on"]
    assert other_labs["train_variants_cells"] == other_labs["train_cells"] > 0
    result = _run("predict", data, "--model", model, "--not-a-cell", "other-labs")
    assert result.exit_code == 0, result.output
    result = _run("predict", data, "--model", model, "--not-a-cell", "lenient")
    assert result.exit_code == 2 and "strict, other-labs" in result.output

    output, summary = tmp_path / "predictions.csv", tmp_path / "summary.csv"
    result = _run(
        "predict", data, "--model", model, "--output", output,
        "--group-by", "patient", "--summary", summary,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with open(output) as handle:
        rows = list(csv.DictReader(handle))
    assert {row["decision"] for row in rows} <= {"Parasitized", "Uninfected", "Uncertain"} | {
        "Not a cell"
    }
    with open(summary) as handle:
        groups = list(csv.DictReader(handle))
    assert list(groups[0]) == [
        "group", "cells", "parasitized_cells", "parasitemia", "verdict", "confidence"
    ]  # fmt: skip
    assert len(groups) == 12
    assert {group["verdict"] for group in groups} <= {"positive", "negative", "indeterminate"}
    assert "Warning" not in result.output  # NIH names: real patients

    one_patient = tmp_path / "patient_7"
    one_patient.mkdir()
    for index, cell in enumerate(sorted(data.rglob("*.png"))[:3]):
        shutil.copy(cell, one_patient / f"cell{index}.png")
    result = _run(
        "predict", one_patient, "--model", model, "--group-by", "patient", "--summary", summary
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "3 of 3 groups are not patients" in result.output
    assert "field:cell0" in result.output and "--group-by folder" in result.output
    result = _run(
        "predict", one_patient, "--model", model, "--group-by", "folder", "--summary", summary
    )  # fmt: skip
    assert result.exit_code == 0 and "Warning" not in result.output and "Note" not in result.output
    shutil.copy(one_patient / "cell0.png", one_patient / "cell0 copy.png")
    result = _run(
        "predict", one_patient, "--model", model, "--output", output,
        "--group-by", "folder", "--summary", summary,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 file(s) repeat the picture of another file" in result.output
    with open(output) as handle:
        assert len(list(csv.DictReader(handle))) == 4  # one row per file still
    with open(summary) as handle:
        assert [row["cells"] for row in csv.DictReader(handle)] == ["3"]  # one per picture


def test_calibrate_without_a_manifest_says_what_to_pass(tiny_model, cells):
    result = _run("calibrate", "--data", cells, "--model", tiny_model)
    assert result.exit_code == 2 and "Pass --run" in result.output


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


def test_predict_runs_onnx_by_default_and_it_matches_keras(shared_data_dir, tmp_path):
    cells = sorted((shared_data_dir / "Parasitized").glob("*.png"))[:5]
    outputs = {}
    for runtime in ("keras", "onnx", None):
        output = tmp_path / f"{runtime}.csv"
        options = ["--runtime", runtime] if runtime else []
        result = _run("predict", *cells, "--output", output, *options)
        assert result.exit_code == 0, result.output
        assert f"(forward pass: {runtime or 'onnx'})" in result.output
        outputs[runtime] = list(csv.DictReader(output.open()))
    for runtime in ("onnx", None):
        assert [row["decision"] for row in outputs[runtime]] == [
            row["decision"] for row in outputs["keras"]
        ]
        for row, keras_row in zip(outputs[runtime], outputs["keras"], strict=True):
            assert abs(float(row["probability"]) - float(keras_row["probability"])) < 1e-4


def test_predict_refuses_an_unknown_runtime_by_name(tmp_path):
    result = _run("predict", tmp_path, "--runtime", "torch")
    assert result.exit_code == 2 and "--runtime must be one of auto, keras, onnx" in result.output
    result = _run("predict", tmp_path, "--runtime", "tflite")  # offered nowhere in predict
    assert result.exit_code == 2 and "malaria export --format tflite" in result.output


def test_a_model_folder_or_a_non_keras_file_is_a_clear_error(tiny_model, tmp_path):
    result = _run("predict", tmp_path, "--model", tiny_model.parent, "--runtime", "keras")
    assert result.exit_code == 2 and f"is a folder; pass the .keras file such as {tiny_model}" in (
        result.output
    )
    image = tmp_path / "cell.png"
    image.write_bytes(b"\x89PNG")
    result = _run("predict", tmp_path, "--model", image, "--runtime", "keras")
    assert result.exit_code == 2 and "is not a .keras file" in result.output


def record_train_calls(monkeypatch) -> list[dict]:
    """Replace train_model with a recorder of its arguments (nothing is trained)."""
    import malaria_classifier.training

    calls = []

    def fake_train_model(data, config, run_dir, resume, strategy, exclude_cells):
        calls.append({"config": config, "resume": resume, "exclude_cells": exclude_cells})
        return SimpleNamespace(metrics={}, seconds=0.0)

    monkeypatch.setattr(malaria_classifier.training, "train_model", fake_train_model)
    return calls


def test_train_passes_the_training_seed_with_the_split_seed_unchanged(cells, tmp_path, monkeypatch):
    calls = record_train_calls(monkeypatch)
    result = _run("train", "--data", cells, "--output", tmp_path / "run", "--training-seed", "3")

    assert result.exit_code == 0, result.output
    assert (calls[0]["config"].seed, calls[0]["config"].training_seed) == (42, 3)


def test_train_passes_the_listed_cells_and_ignores_the_list_on_resume(cells, tmp_path, monkeypatch):
    calls = record_train_calls(monkeypatch)
    listed = tmp_path / "suspects.csv"
    listed.write_text("sha256,why\naa11,looks mislabelled\nbb22,\n", encoding="utf-8")
    run = tmp_path / "run"
    result = _run("train", "--data", cells, "--output", run, "--exclude-cells", listed)
    resumed = _run("train", "--data", cells, "--output", run, "--resume", "--exclude-cells", listed)

    assert result.exit_code == 0, result.output
    assert resumed.exit_code == 0, resumed.output
    assert [call["exclude_cells"] for call in calls] == [{"aa11", "bb22"}, set()]
    assert "other settings are ignored" in resumed.output


def test_an_interrupted_training_says_how_to_resume(cells, tmp_path, monkeypatch):
    import malaria_classifier.training

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(malaria_classifier.training, "train_model", interrupted)
    run = tmp_path / "run"
    result = _run("train", "--data", cells, "--output", run)

    assert result.exit_code == 130
    assert f"continue with: malaria train --data {cells} --output {run} --resume" in result.output


def test_tune_passes_seeds_per_trial_and_refuses_zero(cells, tmp_path, monkeypatch):
    import malaria_classifier.tune

    received = {}

    def fake_tune(data, trials, output_dir, **settings):
        received.update(settings, trials=trials)
        return SimpleNamespace(
            best_trial=0, best_value=0.99, finished_trials=trials, best_config_path="best.yaml"
        )

    monkeypatch.setattr(malaria_classifier.tune, "tune", fake_tune)
    result = _run(
        "tune",
        "--data",
        cells,
        "--trials",
        "3",
        "--seeds-per-trial",
        "2",
        "--output",
        tmp_path / "tune",
    )

    assert result.exit_code == 0, result.output
    assert (received["trials"], received["seeds_per_trial"]) == (3, 2)
    monkeypatch.undo()
    refused = _run(
        "tune",
        "--data",
        cells,
        "--trials",
        "1",
        "--seeds-per-trial",
        "0",
        "--output",
        tmp_path / "tune0",
    )
    assert refused.exit_code == 2 and "--seeds-per-trial must be at least 1" in refused.output


def test_predict_refuses_to_write_over_an_input_before_any_work(cells, tiny_model, tmp_path):
    image = next(cells.rglob("*.png"))
    before = image.read_bytes()
    result = _run("predict", image, "--model", tiny_model, "--output", image)
    assert result.exit_code == 2 and "a results file cannot have an image's name" in result.output
    assert image.read_bytes() == before
    result = _run(
        "predict", image, "--model", tiny_model, "--output", tmp_path / "same.csv",
        "--group-by", "patient", "--summary", tmp_path / "same.csv",
    )  # fmt: skip
    assert result.exit_code == 2 and "is also another output" in result.output
    result = _run("data", "check", cells.parent, "--json", image)
    assert result.exit_code == 2 and image.read_bytes() == before


def test_predict_to_a_missing_folder_is_one_clear_line(cells, tiny_model, tmp_path):
    image = next(cells.rglob("*.png"))
    result = _run("predict", image, "--model", tiny_model, "--output", tmp_path / "no" / "x.csv")
    assert result.exit_code == 2 and "does not exist. Create it" in result.output
    assert "Traceback" not in result.output


def test_predict_reports_an_unreadable_folder_and_goes_on(cells, tmp_path, monkeypatch):
    from malaria_classifier.prediction_inputs import expand_inputs

    readable = tmp_path / "open"
    readable.mkdir()
    image = next(cells.rglob("*.png"))
    (readable / "a.png").write_bytes(image.read_bytes())
    (tmp_path / "loop").symlink_to(tmp_path)  # a link loop must not make the walk endless
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "b.png").write_bytes(image.read_bytes())
    # What listing a chmod-000 folder does (root could list it, so it is simulated).
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    pairs = list(expand_inputs([tmp_path]))
    errors = [error for _, error in pairs if error]
    assert [path for path, error in pairs if not error] == [str(readable / "a.png")]
    assert len(errors) == 1 and "locked: folder cannot be read (Permission denied)" in errors[0]


def test_a_named_pipe_with_an_image_name_is_refused_without_waiting(tmp_path):
    from malaria_classifier.images import ImageLoadError, load_for_model

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageLoadError, match="is not a regular file"):
        load_for_model(fifo, 64)


def test_predict_says_when_a_folder_holds_no_images(tiny_model, tmp_path):
    (tmp_path / "notes.txt").write_text("no cells here")
    result = _run("predict", tmp_path, "--model", tiny_model)
    assert result.exit_code == 1 and "No image files found" in result.output


def test_predict_writes_json_for_an_output_ending_in_json(cells, tiny_model, tmp_path):
    image = next(cells.rglob("*.png"))
    output = tmp_path / "rows.json"
    result = _run("predict", image, "--model", tiny_model, "--output", output)
    assert result.exit_code == 0, result.output
    assert json.loads(output.read_text())[0]["path"] == str(image)


def test_evaluate_names_unreadable_images_and_refuses_output_inside_the_data(
    cells, tiny_model, tmp_path
):
    import shutil

    data = tmp_path / "cell_images"
    shutil.copytree(cells, data)
    broken = data / "Parasitized" / "C99P1_broken_cell_1.png"
    broken.write_bytes(b"not a png")
    result = _run("evaluate", "--data", data, "--model", tiny_model, "--output", tmp_path / "ev")
    assert result.exit_code == 0, result.output
    assert "1 image(s) could not be read and were left out" in result.output
    assert "C99P1_broken_cell_1.png" in result.output
    inside = data / "Parasitized" / "reports"
    result = _run("evaluate", "--data", data, "--model", tiny_model, "--output", inside)
    assert result.exit_code == 2 and "is inside the data folder" in result.output
    assert not inside.exists()


def test_data_check_flags_a_picture_filed_under_both_labels(cells, tmp_path):
    import shutil

    data = tmp_path / "cell_images"
    shutil.copytree(cells, data)
    parasitized = sorted((data / "Parasitized").rglob("*.png"))[0]
    shutil.copy(parasitized, data / "Uninfected" / "C98P2_copy_cell_1.png")
    (data / "Uninfected" / "notes.txt").write_text("not an image")
    report = tmp_path / "report.json"
    result = _run("data", "check", data, "--json", report)
    assert result.exit_code == 0, result.output
    assert "Label conflicts: 1 picture(s) stored as both" in result.output
    assert "C98P2_copy_cell_1.png" in result.output and "notes.txt" in result.output
    assert len(json.loads(report.read_text())["label_conflicts"]) == 1


def test_evaluate_on_one_class_says_which_metrics_are_undefined(cells, tiny_model, tmp_path):
    import shutil

    data = tmp_path / "cell_images"
    shutil.copytree(cells, data)
    for path in (data / "Uninfected").iterdir():
        if path.name.startswith("C") and path.suffix == ".png":
            path.unlink()  # keep the folder; new patients' uninfected cells are gone
    (data / "Uninfected" / "C97_x_cell_1.png").write_bytes(b"broken")  # listed as unreadable
    output = tmp_path / "ev"
    result = _run("evaluate", "--data", data, "--model", tiny_model, "--output", output)
    assert result.exit_code == 0, result.output
    assert "roc_auc      undefined (all cells are Parasitized" in result.output
    assert "no ROC curve" in result.output and not (output / "roc_curve.json").exists()
    json.loads(
        (output / "metrics.json").read_text(),
        parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"),
    )


@pytest.mark.parametrize("argv", [["evaluate", "--help"], ["data", "check", "--help"]])
def test_help_and_data_commands_do_not_load_tensorflow(argv):
    import subprocess
    import sys

    code = (
        "import sys\n"
        f"sys.argv = ['malaria', *{argv!r}]\n"
        "from malaria_classifier.cli import app\n"
        "try:\n    app()\nexcept SystemExit:\n    pass\n"
        "print('tensorflow loaded:', 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "Usage" in result.stdout and "tensorflow loaded: False" in result.stdout


def test_calibrate_warns_about_fits_not_to_trust(tmp_path):
    from malaria_classifier.cli.evaluation_commands import _calibration_warnings

    fitted = {"within_budget": False, "validation_false_rejection": 0.24}
    fitted["max_false_rejection"] = 0.005
    (tmp_path / "ood.json").write_text(json.dumps({"fitted_on": fitted}), encoding="utf-8")
    model = tmp_path / "model.keras"
    warnings = _calibration_warnings({"calibration": {"temperature": 54.598}}, model)
    assert "reject 24.0% of the validation cells (budget 0.5%)" in warnings[0]
    assert "temperature 54.6 is at the edge of its search range" in warnings[1]
    fitted["within_budget"] = True
    (tmp_path / "ood.json").write_text(json.dumps({"fitted_on": fitted}), encoding="utf-8")
    assert _calibration_warnings({"calibration": {"temperature": 1.05}}, model) == []


def test_a_reader_that_stops_early_ends_the_command_quietly(monkeypatch, capsys):
    """`malaria predict cells/ | head -1`: no "Broken pipe ... check the path" error."""
    import typer

    from malaria_classifier.cli._common import BROKEN_PIPE_STATUS, _user_errors

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (head) has stopped
    stdout = os.fdopen(write_end, "w")
    monkeypatch.setattr("sys.stdout", stdout)

    @_user_errors
    def print_rows():
        for _ in range(3):
            print("path,label", flush=True)

    with pytest.raises(typer.Exit) as stopped:
        print_rows()
    assert stopped.value.exit_code == BROKEN_PIPE_STATUS == 141
    assert capsys.readouterr().err == ""
    stdout.write("more")  # stdout now goes nowhere: flushing at exit raises nothing
    stdout.flush()
    stdout.close()


def test_an_interrupted_predict_never_leaves_new_predictions_beside_an_old_summary(
    cells, tmp_path, monkeypatch
):
    """Either both old files, or new predictions and no summary, or both new."""
    import malaria_classifier.prediction
    import malaria_classifier.verdict

    output, summary = tmp_path / "predictions.csv", tmp_path / "summary.csv"
    output.write_text("old predictions\n")
    summary.write_text("old summary\n")
    files = sorted(cells.rglob("*.png"))[:3]  # named files: no decode worker processes
    command = ("predict", *files, "--output", output, "--group-by", "folder", "--summary", summary)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:  # stopped while predicting: both old files kept
        patch.setattr(malaria_classifier.prediction, "write_rows", interrupted)
        assert _run(*command).exit_code == 130
    assert output.read_text() == "old predictions\n"
    assert summary.read_text() == "old summary\n"

    with monkeypatch.context() as patch:  # stopped at the summary: the stale one is gone
        patch.setattr(malaria_classifier.verdict, "write_summary", interrupted)
        assert _run(*command).exit_code == 130
    assert output.read_text().startswith("path,label,probability")
    assert not summary.exists()
    assert not list(tmp_path.glob(".*.partial"))

    result = _run(*command)  # uninterrupted: both new
    assert result.exit_code == 0, result.output
    assert summary.read_text().startswith("group,cells,")

    to_stdout = ("predict", *files, "--group-by", "folder", "--summary", summary)
    with monkeypatch.context() as patch:  # rows streamed to stdout, stopped at the summary
        patch.setattr(malaria_classifier.verdict, "write_summary", interrupted)
        assert _run(*to_stdout).exit_code == 130
    assert not summary.exists()
