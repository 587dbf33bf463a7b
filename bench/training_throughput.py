"""Benchmark: training images/s against the input pipeline alone, in the same run.

Usage:
    python bench/training_throughput.py [--run /work/main/runs/default] [--images 3072]
        [--epochs 3] [--threads 0]

Takes ``--images`` training cells of a run's manifest and the run's config, builds the
training dataset exactly as ``malaria train`` does (decode once, cache, shuffle, batch,
vectorized augmentation, prefetch), decodes it once to fill the cache, then measures
in alternation (medians of ``--epochs`` epochs each):

1. the pipeline alone: iterating the dataset, nothing else;
2. ``fit`` with the model replaced by a no-op (one trainable scalar times a constant:
   the same Keras step machinery, no convolutions);
3. ``fit`` with the real model;
4. ``fit`` with the real model under the ``mixed_bfloat16`` policy (this CPU has
   AVX512-BF16/AMX; on GPUs it would be ``mixed_float16``);
5. ``fit`` with the real model compiled by XLA (``jit_compile=True``), which can fuse
   batch norm and ReLU into the convolutions.

Target: 3 >= 0.8 x 2.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import time
from pathlib import Path

import keras
import tensorflow as tf

from malaria_classifier.config import load_config
from malaria_classifier.model import build_model, compile_model
from malaria_classifier.pipeline import make_dataset


class ConstantOutput(keras.layers.Layer):
    """The no-op model: one trainable scalar, output independent of the pixels."""

    def build(self, input_shape):
        self.logit = self.add_weight(shape=(), initializer="zeros", name="logit")

    def call(self, images):
        batch = keras.ops.shape(images)[0]
        logits = keras.ops.stack([keras.ops.zeros((batch,)), keras.ops.zeros((batch,))], 1)
        return keras.ops.softmax(logits + self.logit)


def no_op_model(image_size: int, learning_rate: float) -> keras.Model:
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8")
    model = keras.Model(inputs, ConstantOutput()(inputs))
    return compile_model(model, learning_rate)


def pipeline_rate(dataset: tf.data.Dataset, count: int) -> float:
    started = time.perf_counter()
    for _ in dataset:
        pass
    return count / (time.perf_counter() - started)


def fit_rate(model: keras.Model, dataset: tf.data.Dataset, count: int) -> float:
    started = time.perf_counter()
    model.fit(dataset, epochs=1, verbose=0)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("/work/main/runs/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra/inter-op threads; 0 = TF")
    args = parser.parse_args()
    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    config = load_config(args.run / "config.yaml")
    with open(args.run / "manifest.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row["split"] == "train"]
    rows = rows[:: max(1, len(rows) // args.images)][: args.images]
    dataset = make_dataset(
        [args.data / row["path"] for row in rows], [row["label"] for row in rows], config, True
    )
    started = time.perf_counter()
    pipeline_rate(dataset, len(rows))  # first pass decodes every file into the cache
    print(f"first pass (decode {len(rows)} PNGs + cache): {time.perf_counter() - started:.1f} s")

    models = {
        "no-op model": no_op_model(config.image_size, config.learning_rate),
        "real model": compile_model(build_model(config), config.learning_rate),
    }
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    models["real model, mixed_bfloat16"] = compile_model(build_model(config), config.learning_rate)
    keras.mixed_precision.set_global_policy("float32")
    models["real model, XLA"] = compile_model(build_model(config), config.learning_rate)
    models["real model, XLA"].jit_compile = True
    for model in models.values():
        model.fit(dataset.take(2), epochs=1, verbose=0)  # trace the step functions

    rates: dict[str, list[float]] = {"pipeline alone": [], **{name: [] for name in models}}
    for _ in range(args.epochs):
        rates["pipeline alone"].append(pipeline_rate(dataset, len(rows)))
        for name, model in models.items():
            rates[name].append(fit_rate(model, dataset, len(rows)))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}")
    print(f"{len(rows)} training cells, batch {config.batch_size}, augmentation {config.augment}")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(f"{name:<28} median {medians[name]:7,.0f} img/s, epochs {[round(v) for v in values]}")
    baseline = medians["no-op model"]
    for name in ("real model", "real model, mixed_bfloat16", "real model, XLA"):
        print(f"ratio {name} / no-op model: {medians[name] / baseline:.2f} (target >= 0.8)")
    print(f"ratio no-op model / pipeline alone: {baseline / medians['pipeline alone']:.2f}")


if __name__ == "__main__":
    main()
