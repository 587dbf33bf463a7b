"""Run a trained model's forward pass: Keras (TensorFlow), ONNX Runtime or LiteRT.

Every runtime is a callable ``forward(batch) -> probabilities`` that takes a uint8
batch of shape ``(n, size, size, 3)`` (raw RGB, as the model was trained) and returns
float32 softmax outputs of shape ``(n, 2)``. They are interchangeable: the exported
models are converted from the same Keras graph, and tests check that they agree with
Keras within 1e-4 on real cells.

ONNX Runtime (with tf2onnx, which converts the model in memory) is installed with
the package; on two CPU cores it runs this model's forward pass 1.2-1.6x faster than
the compiled Keras call (docs/benchmarks.md), so ``auto`` (what ``malaria predict``
uses) picks it, and falls back to Keras for a model it cannot convert. LiteRT is
optional (``pip install "malaria-classifier[export]"``).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

import numpy as np

Forward = Callable[[np.ndarray], np.ndarray]
# forward(batch) -> (softmax, penultimate features or None), for the Not-a-cell check.
ScoringForward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]

RUNTIMES: tuple[str, ...] = ("auto", "keras", "onnx", "tflite")
EXPORT_EXTRA_HINT = 'Install it with: pip install "malaria-classifier[export]".'

LOGGER = logging.getLogger(__name__)


def check_runtime(runtime: str) -> str:
    """Return ``runtime`` if it is known.

    Raises:
        ValueError: Naming the value and the accepted ones.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}.")
    return runtime


def check_batch(batch: np.ndarray, input_shape: tuple) -> np.ndarray:
    """``batch`` as the contiguous uint8 array a runtime takes, refused when it is not one.

    Casting silently would be wrong: a float batch scaled to 0-1 becomes all zeros, and
    every cell then gets the same confident score.

    Args:
        batch: Raw RGB pixels, shape ``(n, *input_shape)``: uint8, or integers 0-255.
        input_shape: The model's input shape without the batch axis; an entry that is
            not an int (a symbolic dimension) matches any size.

    Raises:
        ValueError: Naming the shape or dtype given, the one expected and how to get it.
    """
    batch = np.asarray(batch)
    expected = tuple(int(side) if isinstance(side, int) else None for side in input_shape)
    shown = "(n, " + ", ".join("?" if side is None else str(side) for side in expected) + ")"
    if batch.ndim != len(expected) + 1 or any(
        side is not None and side != actual
        for side, actual in zip(expected, batch.shape[1:], strict=True)
    ):
        raise ValueError(
            f"The model takes a batch of shape {shown}, got {batch.shape}. Prepare each "
            f"image with malaria_classifier.images.resize_with_pad (or load_for_model) "
            f"and stack them (np.stack; one image: image[None])."
        )
    if batch.dtype == np.uint8:
        return np.ascontiguousarray(batch)
    in_range = batch.dtype.kind in "iu" and (
        batch.size == 0 or (int(batch.min()) >= 0 and int(batch.max()) <= 255)
    )
    if not in_range:
        values = f" with values {batch.min():.4g}..{batch.max():.4g}" if batch.size else ""
        raise ValueError(
            f"The model takes raw RGB pixels as uint8 0-255 (it normalizes them itself), "
            f"got {batch.dtype}{values}. Pass the decoded pixels as np.uint8, not scaled "
            f"or normalized values."
        )
    return np.ascontiguousarray(batch, dtype=np.uint8)


