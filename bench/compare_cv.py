"""Paired, fold-by-fold comparison of a candidate cross-validation with a baseline.

Usage:
    python bench/compare_cv.py runs/cv-noise --against runs/cv-default-pc runs/cv-default-s1

Every folder is a finished ``malaria cv`` run made with the same folds (same ``seed``).
With several baseline folders (e.g. the baseline recipe trained with two training
seeds), each fold's baseline is their mean, which halves the seed noise in the
differences. Prints, per fold, the candidate's and the baseline's test-cell metrics and
their difference, then the mean difference with its standard error over folds (sd / √k)
and the largest loss of any fold: the figures the rules in ``runs/*-rule-*.txt`` test.
Refuses folders whose folds test different patients.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from malaria_classifier.cv import RESULTS_JSON, fold_dir
from malaria_classifier.splits import read_manifest

METRICS = ("accuracy", "roc_auc", "recall", "specificity")


def fold_metrics(run: Path) -> list[dict[str, float]]:
    """Each fold's test metrics of a finished cross-validation."""
    results = run / RESULTS_JSON
    if not results.is_file():
        raise SystemExit(f"{run} has no {RESULTS_JSON}: finish it with `malaria cv` first.")
    return json.loads(results.read_text(encoding="utf-8"))["folds"]


def test_patients(run: Path, fold: int) -> set[str]:
    rows = read_manifest(fold_dir(run, fold) / "manifest.csv")
    return {row.patient for row in rows if row.split == "test"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", type=Path)
    parser.add_argument("--against", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    candidate = fold_metrics(args.candidate)
    baselines = [fold_metrics(run) for run in args.against]
    if any(len(folds) != len(candidate) for folds in baselines):
        raise SystemExit("The cross-validations have different numbers of folds.")
    for fold in range(len(candidate)):
        patients = test_patients(args.candidate, fold)
        for run in args.against:
            if test_patients(run, fold) != patients:
                raise SystemExit(f"{run} fold {fold + 1} tests other patients than the candidate.")
    differences = {name: [] for name in METRICS}
    print("fold | " + " | ".join(f"{name}: candidate / baseline / diff" for name in METRICS))
    for fold, row in enumerate(candidate):
        cells = []
        for name in METRICS:
            baseline = float(np.mean([folds[fold][name] for folds in baselines]))
            differences[name].append(row[name] - baseline)
            cells.append(f"{row[name]:.4f} / {baseline:.4f} / {row[name] - baseline:+.4f}")
        print(f"{fold + 1} | " + " | ".join(cells))
    for name in METRICS:
        values = np.array(differences[name])
        error = float(np.std(values, ddof=1)) / math.sqrt(len(values))
        print(
            f"{name}: mean difference {values.mean():+.4f} ± {error:.4f} (standard error), "
            f"worst fold {values.min():+.4f}"
        )


if __name__ == "__main__":
    main()
