"""Benchmark: the default model's training step on an accelerator, against a no-op model.

Usage:
    KERAS_BACKEND=jax python bench/gpu_train_step.py [--images 16384] [--epochs 3]
        [--batch-sizes 64,256,1024]

Why this exists: on 2 CPU cores the model's own arithmetic caps training at about a
third of the input pipeline's rate (docs/benchmarks.md section 8.4). The question
for a GPU machine is whether the model stops being the bottleneck there. The GPU
machines we can borrow carry JAX but no TensorFlow (and TensorFlow with its CUDA
libraries is far larger than what can be sent to them), so this script needs
only Keras: it builds the *same* network with ``build_model`` and compiles it with
``compile_model`` (Adam, categorical cross-entropy, accuracy and AUC) under
whatever Keras backend is active, and times ``fit`` on random uint8 images held in
memory, against the same ``fit`` with the model replaced by a no-op (one trainable
scalar). Input decoding and augmentation are not part of it: they are the tf.data
pipeline's job, measured by ``bench/training_throughput.py``.

Each (model, batch size, precision) is fitted once to compile, then timed for
``--epochs`` epochs; the median epoch is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import keras
import numpy as np

from malaria_classifier.config import TrainingConfig
from malaria_classifier.model import build_model, compile_model


class ConstantOutput(keras.layers.Layer):
    """The no-op model: one trainable scalar, output independent of the pixels."""

    def build(self, input_shape):
        self.logit = self.add_weight(shape=(), initializer="zeros", name="logit")

    def call(self, images):
        batch = keras.ops.shape(images)[0]
        logits = keras.ops.zeros((batch, 2)) + self.logit
        return keras.ops.softmax(logits)


def no_op_model(config: TrainingConfig) -> keras.Model:
    inputs = keras.Input((config.image_size, config.image_size, 3), dtype="uint8")
    return compile_model(keras.Model(inputs, ConstantOutput()(inputs)), config.learning_rate)


def real_model(config: TrainingConfig) -> keras.Model:
    return compile_model(build_model(config), config.learning_rate)


def epoch_rates(model: keras.Model, images, labels, batch_size: int, epochs: int) -> list[float]:
    model.fit(images[: batch_size * 4], labels[: batch_size * 4], batch_size=batch_size, verbose=0)
    rates = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0, shuffle=False)
        rates.append(len(images) / (time.perf_counter() - started))
    return rates


def describe_devices() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return f"jax {jax.__version__}: {', '.join(str(d) for d in jax.devices())}"
    if backend == "torch":
        import torch

        return f"torch {torch.__version__}: cuda={torch.cuda.is_available()}"
    return backend


def gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv"]
        return subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-sizes", default="64,256,1024")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    args = parser.parse_args()
    config = TrainingConfig()
    generator = np.random.default_rng(0)
    size = config.image_size
    images = generator.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8)
    labels = np.eye(2, dtype=np.float32)[generator.integers(0, 2, args.images)]

    print(f"keras {keras.__version__}, backend {keras.backend.backend()}; {describe_devices()}")
    print(f"{gpu_name()}")
    print(f"host: {platform.machine()}, {os.cpu_count()} CPU cores; {args.images} images/epoch")
    print("| batch | precision | no-op fit img/s | real model fit img/s | real / no-op |")
    print("|---|---|---|---|---|")
    for batch_size in (int(value) for value in args.batch_sizes.split(",")):
        for precision in args.precisions.split(","):
            keras.mixed_precision.set_global_policy(precision)
            keras.utils.set_random_seed(0)
            no_op = statistics.median(
                epoch_rates(no_op_model(config), images, labels, batch_size, args.epochs)
            )
            real = statistics.median(
                epoch_rates(real_model(config), images, labels, batch_size, args.epochs)
            )
            print(
                f"| {batch_size} | {precision} | {no_op:,.0f} | {real:,.0f} | {real / no_op:.2f} |"
            )
    keras.mixed_precision.set_global_policy("float32")


if __name__ == "__main__":
    main()
