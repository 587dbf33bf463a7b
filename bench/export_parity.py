"""Benchmark: exported TFLite / ONNX models against Keras on thousands of real cells.

Usage:
    python bench/export_parity.py [--data ../shared/data/nih-cell-images] [--images 5000]

Exports the bundled default model with ``malaria_classifier.export.export_model`` into a
temporary folder, runs the same decoded cells through Keras and each export, and reports
file size, label agreement, the largest probability difference, and the forward-pass
rate (batch 256, decoded cells in memory). Target: >= 99.9% equal labels, |diff| <= 1e-4.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _cells import cell_files, spread

from malaria_classifier.constants import POSITIVE_INDEX
from malaria_classifier.export import export_model
from malaria_classifier.images import load_for_model
from malaria_classifier.model_card import default_model_path
from malaria_classifier.prediction import label_for
from malaria_classifier.runtimes import keras_forward, onnx_forward, tflite_forward


def run_batched(forward, cells: np.ndarray, batch: int = 256) -> tuple[np.ndarray, float]:
    forward(cells[:batch])
    started = time.perf_counter()
    outputs = np.concatenate([forward(cells[i : i + batch]) for i in range(0, len(cells), batch)])
    return outputs, len(cells) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=5000)
    args = parser.parse_args()
    files = spread(cell_files(args.data), args.images)
    cells = np.stack([load_for_model(path, 64) for path in files])

    import keras

    model_path = default_model_path()
    model = keras.saving.load_model(model_path, compile=False)
    expected, keras_rate = run_batched(keras_forward(model), cells)
    expected_labels = [label_for(p) for p in expected[:, POSITIVE_INDEX]]
    print(
        f"{len(cells)} real cells; keras: {model_path.stat().st_size:,} bytes, {keras_rate:,.0f} img/s"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name, make_forward in (("tflite", tflite_forward), ("onnx", onnx_forward)):
            started = time.perf_counter()
            result = export_model(model_path, name, Path(folder) / f"model.{name}")
            seconds = time.perf_counter() - started
            outputs, rate = run_batched(make_forward(result.path.read_bytes()), cells)
            labels = [label_for(p) for p in outputs[:, POSITIVE_INDEX]]
            agreement = np.mean([a == b for a, b in zip(labels, expected_labels, strict=True)])
            print(
                f"{name}: {result.size_bytes:,} bytes, export {seconds:.1f} s, labels equal "
                f"{agreement:.4%}, max |diff| {np.abs(outputs - expected).max():.2e}, "
                f"{rate:,.0f} img/s ({rate / keras_rate:.2f}x keras)"
            )
        result = export_model(model_path, "saved_model", Path(folder) / "saved_model")
        print(f"saved_model: {result.size_bytes:,} bytes (folder)")


if __name__ == "__main__":
    main()
