"""Score a model on NIH cells turned into other laboratories' look (scale, stain, blur, background).

Usage:
    python bench/stress_test.py --run runs/default [--model M] [--split test] \
        [--data ../shared/data/nih-cell-images] [--output runs/stress-default.json] \
        [--decisions [--not-a-cell strict|other-labs]]

The cells are those of the run manifest's ``--split`` patients (test by default: the
patients that chose nothing). Every variant of :func:`malaria_classifier.stress.stress_variants`
is applied to the native-resolution crop, then the model's own resize-with-pad, so
each image reaches the model as it would be served. Scores are the model's raw
P(Parasitized) at threshold 0.5 (as in docs/benchmarks.md section 1); 95% CIs come
from a bootstrap over patients (1,000 resamples).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS
from malaria_classifier.decision import DECISIONS, NOT_A_CELL, UNCERTAIN
from malaria_classifier.evaluation import summarize
from malaria_classifier.images import load_rgb_image, resize_with_pad
from malaria_classifier.model import load_model
from malaria_classifier.prediction import Predictor
from malaria_classifier.splits import read_manifest
from malaria_classifier.stress import stress_variants

REPORTED = ("accuracy", "recall", "specificity", "roc_auc")


def score_variant(
    model, images: list[np.ndarray], variant, seed: int, tta: bool = False
) -> np.ndarray:
    """P(Parasitized) of every image after ``variant`` and the model's resize-with-pad.

    With ``tta`` the score is the mean over the eight symmetries of the square
    (test-time augmentation; a cell has no up or left).
    """
    size = int(model.input_shape[1])
    rng = np.random.default_rng(seed)
    batch = np.stack([resize_with_pad(variant(image, rng), size) for image in images])
    views = [batch]
    if tta:
        views = [
            np.rot90(view, turns, axes=(1, 2))
            for view in (batch, batch[:, :, ::-1])
            for turns in range(4)
        ]
    positive = CLASS_NAMES.index(POSITIVE_CLASS)
    scores = [
        model.predict(np.ascontiguousarray(view), batch_size=256, verbose=0) for view in views
    ]
    return np.mean([score[:, positive] for score in scores], axis=0).astype(np.float64)


def decision_shares(predictor, images: list[np.ndarray], variant, seed: int) -> dict[str, float]:
    """Share of cells given each decision by the trust layer (same variant draws)."""
    rng = np.random.default_rng(seed)
    changed = [variant(image, rng) for image in images]
    decisions = [row.decision for row in predictor.predict_images(changed)]
    return {name: decisions.count(name) / len(decisions) for name in DECISIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="run folder (its manifest)")
    parser.add_argument("--model", type=Path, help="model file (default RUN/model.keras)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tta", action="store_true", help="average the 8 symmetries")
    parser.add_argument("--variants", nargs="*", help="only these variants (default all)")
    parser.add_argument(
        "--decisions",
        action="store_true",
        help="also run the model's trust layer (needs a calibrated model) and report the "
        "share of cells it decides Not a cell or Uncertain",
    )
    parser.add_argument(
        "--not-a-cell",
        default="strict",
        choices=("strict", "other-labs"),
        help="which Not-a-cell limits --decisions applies",
    )
    args = parser.parse_args()

    started = time.monotonic()
    rows = [row for row in read_manifest(args.run / "manifest.csv") if row.split == args.split]
    with ThreadPoolExecutor(max_workers=2) as executor:
        images = list(executor.map(load_rgb_image, [args.data / row.path for row in rows]))
    y_true = np.array([CLASS_NAMES.index(row.label) for row in rows])
    groups = [row.patient for row in rows]
    model_path = args.model or args.run / "model.keras"
    model = load_model(str(model_path))
    predictor = Predictor(model_path, not_a_cell=args.not_a_cell) if args.decisions else None

    results = {}
    print(
        f"{args.split} split: {len(rows)} cells of {len(set(groups))} patients"
        + (" (test-time augmentation: mean of 8 symmetries)" if args.tta else "")
    )
    extra = " Not a cell | Uncertain |" if predictor else ""
    print("| variant | accuracy | sensitivity | specificity | ROC AUC |" + extra)
    print("|---|---|---|---|---|" + ("---|---|" if predictor else ""))
    for index, (name, variant) in enumerate(stress_variants().items()):
        if args.variants and name not in args.variants:
            continue
        scores = score_variant(model, images, variant, args.seed + index, args.tta)
        block = summarize(y_true, scores, groups, args.split)
        results[name] = block
        cells = [_format(block["metrics"][metric]) for metric in REPORTED]
        if predictor:
            shares = decision_shares(predictor, images, variant, args.seed + index)
            block["decision_shares"] = shares
            cells += [f"{shares[NOT_A_CELL]:.3f}", f"{shares[UNCERTAIN]:.3f}"]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"({time.monotonic() - started:.0f} s)")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _format(metric: dict) -> str:
    low, high = metric["ci95"]
    return f"{metric['value']:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    main()
