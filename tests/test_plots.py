"""Figures name their axes, split and positive class; files are written where asked."""

import json
from pathlib import Path

import pytest

from malaria_classifier.plots import (
    confusion_matrix_figure,
    confusion_matrix_plotly,
    roc_curve_figure,
    roc_curve_plotly,
    save_figures,
)

COUNTS = [[50, 3], [4, 43]]
ROC = {
    "false_positive_rate": [0.0, 0.1, 1.0],
    "true_positive_rate": [0.0, 0.9, 1.0],
    "thresholds": [1.0, 0.5, 0.0],
}


def test_plotly_confusion_matrix_shows_counts_and_labels():
    figure = confusion_matrix_plotly(COUNTS, "test")
    assert figure.layout.xaxis.title.text == "Predicted class"
    assert figure.layout.yaxis.title.text == "True class"
    assert "test split" in figure.layout.title.text and "Parasitized" in figure.layout.title.text
    assert [list(row) for row in figure.data[0].z] == COUNTS
    assert list(figure.data[0].x) == ["Uninfected", "Parasitized"]


def test_plotly_roc_names_auc_and_axes():
    figure = roc_curve_plotly(ROC, 0.95, "validation")
    assert figure.data[0].name == "model (AUC = 0.9500)"
    assert "sensitivity" in figure.layout.yaxis.title.text
    assert "validation split" in figure.layout.title.text


def test_matplotlib_figures_label_axes():
    axis = confusion_matrix_figure(COUNTS, "test").axes[0]
    assert axis.get_xlabel() == "Predicted class" and axis.get_ylabel() == "True class"
    assert sorted(text.get_text() for text in axis.texts) == ["3", "4", "43", "50"]
    roc_axis = roc_curve_figure(ROC, 0.95, "test").axes[0]
    assert roc_axis.get_legend().get_texts()[0].get_text() == "AUC = 0.9500"


def test_save_figures_writes_png_and_plotly_json(tmp_path):
    written = save_figures(tmp_path, COUNTS, ROC, 0.95, "test")
    assert sorted(path.name for path in written) == [
        "confusion_matrix.json",
        "confusion_matrix.png",
        "roc_curve.json",
        "roc_curve.png",
    ]
    assert (tmp_path / "roc_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        json.loads((tmp_path / "confusion_matrix.json").read_text())["data"][0]["type"] == "heatmap"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_a_figure_that_fails_half_way_leaves_the_old_one_and_no_partial_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    (tmp_path / "confusion_matrix.png").write_bytes(b"old figure")

    def fail_half_way(self, path, **options):
        Path(path).write_bytes(b"half a PNG")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", fail_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_figures(tmp_path, COUNTS, ROC, 0.95, "test")
    assert (tmp_path / "confusion_matrix.png").read_bytes() == b"old figure"
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "confusion_matrix.json",
        "confusion_matrix.png",
    ]


def test_reliability_diagram_labels_its_axes_and_names_the_ece():
    import numpy as np

    from malaria_classifier.calibration import reliability_bins
    from malaria_classifier.plots import reliability_diagram

    labels = np.array([1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.3, 0.6, 0.95])
    figure = reliability_diagram({"calibrated": reliability_bins(labels, scores).to_dict()}, "test")
    axis = figure.axes[0]
    assert axis.get_xlabel().startswith("Confidence of the chosen label")
    assert axis.get_ylabel().startswith("Accuracy")
    assert "ECE" in axis.get_legend().get_texts()[1].get_text()


@pytest.mark.parametrize("kind", ["confusion", "roc"])
def test_png_titles_fit_inside_the_figure(kind):
    """The positive class ends the title: a title cut at the edge loses it."""
    figure = (
        confusion_matrix_figure(COUNTS, "validation", 0.5491)
        if kind == "confusion"
        else roc_curve_figure(ROC, 0.95, "validation")
    )
    figure.canvas.draw()
    title = figure.axes[0].title
    box = title.get_window_extent(figure.canvas.get_renderer())
    assert box.x0 >= 0 and box.x1 <= figure.bbox.width
    assert "positive class: Parasitized" in title.get_text()
    assert "threshold 0.549" in title.get_text() or kind == "roc"


def test_saved_plotly_json_reads_back_to_the_counts_and_curve(tmp_path):
    import plotly.io

    save_figures(tmp_path, COUNTS, ROC, 0.95, "test", 0.549)
    matrix = plotly.io.read_json(tmp_path / "confusion_matrix.json")
    assert [list(row) for row in matrix.data[0].z] == COUNTS  # rows true, columns predicted
    assert list(matrix.data[0].y) == ["Uninfected", "Parasitized"]
    assert "threshold 0.549" in matrix.layout.title.text
    roc = plotly.io.read_json(tmp_path / "roc_curve.json")
    assert list(roc.data[0].x) == ROC["false_positive_rate"]
    assert list(roc.data[0].y) == ROC["true_positive_rate"]
    assert list(roc.data[0].customdata) == ROC["thresholds"]
