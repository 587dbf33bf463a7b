"""Benchmark: patient-grouped cross-validation of many recipes, several seeds each, on a GPU.

Usage:
    # here (2 CPU cores): pack the cells of an existing `malaria cv` run, once
    python bench/gpu_cv_screen.py pack --cv-run runs/cv-default-pc \\
        --data ../shared/data/nih-cell-images --output .gpudata/cells64.npz
    # on a GPU machine with JAX and Keras (no TensorFlow needed)
    KERAS_BACKEND=jax python bench/gpu_cv_screen.py run --cells .gpudata/cells64.npz \\
        --output results/ [--candidates default,wide24,...] [--seeds 2] [--workers 8]

Why this exists: one 5-fold cross-validation of a recipe takes 50-80 minutes on two
CPU cores, and a second training seed moves fold accuracy by up to 0.007
(docs/benchmarks.md section 9.9), as much as any recipe change tried. Telling recipes
apart needs several seeds per fold, i.e. tens of trainings per candidate, which only
an accelerator affords. The GPU machines we can borrow carry JAX but no TensorFlow,
so this script needs only Keras: it trains the *same* network (``build_model``) on the
same patient folds as a ``malaria cv`` run, with that run's training, validation and
test patients per fold, the same cosine schedule, and the best epoch picked on
validation loss. What differs from ``malaria cv``: the augmentation is a port of
``pipeline.make_batch_augmenter`` to ``keras.ops`` that runs on the GPU (same steps
and ranges; the shrink-and-enlarge draws its size from eight sides instead of all),
and cells are decoded once here (``load_for_model``, as training does) and sent as
lossless WebP of their upper 7 bits. Figures from it rank recipes against the default
trained the same way; they are not ``malaria cv`` results.

Test folds are only scored, never used to pick anything inside a run. On an H200 with 12
workers, the first 240-340 s went to every worker compiling at once and later trainings
took 40-140 s each (docs/benchmarks.md section 9.13): try fewer workers first.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import os
import platform
import queue
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

# Each candidate is a set of TrainingConfig overrides plus options of this script
# (``ema``: Adam's exponential moving average of the weights, used for validation and
# the final model). "default" is the recipe of the bundled model.
CANDIDATES: dict[str, dict] = {
    "default": {},
    "ema": {"_ema": 0.999},
    "epochs30": {"epochs": 30, "early_stopping_patience": 30},
    "wide24": {"base_filters": 24},
    "deep2": {"convs_per_block": 2},
    "residual2": {"residual_separable_blocks": 2},
    "dense128": {"dense_units": 128},
    "lr2e-3": {"learning_rate": 0.002},
    "lr5e-4": {"learning_rate": 0.0005},
    "batch32": {"batch_size": 32},
    "no_robust_aug": {"low_resolution_probability": 0.0, "blur_probability": 0.0},
    "smooth0.05": {"label_smoothing": 0.05},
    "big": {"base_filters": 32, "convs_per_block": 2, "epochs": 40, "early_stopping_patience": 40},
}


# --------------------------------------------------------------------------- pack


def pack(cv_run: Path, data_root: Path, output: Path) -> None:
    """Decode every cell of a cross-validation run once; store them as WebP with the folds."""
    from PIL import Image

    from malaria_classifier.config import load_config
    from malaria_classifier.images import load_for_model

    config = load_config(cv_run / "config.yaml")
    fold_dirs = sorted(cv_run.glob("fold_*"), key=lambda path: int(path.name.split("_")[1]))
    by_fold = [list(csv.DictReader((fold / "manifest.csv").open())) for fold in fold_dirs]
    paths = [row["path"] for row in by_fold[0]]
    for rows in by_fold[1:]:
        if [row["path"] for row in rows] != paths:
            raise SystemExit(f"The folds of {cv_run} list different cells; re-run `malaria cv`.")
    splits = np.array(
        [[SPLIT_CODES[rows[i]["split"]] for rows in by_fold] for i in range(len(paths))], np.int8
    )
    labels = np.array([row["label"] == "Parasitized" for row in by_fold[0]], np.int8)
    blobs, offsets = [], [0]
    for number, path in enumerate(paths, 1):
        # The lowest bit is dropped (at most 1 of 255, far below the stain jitter of
        # the augmentation): 2.5 instead of 2.8 kB a cell, so the cells, the code and
        # Keras fit into the 64 MiB that travel to a borrowed GPU machine.
        pixels = load_for_model(data_root / path, config.image_size) & np.uint8(0xFE)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "WEBP", lossless=True, method=4)
        blobs.append(buffer.getvalue())
        offsets.append(offsets[-1] + len(blobs[-1]))
        if number % 2000 == 0:
            print(f"packed {number}/{len(paths)} cells, {offsets[-1] / 1e6:.1f} MB", flush=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    np.savez(
        output,
        webp=np.frombuffer(b"".join(blobs), np.uint8),
        offsets=np.array(offsets, np.int64),
        labels=labels,
        splits=splits,
        config=np.array(json.dumps(config.to_dict())),
    )
    print(f"{output}: {len(paths)} cells, {len(fold_dirs)} folds, {output.stat().st_size:,} bytes")


def decode_webp(data: bytes) -> np.ndarray:
    """RGB pixels of one packed cell (OpenCV where Pillow was built without WebP)."""
    try:
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    except (OSError, ImportError):
        import cv2

        return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


def unpack(cells: Path) -> dict:
    """The packed cells as one uint8 array, with labels, per-fold splits and the config."""
    stored = np.load(cells)
    webp, offsets = stored["webp"].tobytes(), stored["offsets"]
    images = np.stack(
        [decode_webp(webp[offsets[i] : offsets[i + 1]]) for i in range(len(offsets) - 1)]
    )
    return {
        "images": images,
        "labels": stored["labels"].astype(np.int64),
        "splits": stored["splits"],
        "config": json.loads(str(stored["config"])),
    }


# ---------------------------------------------------------------- augmentation


def make_augment_layer(config, seed: int):
    """``pipeline.make_batch_augmenter`` ported to ``keras.ops`` (applied in training only)."""
    import keras
    from keras import ops

    rgb_to_yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32
    )
    yiq_to_rgb = np.linalg.inv(rgb_to_yiq).astype(np.float32)
    largest_side = min(60, config.image_size)
    low_sides = sorted(
        {int(v) for v in np.linspace(config.low_resolution_min_side, largest_side, 8)}
    )

    class Augment(keras.layers.Layer):
        def __init__(self):
            super().__init__()
            self.seeds = keras.random.SeedGenerator(seed)

        def uniform(self, shape, low, high):
            return keras.random.uniform(shape, low, high, seed=self.seeds)

        def call(self, images, training=False):
            if not training:
                return images
            x = ops.cast(images, "float32") / 255.0
            x = self.symmetry(x)
            x = self.zoom_and_shift(x)
            x = self.colour(x)
            x = self.low_resolution(x)
            x = self.blur(x)
            return ops.cast(ops.clip(ops.round(x * 255.0), 0.0, 255.0), "uint8")

        def chosen(self, x, probability):
            return self.uniform((ops.shape(x)[0], 1, 1, 1), 0.0, 1.0) < probability

        def symmetry(self, x):
            # Transpose, vertical and horizontal flip by coin flips: uniform over the 8.
            x = ops.where(self.chosen(x, 0.5), ops.transpose(x, (0, 2, 1, 3)), x)
            x = ops.where(self.chosen(x, 0.5), ops.flip(x, 1), x)
            return ops.where(self.chosen(x, 0.5), ops.flip(x, 2), x)

        def zoom_and_shift(self, x):
            size = int(x.shape[1])
            batch = ops.shape(x)[0]
            zoom = self.uniform((batch,), 1.0 - config.zoom_range, 1.0 + config.zoom_range)
            shift = self.uniform((batch, 2), -config.shift_range, config.shift_range) * size
            offset = (size - 1) / 2.0 * (1.0 - zoom)
            zeros = ops.zeros_like(zoom)
            transform = ops.stack(
                [zoom, zeros, offset - zoom * shift[:, 0], zeros, zoom]
                + [offset - zoom * shift[:, 1], zeros, zeros],
                axis=1,
            )
            return ops.image.affine_transform(
                x, transform, interpolation="bilinear", fill_mode="constant", fill_value=0.0
            )

        def colour(self, x):
            batch = ops.shape(x)[0]
            brightness = self.uniform((batch,), -config.brightness_delta, config.brightness_delta)
            contrast = self.uniform((batch,), 1 - config.contrast_range, 1 + config.contrast_range)
            saturation = self.uniform(
                (batch,), 1 - config.saturation_range, 1 + config.saturation_range
            )
            angle = 2 * math.pi * self.uniform((batch,), -config.hue_delta, config.hue_delta)
            eye = ops.eye(3)[None]
            luma = ops.convert_to_tensor(np.array([0.299, 0.587, 0.114], np.float32))
            s = saturation[:, None, None]
            saturate = s * eye + (1 - s) * luma[None, :, None] * ops.ones((1, 1, 3))
            cos, sin = ops.cos(angle), ops.sin(angle)
            one, zero = ops.ones_like(cos), ops.zeros_like(cos)
            rotation = ops.stack(
                [
                    ops.stack([one, zero, zero], -1),
                    ops.stack([zero, cos, -sin], -1),
                    ops.stack([zero, sin, cos], -1),
                ],
                axis=1,
            )
            hue = ops.einsum("ij,bjk,kl->bil", yiq_to_rgb, rotation, rgb_to_yiq)
            gain = self.uniform(
                (batch, 3), 1 - config.channel_gain_range, 1 + config.channel_gain_range
            )
            gain = gain[:, :, None] * eye  # diagonal matrices
            colour = ops.matmul(ops.matmul(saturate, gain), ops.transpose(hue, (0, 2, 1)))
            matrix = contrast[:, None, None] * colour
            level = brightness + (1 - contrast) * ops.mean(x, axis=(1, 2, 3))
            offset = level[:, None] * ops.sum(colour, axis=1)
            x = ops.einsum("bhwj,bji->bhwi", x, matrix) + offset[:, None, None, :]
            return ops.clip(x, 0.0, 1.0)

        def low_resolution(self, x):
            if config.low_resolution_probability <= 0:
                return x
            size = int(x.shape[1])

            def branch(side):
                def shrink_and_enlarge(images):
                    small = ops.image.resize(images, (side, side), antialias=True)
                    return ops.image.resize(small, (size, size))

                return shrink_and_enlarge

            pick = keras.random.randint((), 0, len(low_sides), seed=self.seeds)
            restored = ops.switch(pick, [branch(side) for side in low_sides], x)
            return ops.where(self.chosen(x, config.low_resolution_probability), restored, x)

        def blur(self, x):
            if config.blur_probability <= 0 or config.blur_max_sigma <= 0:
                return x
            radius = max(1, math.ceil(3 * config.blur_max_sigma))
            sigma = self.uniform((), 0.3, max(config.blur_max_sigma, 0.3))
            offsets = ops.arange(-radius, radius + 1, dtype="float32")
            kernel = ops.exp(-(offsets**2) / (2 * sigma**2))
            kernel = kernel / ops.sum(kernel)
            rows = ops.tile(ops.reshape(kernel, (-1, 1, 1, 1)), (1, 1, 3, 1))
            columns = ops.tile(ops.reshape(kernel, (1, -1, 1, 1)), (1, 1, 3, 1))
            pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
            padded = ops.pad(x, pad, mode="reflect")
            blurred = ops.depthwise_conv(padded, rows, 1, "valid")
            blurred = ops.depthwise_conv(blurred, columns, 1, "valid")
            return ops.where(self.chosen(x, config.blur_probability), blurred, x)

    return Augment()


# ------------------------------------------------------------------------ train


def train_and_score(
    data: dict, candidate: str, fold: int, seed: int, epochs: int | None = None
) -> dict:
    """One training on one fold: best epoch by validation loss, scored on the test fold."""
    import keras
    from sklearn.metrics import roc_auc_score

    from malaria_classifier.config import TrainingConfig
    from malaria_classifier.model import build_model

    started = time.perf_counter()
    overrides = dict(CANDIDATES[candidate])
    ema = overrides.pop("_ema", None)
    base = {**data["config"], **overrides, "training_seed": seed}
    if epochs is not None:  # smoke tests only
        base.update(epochs=epochs, early_stopping_patience=epochs)
    config = TrainingConfig(**base)
    keras.utils.set_random_seed(seed)
    splits = data["splits"][:, fold]
    images, labels = data["images"], np.eye(2, dtype=np.float32)[data["labels"]]
    train, validation, test = (np.flatnonzero(splits == code) for code in (0, 1, 2))

    network = build_model(config)
    inputs = keras.Input(network.input_shape[1:], dtype="uint8")
    augmented = make_augment_layer(config, seed)(inputs) if config.augment else inputs
    model = keras.Model(inputs, network(augmented))
    optimizer = keras.optimizers.Adam(
        learning_rate=config.learning_rate, use_ema=ema is not None, ema_momentum=ema or 0.99
    )
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
    )

    best = {"loss": math.inf, "epoch": 0, "weights": None}

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            loss = float((logs or {}).get("val_loss", math.inf))
            if loss < best["loss"]:
                best.update(loss=loss, epoch=epoch + 1, weights=self.model.get_weights())

    def schedule(epoch, _current):
        return 0.5 * config.learning_rate * (1 + math.cos(math.pi * epoch / config.epochs))

    callbacks = [keras.callbacks.LearningRateScheduler(schedule)]
    if ema is not None:
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    callbacks.append(KeepBest())
    model.fit(
        images[train],
        labels[train],
        batch_size=config.batch_size,
        epochs=config.epochs,
        validation_data=(images[validation], labels[validation]),
        callbacks=callbacks,
        verbose=0,
    )
    model.set_weights(best["weights"])
    probability = model.predict(images[test], batch_size=1024, verbose=0)[:, 1]
    truth = data["labels"][test]
    called = probability >= 0.5
    return {
        "candidate": candidate,
        "fold": fold + 1,
        "seed": seed,
        "best_epoch": best["epoch"],
        "val_loss": best["loss"],
        "accuracy": float(np.mean(called == truth)),
        "sensitivity": float(np.mean(called[truth == 1])),
        "specificity": float(np.mean(~called[truth == 0])),
        "auc": float(roc_auc_score(truth, probability)),
        "test_cells": int(len(test)),
        "seconds": round(time.perf_counter() - started, 1),
    }


def worker(cells: str, jobs, results, deadline: float, cache_dir: str, epochs: int | None) -> None:
    """Take jobs until none are left or the deadline has passed."""
    try:  # JAX keeps compiled steps on disk, so workers reuse each other's compilations
        import jax

        jax.config.update("jax_compilation_cache_dir", cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except ImportError:  # another Keras backend (smoke tests on a CPU)
        pass
    data = unpack(Path(cells))
    while time.time() < deadline:
        try:
            candidate, fold, seed = jobs.get(timeout=2)
        except queue.Empty:  # nothing left to do
            return
        try:
            results.put(train_and_score(data, candidate, fold, seed, epochs))
        except Exception as error:  # report and go on: one failed recipe must not stop all
            results.put(
                {"candidate": candidate, "fold": fold + 1, "seed": seed, "error": repr(error)}
            )


def paired_difference(pairs: list[tuple[dict, dict]], key: str) -> str:
    """Mean candidate-minus-default difference over (fold, seed) pairs, with its s.e."""
    values = [row[key] - base[key] for row, base in pairs]
    if len(values) < 2:
        return "—"
    error = statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.mean(values):+.4f} ± {error:.4f} (n={len(values)})"


def summarize(rows: list[dict]) -> str:
    """Per candidate: means over (fold, seed), and paired differences from "default"."""
    done = [row for row in rows if "error" not in row]
    reference = {(r["fold"], r["seed"]): r for r in done if r["candidate"] == "default"}
    lines = [
        "| candidate | trainings | accuracy | AUC | sensitivity | specificity "
        "| Δ accuracy vs default (paired, ± s.e.) | Δ AUC (paired, ± s.e.) | best epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for candidate in CANDIDATES:
        mine = [row for row in done if row["candidate"] == candidate]
        if not mine:
            continue
        pairs = [
            (row, reference[(row["fold"], row["seed"])])
            for row in mine
            if (row["fold"], row["seed"]) in reference
        ]
        means = {
            key: statistics.mean(row[key] for row in mine)
            for key in ("accuracy", "auc", "sensitivity", "specificity")
        }
        epochs = statistics.median(row["best_epoch"] for row in mine)
        lines.append(
            f"| {candidate} | {len(mine)} | {means['accuracy']:.4f} | {means['auc']:.4f} "
            f"| {means['sensitivity']:.4f} | {means['specificity']:.4f} "
            f"| {paired_difference(pairs, 'accuracy')} | {paired_difference(pairs, 'auc')} "
            f"| {epochs:g} |"
        )
    for row in [row for row in rows if "error" in row][:10]:
        lines.append(
            f"\nerror: {row['candidate']} fold {row['fold']} seed {row['seed']}: {row['error']}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    candidates = args.candidates.split(",")
    unknown = [name for name in candidates if name not in CANDIDATES]
    if unknown:
        raise SystemExit(f"Unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}.")
    folds = int(np.load(args.cells)["splits"].shape[1])
    folds_run = range(folds) if args.folds is None else range(min(args.folds, folds))
    if args.fold_list:
        folds_run = [int(number) - 1 for number in args.fold_list.split(",")]
    # Seed-major order: whatever the deadline leaves undone, each finished seed
    # compares every candidate on every fold.
    job_list = [
        (candidate, fold, seed)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for fold in folds_run
        for candidate in candidates
    ]
    context = multiprocessing.get_context("spawn")
    jobs, results = context.Queue(), context.Queue()
    for job in job_list:
        jobs.put(job)
    deadline = time.time() + args.budget_s
    processes = [
        context.Process(
            target=worker,
            args=(args.cells, jobs, results, deadline, args.cache_dir, args.epochs),
        )
        for _ in range(args.workers)
    ]
    for process in processes:
        process.start()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    started = time.time()
    with (output / "trainings.jsonl").open("a") as log:
        while len(rows) < len(job_list) and any(process.is_alive() for process in processes):
            try:
                row = results.get(timeout=5)
            except queue.Empty:  # keep waiting while workers live
                continue
            rows.append(row)
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"[{time.time() - started:5.0f} s] {len(rows)}/{len(job_list)} {row}", flush=True)
        while not results.empty():  # results that came in as the last worker ended
            rows.append(results.get())
            log.write(json.dumps(rows[-1]) + "\n")
    for process in processes:
        process.join(timeout=60)
    summary = summarize(rows)
    (output / "summary.md").write_text(summary + "\n")
    print(summary)


def describe_machine() -> str:
    import keras

    described = f"keras {keras.__version__}, backend {keras.backend.backend()}"
    if keras.backend.backend() == "jax":
        import jax

        described += f"; jax {jax.__version__}: {', '.join(str(d) for d in jax.devices())}"
    return f"{described}; {platform.machine()}, {os.cpu_count()} CPU cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="decode a cv run's cells into one file")
    packing.add_argument("--cv-run", type=Path, required=True)
    packing.add_argument("--data", type=Path, required=True)
    packing.add_argument("--output", type=Path, required=True)
    running = commands.add_parser("run", help="train and score candidates fold by fold")
    running.add_argument("--cells", required=True)
    running.add_argument("--output", required=True)
    running.add_argument("--candidates", default=",".join(CANDIDATES))
    running.add_argument("--seeds", type=int, default=2)
    running.add_argument("--first-seed", type=int, default=1)
    running.add_argument("--folds", type=int, default=None, help="only the first N folds")
    running.add_argument("--fold-list", default=None, help="only these folds, e.g. 4,5")
    running.add_argument("--workers", type=int, default=8)
    running.add_argument("--budget-s", type=float, default=420, help="no job starts after this")
    running.add_argument("--cache-dir", default="/tmp/jax-cache")
    running.add_argument("--epochs", type=int, default=None, help="override (smoke tests)")
    args = parser.parse_args()
    if args.command == "pack":
        pack(args.cv_run, args.data, args.output)
        return
    print(describe_machine(), file=sys.stderr)
    run(args)


if __name__ == "__main__":
    main()
