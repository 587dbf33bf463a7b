"""Export a trained model for servers and phones: SavedModel, TFLite or ONNX.

Every export takes what the Keras model takes — a uint8 batch ``image`` of shape
``(n, size, size, 3)``, raw RGB 0-255, prepared as in
:func:`malaria_classifier.images.load_for_model` — and returns the 2-way softmax
(index 1 = P(Parasitized)). Normalization is inside the graph; preparing a picture is
not: a crop that keeps the smear around the cell must first be cut down to its cell on
black (:func:`malaria_classifier.background.isolate_cell`, a numpy step no graph
holds), then resized with black padding. Left on its smear, a healthy cell scores as
parasitized (10 of 10 healthy NIH cells pasted on a pink smear: 0.75–0.99), so the
export card says so.

- ``saved_model``: a folder for TensorFlow Serving (signature ``serving_default``).
- ``tflite``: a LiteRT flatbuffer for phones and small devices (float32, not quantized,
  so it agrees with Keras within 1e-4).
- ``onnx``: for ONNX Runtime on servers; converted with tf2onnx from a ``tf.function``
  because tf2onnx's ``from_keras`` does not support Keras 3 models.

A ``<output>.model_card.json`` next to the export records the class order, threshold
and input contract, which a serving stack needs and the graph cannot carry.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from malaria_classifier.constants import (
    CLASS_NAMES,
    DEFAULT_THRESHOLD,
    POSITIVE_CLASS,
    POSITIVE_INDEX,
)
from malaria_classifier.images import sha256_of_file
from malaria_classifier.model import INPUT_NAME
from malaria_classifier.model_card import read_model_card, write_json_atomically

EXPORT_FORMATS: tuple[str, ...] = ("saved_model", "tflite", "onnx")
ONNX_OUTPUT_NAME = "probabilities"
ONNX_FEATURES_NAME = "features"
ONNX_OPSET = 17
_SUFFIXES = {"saved_model": "_saved_model", "tflite": ".tflite", "onnx": ".onnx"}


@dataclass
class ExportResult:
    """Where an export went and how big it is."""

    path: Path
    card_path: Path
    export_format: str
    size_bytes: int


def check_export_format(export_format: str) -> str:
    """Return ``export_format`` if it is known.

    Raises:
        ValueError: Naming the value and the accepted formats.
    """
    if export_format not in EXPORT_FORMATS:
        raise ValueError(
            f"Unknown export format {export_format!r}; use one of {', '.join(EXPORT_FORMATS)}."
        )
    return export_format


def default_export_path(model_path: Path, export_format: str) -> Path:
    """``model.keras`` -> ``model.onnx`` / ``model.tflite`` / ``model_saved_model/``."""
    check_export_format(export_format)
    return Path(model_path.stem + _SUFFIXES[export_format])


def inference_function(model):
    """The model as a ``tf.function`` with a named uint8 input and a free batch size."""
    import tensorflow as tf

    size = int(model.input_shape[1])
    signature = [tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)]

    @tf.function(input_signature=signature)
    def infer(image):
        return model(image, training=False)

    return infer


def save_saved_model(model, folder: Path) -> None:
    """Write a TensorFlow SavedModel (``serving_default`` takes ``image``, uint8)."""
    model.export(str(folder), format="tf_saved_model", verbose=False)


def convert_to_tflite(model) -> bytes:
    """Convert to a float32 TFLite flatbuffer (through a temporary SavedModel).

    Going through the SavedModel keeps every weight and avoids the console dump of
    captured tensors that ``TFLiteConverter.from_keras_model`` prints for Keras 3.
    """
    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="malaria-export-") as folder:
        save_saved_model(model, Path(folder) / "saved_model")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(folder) / "saved_model"))
        return bytes(converter.convert())


def convert_to_onnx(model) -> bytes:
    """Convert to an ONNX model (opset 17) whose outputs have readable names.

    A one-output model's output is named ``probabilities``; the two-output feature
    model of :func:`malaria_classifier.ood.feature_model` gets ``probabilities`` and
    ``features``, in that order.

    Raises:
        ValueError: If tf2onnx is not installed.
    """
    try:
        import tf2onnx
    except ImportError:
        raise ValueError(
            "ONNX export needs the tf2onnx package, a dependency of malaria-classifier: "
            "reinstall it (pip install tf2onnx)."
        ) from None
    infer = inference_function(model)
    proto, _ = tf2onnx.convert.from_function(
        infer, input_signature=infer.input_signature, opset=ONNX_OPSET
    )
    names = [ONNX_OUTPUT_NAME, ONNX_FEATURES_NAME][: len(proto.graph.output)]
    for index, name in enumerate(names):
        _rename_graph_output(proto.graph, index, name)
    return proto.SerializeToString()


def _rename_graph_output(graph, index: int, name: str) -> None:
    """Give an output a readable name (tf2onnx calls them ``Identity:0``, ``Identity_1:0``)."""
    old_name = graph.output[index].name
    for node in graph.node:
        node.output[:] = [name if output == old_name else output for output in node.output]
        node.input[:] = [name if value == old_name else value for value in node.input]
    graph.output[index].name = name


def export_model(model_path: str | Path, export_format: str, output: str | Path) -> ExportResult:
    """Export a ``.keras`` model as a SavedModel folder, a ``.tflite`` or an ``.onnx`` file.

    Example:
        >>> export_model("runs/default/model.keras", "onnx", "model.onnx")  # doctest: +SKIP
        ExportResult(path=PosixPath('model.onnx'), ..., export_format='onnx', size_bytes=...)

    Args:
        model_path: A model written by ``malaria train`` (or the bundled default).
        export_format: ``saved_model``, ``tflite`` or ``onnx``.
        output: The file (tflite, onnx) or folder (saved_model) to create.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: For an unknown format, a missing or unreadable model, or a missing
            optional package.
        FileExistsError: If ``output`` exists (exports never overwrite).
    """
    from malaria_classifier.model import load_model

    check_export_format(export_format)
    model_path, output = Path(model_path), Path(output)
    _check_export_name(output, export_format)
    card_path = output.with_name(output.name + ".model_card.json")
    for path in (output, card_path):
        if path.exists() or path.is_symlink():
            # The card is written after the model: a model without its card is what an
            # export killed between the two leaves behind.
            unfinished = path == output and not card_path.exists()
            raise FileExistsError(
                f"{path} already exists"
                + (f" without its {card_path.name} (an interrupted export?)" if unfinished else "")
                + "; remove it or choose another --output (exports never overwrite)."
            )
    model = load_model(str(model_path))
    output.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "saved_model":
        _write_folder_atomically(model, output)
    else:
        convert = convert_to_tflite if export_format == "tflite" else convert_to_onnx
        _write_bytes_atomically(convert(model), output)
    write_json_atomically(_export_card(model, model_path, export_format, output), card_path)
    return ExportResult(output, card_path, export_format, _size_on_disk(output))


def _write_folder_atomically(model, output: Path) -> None:
    # Folders of earlier exports to this name that were killed before their rename.
    for leftover in output.parent.glob(f".{output.name}.*"):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        save_saved_model(model, temporary / "saved_model")
        (temporary / "saved_model").rename(output)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _check_export_name(output: Path, export_format: str) -> None:
    """Refuse a name that says another format (``--format onnx --output m.tflite``):
    a serving stack picks its loader by the name, and would fail on the wrong bytes."""
    suffix = output.suffix.lower()
    known = {".onnx": "onnx", ".tflite": "tflite", ".keras": "keras", ".h5": "keras"}
    if suffix in known and known[suffix] != export_format:
        expected = _SUFFIXES[export_format]
        raise ValueError(
            f"--output {output} is named like a {known[suffix]} model but --format is "
            f"{export_format}. Name it {output.stem}{expected} (or change --format)."
        )


def _write_bytes_atomically(data: bytes, output: Path) -> None:
    temporary = output.with_name(f".{output.name}.partial")
    try:
        temporary.write_bytes(data)
        temporary.replace(output)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror, str(output)) from None


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _export_card(model, model_path: Path, export_format: str, output: Path) -> dict:
    """What a serving stack must know that the graph does not say."""
    card = read_model_card(model_path)
    size = int(model.input_shape[1])
    return {
        "format": export_format,
        "file": output.name,
        "source_model": str(model_path),
        "source_model_sha256": sha256_of_file(model_path),
        "input": {
            "name": INPUT_NAME,
            "shape": [None, size, size, 3],
            "dtype": "uint8",
            "pixels": "raw RGB 0-255; normalization is inside the model",
            "resize": "longer side scaled to the input side (bilinear), padded with black",
            "before_resize": (
                "a crop that keeps the smear around the cell must first be cut down to its "
                "cell on black (malaria_classifier.background.isolate_cell, as "
                "malaria_classifier.images.resize_with_pad does); NIH-style crops on black "
                "need nothing. Without it a cell on its smear is scored wrongly."
            ),
        },
        "output": {
            # ONNX: the graph output; SavedModel and TFLite: the serving_default signature's.
            "name": ONNX_OUTPUT_NAME if export_format == "onnx" else "output_0",
            "shape": [None, len(CLASS_NAMES)],
            "meaning": f"softmax; index {POSITIVE_INDEX} = P({POSITIVE_CLASS})",
        },
        "class_order": list(CLASS_NAMES),
        "positive_class": POSITIVE_CLASS,
        "decision_threshold": card.get("decision_threshold", DEFAULT_THRESHOLD),
        "calibration": _calibration_recipe(card),
        "not_included": "cutting a cell out of a smear background (see input.before_resize), "
        "the Not-a-cell check and the Uncertain band of `malaria predict` "
        "(they need the penultimate features and ood.json); serve the .keras model with "
        "malaria-classifier to get them",
        "model_card": card,
    }


def _calibration_recipe(card: dict) -> dict | None:
    """How to turn the exported softmax into the calibrated P(Parasitized) the threshold expects."""
    calibration = card.get("calibration")
    if not calibration:
        return None
    return {
        "temperature": calibration["temperature"],
        "apply": "P = 1 / (1 + exp(-(log(softmax[1]) - log(softmax[0])) / temperature)); "
        "call Parasitized when P >= decision_threshold",
    }
