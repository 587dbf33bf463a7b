"""``malaria dashboard`` and ``malaria export``: put a model in front of users or servers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from malaria_classifier.cli._common import _user_errors


@_user_errors
def dashboard(
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8050,
    examples: Annotated[
        Path | None, typer.Option(help="Folder of cell images shown as a gallery to try.")
    ] = None,
    debug: Annotated[
        bool, typer.Option(help="Dash debug mode (never on a shared server).")
    ] = False,
) -> None:
    """Start the web dashboard: upload cell images, see label, confidence and why.

    Open the printed address in a browser. For several workers, see the README
    (gunicorn "malaria_classifier.dashboard.wsgi:create_server()").
    """
    from malaria_classifier.dashboard import run_dashboard

    typer.echo(f"Loading the model; then open http://{host}:{port}/ (Ctrl+C stops).", err=True)
    run_dashboard(model=model, host=host, port=port, examples=examples, debug=debug)


@_user_errors
def export(
    export_format: Annotated[
        str, typer.Option("--format", help="saved_model (TF Serving), tflite (phones) or onnx.")
    ],
    model: Annotated[Path | None, typer.Option(help="Model (.keras); default: bundled.")] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            help="File or folder to create; default here: <model name>.onnx / .tflite, or "
            "the folder <model name>_saved_model."
        ),
    ] = None,
) -> None:
    """Export a model for TensorFlow Serving, LiteRT (phones) or ONNX Runtime.

    The export takes raw uint8 RGB cells resized with black padding, like the model,
    and outputs the softmax (index 1 = P(Parasitized)); a .model_card.json beside it
    records the input contract, class order and threshold.
    """
    from malaria_classifier.export import check_export_format, default_export_path, export_model
    from malaria_classifier.model_card import default_model_path

    check_export_format(export_format)
    model_path = model or default_model_path()
    result = export_model(
        model_path, export_format, output or default_export_path(model_path, export_format)
    )
    typer.echo(
        f"Exported {model_path} as {export_format}: {result.path} "
        f"({result.size_bytes / 1e6:.2f} MB); serving contract in {result.card_path}"
    )
