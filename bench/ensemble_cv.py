"""Score an ensemble of cross-validations fold by fold against its members.

Usage:
    python bench/ensemble_cv.py runs/cv-e20 runs/cv-e20-s1 \
        [--data ../shared/data/nih-cell-images] [--output runs/ensemble-cv.json] \
        [--scores runs/ensemble-cv-scores.csv]

Each argument is a ``malaria cv`` folder trained with the same folds (same ``seed``),
typically with different ``training_seed`` values. For every fold that all members have
finished, each member's model scores that fold's test patients exactly as
``malaria cv`` did (``Predictor.predict_paths``, threshold 0.5), and the ensemble's
P(Parasitized) is the sigmoid of the members' mean log-odds: the softmax of the mean
logits, which is how an ensemble would ship as one model. The mean of the members'
probabilities is reported beside it. Metrics are over cells; 95% CIs come from a
bootstrap over patients (1,000 resamples). ``--scores`` keeps every cell's scores (one
row per fold-test cell: fold, path, patient, label, one column per member), e.g. to
study the cells every model gets wrong. Refuses members whose folds hold different
test patients, since their scores could not be paired.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
from scipy.special import expit, logit

from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.cv import fold_dir, is_fold_finished
from malaria_classifier.evaluation import summarize
from malaria_classifier.prediction import Predictor
from malaria_classifier.splits import read_manifest

REPORTED = ("accuracy", "roc_auc", "recall", "specificity")
CLIP = 1e-7  # float32 probabilities saturate at 1.0; keep log-odds finite


def mean_log_odds(scores: list[np.ndarray]) -> np.ndarray:
    """P(Parasitized) of the ensemble: sigmoid of the mean log-odds (= mean logits)."""
    return expit(np.mean([logit(np.clip(score, CLIP, 1 - CLIP)) for score in scores], axis=0))


def score_fold(members: list[Path], fold: int, data: Path) -> tuple[dict, list[dict]]:
    """Every member's and the ensemble's metrics on one fold's test patients, and the scores."""
    manifests = [read_manifest(fold_dir(member, fold) / "manifest.csv") for member in members]
    tests = [[row for row in rows if row.split == "test"] for rows in manifests]
    paths = [row.path for row in tests[0]]
    for member, rows in zip(members[1:], tests[1:], strict=True):
        if [row.path for row in rows] != paths:
            raise SystemExit(
                f"{member} fold {fold + 1} tests other cells than {members[0]}; "
                "ensemble only cross-validations made with the same seed."
            )
    y_true = np.array([CLASS_NAMES.index(row.label) for row in tests[0]])
    groups = [row.patient for row in tests[0]]
    scores = []
    for member in members:
        predictor = Predictor(fold_dir(member, fold) / "model.keras")
        rows = predictor.predict_paths([data / path for path in paths])
        scores.append(np.array([row.probability for row in rows], dtype=np.float64))
    named = {str(member): score for member, score in zip(members, scores, strict=True)}
    named["ensemble (mean logits)"] = mean_log_odds(scores)
    named["ensemble (mean probability)"] = np.mean(scores, axis=0)
    metrics = {}
    for name, score in named.items():
        summary = summarize(y_true, score, groups, "test", 0.5)["metrics"]  # one bootstrap
        metrics[name] = {metric: summary[metric] for metric in REPORTED}
    rows = [
        {"fold": fold + 1, "path": row.path, "patient": row.patient, "label": row.label}
        | {
            str(member): f"{score[index]:.6f}"
            for member, score in zip(members, scores, strict=True)
        }
        for index, row in enumerate(tests[0])
    ]
    return metrics, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="+", type=Path, help="malaria cv folders")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--output", type=Path, help="also write the results as JSON here")
    parser.add_argument("--scores", type=Path, help="write every cell's scores as CSV here")
    args = parser.parse_args()

    results = {}
    score_rows: list[dict] = []
    for fold in range(args.folds):
        if not all(is_fold_finished(member, fold) for member in args.members):
            print(f"fold {fold + 1}: not finished by every member; skipped")
            continue
        results[fold + 1], rows = score_fold(args.members, fold, args.data)
        score_rows += rows
        for name, metrics in results[fold + 1].items():
            figures = "  ".join(f"{m} {metrics[m]['value']:.4f}" for m in REPORTED)
            print(f"fold {fold + 1}  {name:<40} {figures}")
    names = list(next(iter(results.values()))) if results else []
    for name in names:
        values = {m: [results[f][name][m]["value"] for f in results] for m in REPORTED}
        base = {m: [results[f][names[0]][m]["value"] for f in results] for m in REPORTED}
        mean = "  ".join(f"{m} {np.mean(values[m]):.4f}" for m in REPORTED)
        paired = "  ".join(f"{m} {np.mean(np.subtract(values[m], base[m])):+.4f}" for m in REPORTED)
        print(f"mean over {len(results)} folds  {name:<32} {mean}   vs first member {paired}")
    if args.output:
        args.output.write_text(json.dumps(results, indent=2), encoding="utf-8")
    if args.scores and score_rows:
        with args.scores.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(score_rows[0]))
            writer.writeheader()
            writer.writerows(score_rows)


if __name__ == "__main__":
    main()
