"""Turn uploaded files into results: size checks, decoding, prediction, Grad-CAM.

Nothing here knows about Dash components, so the same code serves the upload box, the
example gallery and ``POST /api/predict``, and tests call it as plain functions. Every
file gets its own result; a file that fails carries an error and never stops the batch.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from malaria_classifier.decision import DECISIONS, NOT_A_CELL, PARASITIZED, UNCERTAIN
from malaria_classifier.explain import encode_png, overlay_heat_map
from malaria_classifier.images import (
    SUPPORTED_FORMATS,
    ImageLoadError,
    data_url_bytes,
    decode_image_bytes,
    resize_with_pad,
)
from malaria_classifier.prediction import PredictionRow, write_rows
from malaria_classifier.verdict import VerdictRule, drop_repeated_pictures, summarize_group

# The kinds the decoder reads (``images.SUPPORTED_FORMATS``), so its advice to re-export
# a file "as PNG, JPEG, TIFF, BMP, GIF or WebP" is never refused here.
ACCEPTED_SUFFIXES: tuple[str, ...] = (
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
    ".gif",
    ".webp",
)
ACCEPTED_KINDS = SUPPORTED_FORMATS
# The browser replaces a file that breaks a limit by this marker and its size in bytes
# (assets/uploads.js), so oversized data never travels; the server checks again anyway.
DROPPED_PREFIX = "dropped:"


@dataclass(frozen=True)
class UploadLimits:
    """How much one request may carry; checked before anything is decoded.

    The defaults fit a few thousand NIH cell crops (about 10 KB each) per batch while
    keeping one request's memory bounded on a small server.
    """

    max_file_bytes: int = 10 * 1024 * 1024
    max_files: int = 1000
    max_batch_bytes: int = 50 * 1024 * 1024

    def describe(self) -> str:
        """The limits in words, for the upload box and error messages."""
        return (
            f"{ACCEPTED_KINDS}; up to {_megabytes(self.max_file_bytes)} per file, "
            f"{self.max_files:,} files and {_megabytes(self.max_batch_bytes)} per batch"
        )

    def request_bytes(self) -> int:
        """Largest HTTP body to accept: a full batch in base64 (4/3) plus 1 MB of framing."""
        return self.max_batch_bytes * 4 // 3 + 1024 * 1024


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):g} MB"


@dataclass(frozen=True)
class Upload:
    """One file as received: its name and its bytes (or why they were refused)."""

    filename: str
    data: bytes | None
    error: str | None = None


def check_kind(filename: str) -> str | None:
    """An error message if the file name's suffix is not an accepted image kind."""
    suffix = Path(filename).suffix.lower()
    if suffix in ACCEPTED_SUFFIXES:
        return None
    shown = suffix or "no suffix"
    return f"{filename}: unsupported file kind ({shown}). Upload a cell image as {ACCEPTED_KINDS}."


def too_large_message(filename: str, size: int | None, limits: UploadLimits) -> str:
    """The message for a file over the per-file limit; ``size`` None when it was not read
    to its end (the API stops reading one byte past the limit)."""
    measured = f"is {size:,} bytes, " if size is not None else "is "
    limit = f"{limits.max_file_bytes:,} bytes"
    if limits.max_file_bytes >= 1024 * 1024:
        limit = f"{_megabytes(limits.max_file_bytes)} ({limit})"
    return (
        f"{filename}: {measured}more than the limit of {limit}. Upload single-cell crops, "
        f"not whole smear photos."
    )


def receive_browser_uploads(
    contents: Sequence[str], filenames: Sequence[str], limits: UploadLimits
) -> list[Upload]:
    """Check kinds and limits for a batch from the upload box, one :class:`Upload` each."""
    uploads: list[Upload] = []
    batch_bytes = 0
    for index, (content, filename) in enumerate(zip(contents, filenames, strict=True)):
        name = filename or f"file {index + 1}"
        if index >= limits.max_files:
            uploads.append(Upload(name, None, batch_full_message(name, limits)))
            continue
        error = check_kind(name)
        data = None
        if error is None and (content or "").startswith(DROPPED_PREFIX):
            error = _dropped_error(name, content, limits)
        elif error is None:
            try:
                data = data_url_bytes(content or "", name, limits.max_file_bytes)
            except ImageLoadError as upload_error:
                error = str(upload_error)
        if data is not None and batch_bytes + len(data) > limits.max_batch_bytes:
            data, error = None, batch_full_message(name, limits)
        batch_bytes += len(data or b"")
        uploads.append(Upload(name, data, error))
    return uploads


