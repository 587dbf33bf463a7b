"""Confusion matrix and ROC curve as Plotly figures (for the dashboard) and PNG files.

Compute, then render: these functions take results from :mod:`evaluation`, return
figures, and never show them; the caller decides where to save.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS  # noqa: E402
from malaria_classifier.outputs import open_output, written_in_full  # noqa: E402


def _title(kind: str, split: str, threshold: float | None = None, lines: bool = False) -> str:
    """Kind, split, threshold and positive class; ``lines`` puts the last two on a
    second line, as a PNG's fixed width cut the positive class off a one-line title."""
    if lines:
        at = "" if threshold is None else f"threshold {threshold:.3f}, "
        return f"{kind}, {split} split\n{at}positive class: {POSITIVE_CLASS}"
    at = "" if threshold is None else f", threshold {threshold:.3f}"
    return f"{kind}, {split} split{at} (positive class: {POSITIVE_CLASS})"


def confusion_matrix_plotly(
    counts: list[list[int]], split: str, threshold: float | None = None
) -> go.Figure:
    """Heat map with rows = true class, columns = predicted class, counts in cells.

    ``threshold`` (the P(Parasitized) the counts were cut at) goes into the title: the
    same cells give other counts at 0.5 than at a model's operating threshold.
    """
    figure = go.Figure(
        go.Heatmap(
            z=counts,
            x=list(CLASS_NAMES),
            y=list(CLASS_NAMES),
            text=[[str(value) for value in row] for row in counts],
            texttemplate="%{text}",
            colorscale="Blues",
            showscale=False,
            hovertemplate="true %{y}<br>predicted %{x}<br>%{z} cells<extra></extra>",
        )
    )
    figure.update_layout(
        title=_title("Confusion matrix (cells)", split, threshold),
        xaxis_title="Predicted class",
        yaxis_title="True class",
        yaxis_autorange="reversed",
    )
    return figure


def roc_curve_plotly(roc: dict[str, list[float]], auc: float, split: str) -> go.Figure:
    """ROC curve with the chance diagonal; hovering shows the threshold."""
    figure = go.Figure()
    figure.add_trace(
        go.Scatter(
            x=roc["false_positive_rate"],
            y=roc["true_positive_rate"],
            customdata=roc["thresholds"],
            mode="lines",
            name=f"model (AUC = {auc:.4f})",
            hovertemplate="FPR %{x:.3f}<br>TPR %{y:.3f}<br>threshold %{customdata:.3f}"
            "<extra></extra>",
        )
    )
    figure.add_trace(
        go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"dash": "dash"})
    )
    figure.update_layout(
        title=_title("ROC curve (cells)", split),
        xaxis_title="False positive rate (1 - specificity)",
        yaxis_title="True positive rate (sensitivity)",
    )
    return figure


def confusion_matrix_figure(
    counts: list[list[int]], split: str, threshold: float | None = None
) -> Figure:
    """Matplotlib version of :func:`confusion_matrix_plotly` for the PNG file."""
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.imshow(counts, cmap="Blues")
    largest = max(max(row) for row in counts) or 1
    for row in range(2):
        for column in range(2):
            value = counts[row][column]
            colour = "white" if value > largest / 2 else "black"  # readable on dark cells
            axis.text(column, row, str(value), ha="center", va="center", color=colour)
    axis.set_xticks([0, 1], labels=list(CLASS_NAMES))
    axis.set_yticks([0, 1], labels=list(CLASS_NAMES))
    axis.set_xlabel("Predicted class")
    axis.set_ylabel("True class")
    axis.set_title(_title("Confusion matrix (cells)", split, threshold, lines=True), fontsize=9)
    figure.tight_layout()
    return figure


def roc_curve_figure(roc: dict[str, list[float]], auc: float, split: str) -> Figure:
    """Matplotlib version of :func:`roc_curve_plotly` for the PNG file."""
    figure, axis = plt.subplots(figsize=(5, 4.5))
    axis.plot(roc["false_positive_rate"], roc["true_positive_rate"], label=f"AUC = {auc:.4f}")
    axis.plot([0, 1], [0, 1], linestyle="--", label="chance")
    axis.set_xlabel("False positive rate (1 - specificity)")
    axis.set_ylabel("True positive rate (sensitivity)")
    axis.set_title(_title("ROC curve (cells)", split, lines=True), fontsize=9)
    axis.legend(loc="lower right")
    figure.tight_layout()
    return figure


def save_figures(
    output_dir: Path,
    counts: list[list[int]],
    roc: dict[str, list[float]] | None,
    auc: float | None,
    split: str,
    threshold: float | None = None,
) -> list[Path]:
    """Write confusion matrix and ROC curve as PNG and Plotly JSON; returns the paths.

    ``threshold`` is the one the confusion matrix's counts were cut at (in its title).
    Without a ROC curve (``roc`` None: cells of one class only) only the matrix is written.
    """
    written = []
    figures = [
        (
            "confusion_matrix",
            confusion_matrix_plotly(counts, split, threshold),
            confusion_matrix_figure(counts, split, threshold),
        )
    ]
    if roc is not None and auc is not None:
        figures.append(
            ("roc_curve", roc_curve_plotly(roc, auc, split), roc_curve_figure(roc, auc, split))
        )
    for stem, plotly_figure, matplotlib_figure in figures:
        json_path = output_dir / f"{stem}.json"
        with open_output(json_path) as handle:
            handle.write(plotly_figure.to_json())
        png_path = output_dir / f"{stem}.png"
        with written_in_full(png_path) as temporary:
            matplotlib_figure.savefig(temporary, dpi=120, format="png")
        plt.close(matplotlib_figure)
        written += [json_path, png_path]
    return written


def reliability_diagram(
    bins_by_name: dict[str, dict], split: str, axis: plt.Axes | None = None
) -> Figure:
    """Accuracy against confidence per bin, one line per score set, with the diagonal.

    Args:
        bins_by_name: ``{"uncalibrated": bins, "calibrated": bins}``, each the dict form of
            :class:`malaria_classifier.calibration.ReliabilityBins`.
        split: Named in the title.
        axis: Draw here instead of on a new figure.
    """
    if axis is None:
        figure, axis = plt.subplots(figsize=(5, 5))
    else:
        figure = axis.figure
    lowest = min(
        [0.5]
        + [
            value
            for bins in bins_by_name.values()
            for value, count in zip(bins["mean_confidence"], bins["counts"], strict=True)
            if count > 0
        ]
    )
    axis.plot(
        [lowest, 1.0], [lowest, 1.0], color="grey", linestyle="--", label="perfect calibration"
    )
    for name, bins in bins_by_name.items():
        points = [
            (confidence, accuracy)
            for confidence, accuracy, count in zip(
                bins["mean_confidence"], bins["accuracy"], bins["counts"], strict=True
            )
            if count > 0
        ]
        ece = bins["expected_calibration_error"]
        axis.plot(*zip(*points, strict=True), marker="o", label=f"{name} (ECE {ece:.4f})")
    axis.set_xlabel("Confidence of the chosen label (bin mean)")
    axis.set_ylabel("Accuracy (fraction of cells right)")
    axis.set_title(f"Reliability, {split} split (cells)")
    axis.legend(loc="upper left")
    return figure
