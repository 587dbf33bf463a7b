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
   batch norm and ReLU into the convolutions;
6. ``fit`` with the real model on batches augmented once and held in memory: the
   model's own cost, without the input pipeline's work.

Each also reports CPU milliseconds per image (all of the process's threads): on a VM
that gives the process one core for some stretches and two for others, CPU time is
the steady figure, and 3 minus 6 is what the input pipeline costs inside training.
``--skip`` leaves out variants (e.g. ``--skip bfloat16,xla``).

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


def timed(count: int, work, *args, **kwargs) -> tuple[float, float]:
    """``work(*args, **kwargs)``'s rate in images/s and its CPU milliseconds per image."""
    cpu_started, started = time.process_time(), time.perf_counter()
    work(*args, **kwargs)
    cpu = time.process_time() - cpu_started
    return count / (time.perf_counter() - started), cpu / count * 1e3


def iterate(dataset: tf.data.Dataset) -> None:
    for _ in dataset:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("/work/main/runs/default"))
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--images", type=int, default=3072)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra/inter-op threads; 0 = TF")
    parser.add_argument("--skip", default="", help="variants to leave out: bfloat16, xla")
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
    iterate(dataset)  # first pass decodes every file into the cache
    print(f"first pass (decode {len(rows)} PNGs + cache): {time.perf_counter() - started:.1f} s")
    # One epoch's batches, augmented once and kept: fitting on them costs the model alone.
    pre_augmented = dataset.cache()
    iterate(pre_augmented)

    skip = set(filter(None, args.skip.split(",")))
    models = {
        "no-op model": no_op_model(config.image_size, config.learning_rate),
        "real model": compile_model(build_model(config), config.learning_rate),
    }
    if "bfloat16" not in skip:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        models["real model, mixed_bfloat16"] = compile_model(
            build_model(config), config.learning_rate
        )
        keras.mixed_precision.set_global_policy("float32")
    if "xla" not in skip:
        models["real model, XLA"] = compile_model(build_model(config), config.learning_rate)
        models["real model, XLA"].jit_compile = True
    models["real model, pre-augmented batches"] = compile_model(
        build_model(config), config.learning_rate
    )
    inputs = {name: dataset for name in models}
    inputs["real model, pre-augmented batches"] = pre_augmented
    for name, model in models.items():
        model.fit(inputs[name].take(2), epochs=1, verbose=0)  # trace the step functions

    results: dict[str, list[tuple[float, float]]] = {"pipeline alone": []}
    results.update({name: [] for name in models})
    for _ in range(args.epochs):
        results["pipeline alone"].append(timed(len(rows), iterate, dataset))
        for name, model in models.items():
            fit = timed(len(rows), model.fit, inputs[name], epochs=1, verbose=0)
            results[name].append(fit)

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, TF {tf.__version__}")
    print(f"{len(rows)} training cells, batch {config.batch_size}, augmentation {config.augment}")
    medians = {name: statistics.median(rate for rate, _ in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(ms for _, ms in runs) for name, runs in results.items()}
    for name, runs in results.items():
        print(
            f"{name:<34} median {medians[name]:7,.0f} img/s, epochs "
            f"{[round(rate) for rate, _ in runs]}; CPU {cpu[name]:.2f} ms an image"
        )
    baseline = medians["no-op model"]
    for name in models:
        if name.startswith("real model") and "pre-augmented" not in name:
            print(f"ratio {name} / no-op model: {medians[name] / baseline:.2f} (target >= 0.8)")
    print(f"ratio no-op model / pipeline alone: {baseline / medians['pipeline alone']:.2f}")
    inside = cpu["real model"] - cpu["real model, pre-augmented batches"]
    print(
        f"input pipeline's CPU inside training: {inside:.2f} of {cpu['real model']:.2f} ms "
        f"an image ({inside / cpu['real model']:.0%})"
    )


if __name__ == "__main__":
    main()