def _dropped_error(filename: str, content: str, limits: UploadLimits) -> str:
    """The message for a file the browser held back because it broke a limit."""
    try:
        size = int(content[len(DROPPED_PREFIX) :])
    except ValueError:
        size = 0
    if size > limits.max_file_bytes:
        return too_large_message(filename, size, limits)
    return batch_full_message(filename, limits)


def batch_full_message(filename: str, limits: UploadLimits) -> str:
    """The message for a file past the batch's file count or bytes."""
    return (
        f"{filename}: not classified, the batch limit ({limits.max_files:,} files, "
        f"{_megabytes(limits.max_batch_bytes)}) was reached. Upload the rest as another batch."
    )


def read_example(path: Path, limits: UploadLimits) -> Upload:
    """An example image from the gallery folder, read with the same checks as an upload."""
    try:
        size = path.stat().st_size
        if size > limits.max_file_bytes:
            return Upload(path.name, None, too_large_message(path.name, size, limits))
        return Upload(path.name, path.read_bytes(), check_kind(path.name))
    except OSError as error:
        return Upload(path.name, None, f"{path.name}: cannot be read ({error.strerror}).")


@dataclass
class CellResult:
    """What the dashboard shows for one file; ``error`` set means it was not classified.

    ``probability`` and ``confidence`` are calibrated when the model has a calibration;
    ``decision`` is Parasitized, Uninfected, Uncertain or Not a cell, and ``reason`` says
    why a cell is Uncertain or Not a cell.
    """

    filename: str
    label: str
    probability: float | None
    confidence: float | None
    error: str
    decision: str = ""
    reason: str = ""
    # SHA-256 of the file's bytes, shortened: the same picture sent twice (under two
    # names, or from two folders) counts once in the batch's cells and verdict.
    content_id: str = ""
    image: str | None = None  # the model's input view, as a PNG data URL
    heat_map: str | None = None  # Grad-CAM overlay on that view, as a PNG data URL


def row_from_result(result: dict[str, Any]) -> PredictionRow:
    """The fields ``malaria predict`` writes, from a stored result."""
    return PredictionRow(
        result["filename"],
        result["label"],
        result["probability"],
        result["confidence"],
        result["error"],
        result.get("decision", ""),
        reason=result.get("reason", ""),
    )


def classify_uploads(
    predictor, uploads: Sequence[Upload], explainer=None, with_images: bool = True
) -> list[CellResult]:
    """Decode, predict and (with an ``explainer``) explain a batch in one forward pass.

    Args:
        predictor: A loaded :class:`~malaria_classifier.prediction.Predictor`.
        uploads: Files from :func:`receive_browser_uploads`, :func:`read_example` or the API.
        explainer: A :class:`~malaria_classifier.explain.GradCam`, or None for no heat maps.
        with_images: Attach the model's input view as a PNG (the API does not need it).
    """
    inputs: list[np.ndarray] = []
    results: list[CellResult] = []
    for upload in uploads:
        result = CellResult(upload.filename, "", None, None, upload.error or "")
        if upload.error is None:
            result.content_id = hashlib.sha256(upload.data or b"").hexdigest()[:32]
            try:
                image = decode_image_bytes(upload.data or b"", upload.filename)
                inputs.append(resize_with_pad(image, predictor.image_size))
            except ImageLoadError as error:
                result.error = str(error)
        results.append(result)
    if inputs:
        _fill_predictions(predictor, results, np.stack(inputs), explainer, with_images)
    return results


def _fill_predictions(
    predictor, results: list[CellResult], batch: np.ndarray, explainer, with_images: bool
) -> None:
    classified = [result for result in results if not result.error]
    rows = predictor.predict_images(list(batch), [result.filename for result in classified])
    heat_maps = explainer(batch) if explainer is not None else None
    for index, (result, row) in enumerate(zip(classified, rows, strict=True)):
        result.label, result.probability, result.confidence = (
            row.label,
            row.probability,
            row.confidence,
        )
        result.decision, result.reason = row.decision, row.reason
        if with_images:
            result.image = png_data_url(batch[index])
        if heat_maps is not None:
            result.heat_map = png_data_url(overlay_heat_map(batch[index], heat_maps[index]))


