"""``POST /api/predict``: the dashboard's predictions for scripts and other tools.

Send one or more files as multipart form fields named ``file``; the answer is a JSON list
with the fields of ``malaria predict --format json`` (``path`` is the uploaded file name),
one object per file, in order. A file that fails gets its own ``error`` and the rest are
still classified, as in the upload box; when no file at all could be classified the
status is 422 (the body still holds each file's error).

    curl -F file=@cell.png http://127.0.0.1:8050/api/predict
"""

from __future__ import annotations

from dataclasses import asdict

from flask import Flask, jsonify, request
from werkzeug.exceptions import RequestEntityTooLarge

from malaria_classifier.dashboard.uploads import (
    Upload,
    UploadLimits,
    batch_full_message,
    check_kind,
    classify_uploads,
    row_from_result,
    too_large_message,
)
from malaria_classifier.prediction import OUTPUT_COLUMNS

API_PATH = "/api/predict"


def example_call() -> str:
    """A working curl call for this server (the address the client used to reach it)."""
    return f"curl -F file=@cell.png {request.host_url.rstrip('/')}{API_PATH}"


def register_api(server: Flask, predictor, limits: UploadLimits) -> None:
    """Add the JSON endpoint to the Flask server under the Dash app."""

    # Werkzeug refuses a form of more than 1,000 parts by default, before the per-file
    # "over N files" answer could be given; room for twice the files allowed.
    server.config["MAX_FORM_PARTS"] = 2 * limits.max_files + 16

    @server.errorhandler(RequestEntityTooLarge)
    def _too_large(_error):
        size, fields = f"{limits.request_bytes():,} bytes", f"{2 * limits.max_files:,} form fields"
        if request.content_length is None:  # chunked: the size was never announced
            cause = f"The request is larger than {size} or has more than {fields}."
        elif request.content_length > limits.request_bytes():
            cause = f"The request is larger than {size}."
        else:
            cause = f"The request has more than {fields}."
        message = (
            f"{cause} Send at most {limits.max_files:,} files and "
            f"{limits.max_batch_bytes // (1024 * 1024)} MB per request (each file up to "
            f"{limits.max_file_bytes // (1024 * 1024)} MB), or split the batch into "
            f"several requests."
        )
        return jsonify({"error": message}), 413

    # Flask's automatic OPTIONS answer would list every method routed here, the wrong
    # ones included; the API's own says what is allowed.
    allowed = {"Allow": "POST, OPTIONS"}

    @server.route(
        API_PATH, methods=["GET", "PUT", "PATCH", "DELETE"], provide_automatic_options=False
    )
    def _wrong_method():
        message = f"Use POST with multipart form fields named 'file', e.g. {example_call()}"
        return jsonify({"error": message}), 405, allowed

    @server.route(API_PATH, methods=["OPTIONS"], provide_automatic_options=False)
    def _options():
        return "", 204, allowed

    any_method = ["GET", "POST", "PUT", "PATCH", "DELETE"]

    @server.route("/api/", methods=any_method, defaults={"unknown": ""}, strict_slashes=False)
    @server.route("/api/<path:unknown>", methods=any_method)
    def _unknown(unknown):
        message = f"No API at /api/{unknown}. The API is POST {API_PATH}, e.g. {example_call()}"
        return jsonify({"error": message}), 404

    @server.route(API_PATH, methods=["POST"], provide_automatic_options=False)
    def _predict():
        files = request.files.getlist("file")
        if not files:
            message = (
                f"No file received. Send images as multipart form fields named 'file', "
                f"e.g. {example_call()}"
            )
            return jsonify({"error": message}), 400
        uploads = read_uploaded_files(files, limits)
        results = classify_uploads(predictor, uploads, with_images=False)
        rows = [row_from_result(asdict(result)) for result in results]
        body = [{column: getattr(row, column) for column in OUTPUT_COLUMNS} for row in rows]
        # As `malaria predict` exits 1 when no image could be predicted: a script that
        # checks only the status still notices that nothing was classified.
        status = 200 if any(not row.error for row in rows) else 422
        return jsonify(body), status


def read_uploaded_files(files, limits: UploadLimits) -> list[Upload]:
    """Read the multipart files in order, within the per-file and per-batch limits.

    As in the upload box, a file that would take the batch past its file count or its
    bytes gets its own error and the files before it are still classified.
    """
    uploads, batch_bytes = [], 0
    for index, item in enumerate(files):
        upload = read_uploaded_file(item, index, limits)
        size = len(upload.data or b"")
        if upload.data is not None and batch_bytes + size > limits.max_batch_bytes:
            upload = Upload(upload.filename, None, batch_full_message(upload.filename, limits))
        batch_bytes += len(upload.data or b"")
        uploads.append(upload)
    return uploads


def read_uploaded_file(item, index: int, limits: UploadLimits) -> Upload:
    """Read one multipart file, never more than the per-file limit plus one byte."""
    name = item.filename or f"file {index + 1}"
    if index >= limits.max_files:
        return Upload(name, None, batch_full_message(name, limits))
    error = check_kind(name)
    if error:
        return Upload(name, None, error)
    data = item.stream.read(limits.max_file_bytes + 1)
    if len(data) > limits.max_file_bytes:
        return Upload(name, None, too_large_message(name, None, limits))
    return Upload(name, data)
