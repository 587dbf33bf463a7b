"""``POST /api/predict``: the dashboard's predictions for scripts and other tools.

Send one or more files as multipart form fields named ``file``; the answer is a JSON list
with the fields of ``malaria predict --format json`` (``path`` is the uploaded file name),
one object per file, in order. A file that fails gets its own ``error`` and the rest are
still classified, as in the upload box.

    curl -F file=@cell.png http://127.0.0.1:8050/api/predict
"""

from __future__ import annotations

from dataclasses import asdict

from flask import Flask, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from malaria_classifier.dashboard.uploads import (
    Upload,
    UploadLimits,
    check_kind,
    classify_uploads,
    row_from_result,
    too_large_message,
)
from malaria_classifier.prediction import OUTPUT_COLUMNS

API_PATH = "/api/predict"


def register_api(server: Flask, predictor, limits: UploadLimits) -> None:
    """Add the JSON endpoint to the Flask server under the Dash app."""

    @server.errorhandler(RequestEntityTooLarge)
    def _too_large(_error):
        message = (
            f"The request is larger than {limits.request_bytes():,} bytes. Send at most "
            f"{limits.describe()}, or split the batch into several requests."
        )
        return jsonify({"error": message}), 413

    @server.post(API_PATH)
    def _predict():
        files = request.files.getlist("file")
        if not files:
            message = (
                "No file received. Send images as multipart form fields named 'file', e.g. "
                "curl -F file=@cell.png http://127.0.0.1:8050/api/predict"
            )
            return jsonify({"error": message}), 400
        uploads = [read_uploaded_file(item, index, limits) for index, item in enumerate(files)]
        results = classify_uploads(predictor, uploads, with_images=False)
        rows = [row_from_result(asdict(result)) for result in results]
        return jsonify(
            [{column: getattr(row, column) for column in OUTPUT_COLUMNS} for row in rows]
        )


def read_uploaded_file(item, index: int, limits: UploadLimits) -> Upload:
    """Read one multipart file, never more than the per-file limit plus one byte."""
    name = item.filename or f"file {index + 1}"
    if index >= limits.max_files:
        return Upload(name, None, f"{name}: not classified, over {limits.max_files} files.")
    error = check_kind(name)
    if error:
        return Upload(name, None, error)
    data = item.stream.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        return Upload(name, None, too_large_message(name, len(data), limits))
    return Upload(name, data)