def add_heat_maps(explainer, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results (as stored in the browser) with Grad-CAM overlays added where missing.

    The stored model-input view is lossless PNG, so the map explains exactly the pixels
    that were classified.
    """
    missing = [
        index
        for index, result in enumerate(results)
        if result.get("image") and not result.get("heat_map")
    ]
    if not missing:
        return results
    batch = np.stack([decode_data_url_image(results[index]["image"]) for index in missing])
    heat_maps = explainer(batch)
    updated = [dict(result) for result in results]
    for position, index in enumerate(missing):
        updated[index]["heat_map"] = png_data_url(
            overlay_heat_map(batch[position], heat_maps[position])
        )
    return updated


def png_data_url(image: np.ndarray) -> str:
    """A uint8 RGB array as a ``data:image/png;base64`` URL for an ``<img>`` tag."""
    return "data:image/png;base64," + base64.b64encode(encode_png(image)).decode("ascii")


def decode_data_url_image(url: str) -> np.ndarray:
    """The RGB array back from :func:`png_data_url` (our own stored images only)."""
    data = base64.b64decode(url.partition(";base64,")[2])
    return decode_image_bytes(data, "<stored image>")


def results_to_dicts(results: Iterable[CellResult]) -> list[dict[str, Any]]:
    """JSON-ready results for a ``dcc.Store``."""
    return [asdict(result) for result in results]


def batch_summary(
    results: Sequence[dict[str, Any]], verdict_rule: VerdictRule | None = None
) -> dict[str, Any]:
    """Counts per decision, the parasitized share, and a verdict for the batch.

    The share estimates parasitemia (infected red cells per 100) only when the batch is
    every cell of a field; with Uncertain cells it is a range (``parasitized_share`` to
    ``parasitized_share_high``), since each of them may go either way. The verdict
    applies only when the batch holds one patient's cells, and is left out when no cell
    is usable. Files that failed or are "Not a cell" are not counted as cells, and a
    picture sent more than once (same bytes) counts once (``repeated_files`` says how
    many files repeated an earlier one): one suspicious cell sent three times must not
    make a positive patient. ``decisions`` counts files. ``duplicate_names`` counts the
    names sent more than once (the browser sends no folders, so such files cannot be
    told apart).
    """
    rows = [row_from_result(result) for result in results]
    distinct, repeated = drop_repeated_pictures(
        rows, (result.get("content_id") or None for result in results)
    )
    usable = [row for row in distinct if not row.error and row.decision != NOT_A_CELL]
    counts = {decision: sum(row.decision == decision for row in rows) for decision in DECISIONS}
    parasitized = sum(row.decision == PARASITIZED for row in usable)
    uncertain = sum(row.decision == UNCERTAIN for row in usable)
    names = Counter(row.path for row in rows)
    summary: dict[str, Any] = {
        "files": len(rows),
        "failed": sum(bool(row.error) for row in rows),
        "cells": len(usable),
        "repeated_files": repeated,
        "decisions": counts,
        "parasitized_share": parasitized / len(usable) if usable else None,
        # Every Uncertain cell parasitized: the top of the range the share lies in.
        "parasitized_share_high": (parasitized + uncertain) / len(usable) if usable else None,
        "duplicate_names": {name: count for name, count in names.items() if count > 1},
        "verdict": None,
    }
    if verdict_rule is not None and usable:
        verdict = summarize_group("batch", usable, verdict_rule)
        summary["verdict"] = {
            "verdict": verdict.verdict,
            "confidence": verdict.confidence,
            "min_cells": verdict_rule.min_cells,
            "min_suspicious_cells": verdict_rule.min_suspicious_cells,
        }
    return summary


def results_csv(results: Sequence[dict[str, Any]]) -> str:
    """The batch as CSV, written by the same code as ``malaria predict`` (same columns).

    Uploaded file names come from anyone who can reach the page and this file is opened
    in spreadsheets, so a name or message that a spreadsheet would run as a formula
    (``=``, ``+``, ``-``, ``@``, tab, carriage return first) is written with a leading
    ``'`` (OWASP's advice for CSV injection).
    """
    buffer = io.StringIO()
    write_rows((_spreadsheet_safe_row(result) for result in results), buffer, "csv")
    return buffer.getvalue()


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would read it as a formula."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _spreadsheet_safe_row(result: dict[str, Any]) -> PredictionRow:
    row = row_from_result(result)
    return replace(row, path=spreadsheet_safe(row.path), error=spreadsheet_safe(row.error))
