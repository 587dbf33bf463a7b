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

- ``saved_model``: a folder for TensorFlow Serving (signature ``serving_default``),
  which loads it as a numbered version: ``<model_base_path>/1/``.
- ``tflite``: a LiteRT flatbuffer for phones and small devices (float32, not quantized,
  so it agrees with Keras within 1e-4).
- ``onnx``: for ONNX Runtime on servers; converted with tf2onnx from a ``tf.function``
  because tf2onnx's ``from_keras`` does not support Keras 3 models.

A ``<output>.model_card.json`` next to the export records the class order, threshold
and input contract, which a serving stack needs and the graph cannot carry.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
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
# SavedModel and TFLite name their tensors inside this signature (`image` -> `output_0`).
SIGNATURE_NAME = "serving_default"
# Ends the name of the folder a SavedModel is written into before its rename, so that a
# later export clears only folders it made itself (a killed export leaves one).
_PARTIAL_FOLDER_SUFFIX = ".export-partial"

LOGGER = logging.getLogger(__name__)


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

    Everything that can be checked is checked before the model is converted: the
    output name, that neither it nor its card exists, that its folder can be written,
    and that the model card beside the model describes this model. The export is
    written under a temporary name and renamed, then its card, so an interrupted
    export leaves no half-written file or folder under ``output``.

    Example:
        >>> export_model("runs/default/model.keras", "onnx", "model.onnx")  # doctest: +SKIP
        ExportResult(path=PosixPath('model.onnx'), ..., export_format='onnx', size_bytes=...)

    Args:
        model_path: A model written by ``malaria train`` (or the bundled default).
        export_format: ``saved_model``, ``tflite`` or ``onnx``.
        output: The file (tflite, onnx) or folder (saved_model) to create; missing
            folders above it are created.

    Returns:
        An :class:`ExportResult`.

    Raises:
        ValueError: For an unknown format, an output named for another format or in a
            folder that cannot be written, a missing or unreadable model, or a model
            card that describes another model.
        FileExistsError: If ``output`` or its card exists (exports never overwrite).
    """
    from malaria_classifier.model import load_model

    check_export_format(export_format)
    model_path, output = Path(model_path), Path(output)
    _check_export_name(output, export_format)
    card_path = output.with_name(output.name + ".model_card.json")
    _check_nothing_there(output, card_path, export_format)
    _check_writable_folder(output)
    model = load_model(str(model_path))
    source_card = _read_source_card(model_path)
    card = _export_card(model, model_path, source_card, export_format, output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if export_format == "saved_model":
        _write_folder_atomically(model, output)
    else:
        convert = convert_to_tflite if export_format == "tflite" else convert_to_onnx
        write_bytes_atomically(convert(model), output)
    write_json_atomically(card, card_path)
    return ExportResult(output, card_path, export_format, _size_on_disk(output))


def _check_nothing_there(output: Path, card_path: Path, export_format: str) -> None:
    """Refuse an output (or its card) that exists, naming all of what is in the way."""
    existing = [path for path in (output, card_path) if path.exists() or path.is_symlink()]
    if not existing:
        return
    advice = "choose another --output (exports never overwrite)"
    if output.is_dir() and export_format != "saved_model":
        raise FileExistsError(
            f"--output {output} is a folder; a {export_format} export is one file. Give a "
            f"file name inside it (e.g. {output / ('model' + _SUFFIXES[export_format])}) or "
            f"{advice}."
        )
    if existing == [output] and _looks_like_an_export(output, export_format):
        # The card is written after the export: an export without its card is what an
        # export killed between the two leaves behind.
        raise FileExistsError(
            f"{output} already exists without its {card_path.name} (an interrupted "
            f"export?); remove it or {advice}."
        )
    names = " and ".join(str(path) for path in existing)
    verb = "exists" if len(existing) == 1 else "exist"
    pronoun = "it" if len(existing) == 1 else "them"
    raise FileExistsError(f"{names} already {verb}; remove {pronoun} or {advice}.")


def _looks_like_an_export(path: Path, export_format: str) -> bool:
    if export_format == "saved_model":
        return (path / "saved_model.pb").is_file()
    return path.is_file()


def _check_writable_folder(output: Path) -> None:
    """The output's folder (or, when it is still to be made, the folder that will hold it)
    must be a folder this process may write, before any time is spent converting."""
    folder = Path(os.path.abspath(output)).parent
    while not (folder.exists() or folder.is_symlink()) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(
            f"--output {output}: {folder} is a file, not a folder, so nothing can be "
            f"written under it. Choose an --output in a folder."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"--output {output}: the folder {folder} is not writable (read-only, or "
            f"another user's). Choose an --output in a folder you can write to."
        )


def _read_source_card(model_path: Path) -> dict:
    """The model card beside the model, refused when it describes another model.

    Its threshold and temperature go into the export card, where a serving stack takes
    them on trust: those of another model would give wrong calls with nothing to show it.
    """
    from malaria_classifier.decision import check_same_fit
    from malaria_classifier.model_card import card_path_for

    card = read_model_card(model_path)
    if not card:
        LOGGER.warning(
            "%s has no model card (%s beside it): the export card records the raw softmax "
            "threshold %s, no calibration and no training record. Export a model from a "
            "`malaria train` run folder (calibrated with `malaria calibrate`) to ship them.",
            model_path,
            card_path_for(model_path).name,
            DEFAULT_THRESHOLD,
        )
        return card
    described = card.get("model_sha256")  # cards written before this record have none
    if described is not None and described != sha256_of_file(model_path):
        raise ValueError(
            f"{card_path_for(model_path)} describes another model than {model_path} "
            f"(model_sha256 differs: the model was replaced or trained further), so its "
            f"threshold and metrics would go into the export card. Put back the model it "
            f"describes, or run `malaria train --resume` on the run to write a new card."
        )
    check_same_fit(model_path, card.get("calibration") or {}, model_path, None)
    return card


def _write_folder_atomically(model, output: Path) -> None:
    _remove_killed_partial_folders(output)
    try:
        temporary = Path(
            tempfile.mkdtemp(
                prefix=f".{output.name}.", suffix=_PARTIAL_FOLDER_SUFFIX, dir=output.parent
            )
        )
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(output)) from None
    try:
        save_saved_model(model, temporary / "saved_model")
        (temporary / "saved_model").rename(output)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(output)) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _remove_killed_partial_folders(output: Path) -> None:
    """Remove the temporary folders of earlier exports to ``output`` that were killed
    before their rename: only folders named as :func:`tempfile.mkdtemp` names ours
    (compared as text: ``output`` may hold glob characters such as ``*`` or ``[``)."""
    ours = re.compile(
        re.escape(f".{output.name}.") + r"[a-z0-9_]{8}" + re.escape(_PARTIAL_FOLDER_SUFFIX)
    )
    try:
        candidates = list(output.parent.iterdir())
    except OSError:
        return
    for leftover in candidates:
        if ours.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


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


def write_bytes_atomically(data: bytes, output: Path) -> None:
    """Write ``output`` whole or not at all: a temporary file beside it, then a rename.

    On an error or Ctrl+C the temporary file is removed; an error names ``output``.
    """
    temporary = output.with_name(f".{output.name}.partial")
    try:
        temporary.write_bytes(data)
        temporary.replace(output)
    except BaseException as error:  # Ctrl+C too: no partial file is left behind
        # A read-only folder refuses even removing a file that is not there.
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, str(output)) from None
        raise


def _size_on_disk(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size


def _export_card(model, model_path: Path, card: dict, export_format: str, output: Path) -> dict:
    """What a serving stack must know that the graph does not say."""
    size = int(model.input_shape[1])
    export_card = {
        "format": export_format,
        "file": output.name,
        "source_model": str(model_path),
        "source_model_sha256": sha256_of_file(model_path),
    }
    if export_format != "onnx":
        export_card["signature"] = {
            "name": SIGNATURE_NAME,
            "note": "input.name and output.name are this signature's names; the tensors "
            "inside the graph are named otherwise (TFLite: use the signature runner, or "
            "the first input and output tensor)",
        }
    if export_format == "saved_model":
        export_card["tensorflow_serving"] = (
            f"TensorFlow Serving loads numbered versions: copy this folder to "
            f"<model_base_path>/1/ (not the folder itself as <model_base_path>), then "
            f'POST {{"signature_name": "{SIGNATURE_NAME}", "instances": [<{size}x{size}x3 '
            f"uint8 RGB>]}} to /v1/models/<name>:predict"
        )
    return {
        **export_card,
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