def cpu_threads() -> int:
    """Threads for one forward pass: every core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def make_forward(model, runtime: str = "keras", threads: int | None = None) -> Forward:
    """A forward function for a loaded Keras model, run by ``runtime``.

    ``onnx`` and ``tflite`` convert the model in memory first (under a second for
    the default model), so the caller needs only the ``.keras`` file. ``threads``
    caps ONNX Runtime's and LiteRT's threads (default: every core); TensorFlow's are
    set process-wide, so Keras ignores it.

    Raises:
        ValueError: For an unknown runtime, or one whose package is not installed.
    """
    check_runtime(runtime)
    if runtime == "auto":
        scoring = make_best_scoring_forward(model, runtime, threads=threads)[0]
        return lambda batch: scoring(batch)[0]
    if runtime == "keras":
        return keras_forward(model)
    from malaria_classifier.export import convert_to_onnx, convert_to_tflite

    if runtime == "onnx":
        return onnx_forward(convert_to_onnx(model), threads)
    return tflite_forward(convert_to_tflite(model), threads)


def make_best_scoring_forward(
    model, runtime: str = "auto", with_features: bool = False, threads: int | None = None
) -> tuple[ScoringForward, str]:
    """Like :func:`make_scoring_forward`, resolving ``auto``; returns the runtime used too.

    ``auto`` means ONNX Runtime, the fastest forward pass on a CPU, unless the model
    cannot be converted or onnxruntime/tf2onnx are missing: then Keras, with a
    warning that says why (the results are the same within 1e-4; only speed differs).
    """
    check_runtime(runtime)
    if runtime != "auto":
        return make_scoring_forward(model, runtime, with_features, threads), runtime
    try:
        return make_scoring_forward(model, "onnx", with_features, threads), "onnx"
    except Exception as error:  # any conversion failure: Keras still gives the results
        LOGGER.warning(
            "ONNX Runtime is not available for this model (%s); using Keras, which gives "
            "the same results more slowly.",
            error,
        )
        return make_scoring_forward(model, "keras", with_features), "keras"


def make_scoring_forward(
    model, runtime: str = "keras", with_features: bool = False, threads: int | None = None
) -> ScoringForward:
    """A forward function returning softmax and, when asked, the penultimate features.

    The features come out of the same pass (a two-output graph), so the "Not a cell"
    check costs no second forward pass. Keras and ONNX Runtime can give them; LiteRT
    does not keep a two-output graph's output order, so it scores without them.

    Raises:
        ValueError: For an unknown runtime, a missing package, or features with tflite.
    """
    check_runtime(runtime)
    if runtime == "auto":
        return make_best_scoring_forward(model, runtime, with_features, threads)[0]
    if not with_features:
        forward = make_forward(model, runtime, threads)
        return lambda batch: (forward(batch), None)
    if runtime == "tflite":
        raise ValueError(
            "runtime='tflite' gives probabilities only, but this model's Not-a-cell check "
            "needs the network's features. Use runtime='onnx' or 'keras', or pass "
            "check_ood=False to score without the Not-a-cell check."
        )
    from malaria_classifier.ood import feature_model

    network = feature_model(model)
    if runtime == "keras":
        return _keras_pair_forward(network)
    from malaria_classifier.export import convert_to_onnx

    run = onnx_forward(convert_to_onnx(network), threads, all_outputs=True)
    return lambda batch: tuple(run(batch))


def serving_forward(serving, with_features: bool, threads: int | None = None) -> ScoringForward:
    """Score with a model's serving copy (:mod:`malaria_classifier.serving`), no TensorFlow."""
    run = onnx_forward(serving.onnx_bytes, threads, all_outputs=True)

    def forward(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, features = run(batch)
        return probabilities, features if with_features else None

    return forward


def _keras_pair_forward(network) -> ScoringForward:
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(batch):
        return network(batch, training=False)

    input_shape = tuple(network.input_shape[1:])

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        batch = check_batch(batch, input_shape)
        probabilities, features = forward(tf.convert_to_tensor(batch, dtype=tf.uint8))
        return probabilities.numpy(), features.numpy()

    return run


def keras_forward(model) -> Forward:
    """A compiled inference function; much faster per batch than ``model.predict``."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(batch):
        return model(batch, training=False)

    input_shape = tuple(model.input_shape[1:])

    def run(batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, input_shape)
        return np.asarray(forward(tf.convert_to_tensor(batch, dtype=tf.uint8)))

    return run


def onnx_forward(
    model_bytes: bytes, threads: int | None = None, all_outputs: bool = False
) -> Forward:
    """Run an ONNX model (from :func:`malaria_classifier.export.convert_to_onnx`).

    Returns the first output, or the list of all outputs with ``all_outputs``.

    Raises:
        ValueError: If onnxruntime is not installed.
    """
    try:
        import onnxruntime
    except ImportError:
        raise ValueError(
            "The onnx runtime needs the onnxruntime package, a dependency of "
            "malaria-classifier: reinstall it (pip install onnxruntime)."
        ) from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1
    # Idle threads must sleep, not spin: decoding runs beside the forward pass and
    # needs those cores (spinning made whole-folder prediction slower on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    (model_input,) = session.get_inputs()
    input_name, input_shape = model_input.name, tuple(model_input.shape[1:])

    def forward(batch: np.ndarray) -> np.ndarray:
        outputs = session.run(None, {input_name: check_batch(batch, input_shape)})
        return outputs if all_outputs else outputs[0]

    return forward


def tflite_forward(model_bytes: bytes, threads: int | None = None) -> Forward:
    """Run a TFLite flatbuffer with LiteRT (resizing its batch dimension on demand).

    Raises:
        ValueError: If ai-edge-litert is not installed.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise ValueError(
            f"The tflite runtime needs the ai-edge-litert package. {EXPORT_EXTRA_HINT}"
        ) from None
    interpreter = Interpreter(model_content=model_bytes, num_threads=threads or cpu_threads())
    (model_input,) = interpreter.get_input_details()
    input_index = model_input["index"]
    input_shape = tuple(int(side) for side in model_input["shape_signature"][1:])
    output_index = interpreter.get_output_details()[0]["index"]
    allocated_batch = [0]
    lock = threading.Lock()  # an interpreter holds one batch's buffers: one caller at a time

    def forward(batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, input_shape)
        with lock:
            if batch.shape[0] != allocated_batch[0]:
                # Re-allocating is costly, so only when the batch size changes (last batch).
                interpreter.resize_tensor_input(input_index, list(batch.shape))
                interpreter.allocate_tensors()
                allocated_batch[0] = batch.shape[0]
            interpreter.set_tensor(input_index, batch)
            interpreter.invoke()
            return interpreter.get_tensor(output_index).copy()

    return forward
