"""Flag suspected label noise for nested cross-validation, fold by fold.

Usage:
    python bench/noise_flags.py --data ../shared/data/nih-cell-images \
        --output runs/noise-pairs --flags runs/noise-flags.csv [--epochs 8] [--confidence 0.9]
    python bench/noise_flags.py --data ../shared/data/nih-cell-images --run runs/default-pc \
        --folds 4 --output runs/noise-default --flags runs/noise-flags-default.csv

Then ``malaria cv --data DIR --exclude-cells runs/noise-flags.csv`` leaves each outer
fold's flagged cells out of that fold's training split. With ``--run``, the list is for
one training run's split: its training and validation patients are cut into ``--folds``
patient-grouped folds, a model trained on the others scores each, and its test patients
take no part at all; then ``malaria train --exclude-cells runs/noise-flags-default.csv``
(same ``seed``, so the same split) trains without the flagged cells.

Why pairs: a cell is a suspect when a model that never saw it calls its published label
wrong with high confidence (most such cells in the NIH set look mislabelled,
docs/benchmarks.md §9.9). To test "train without the suspects" honestly, the flags used
for outer fold k must not depend on fold k's cells. For every pair of folds {j, k} one
model is trained on the other folds (its validation split taken from those); it scores
fold j's cells for outer fold k and fold k's cells for outer fold j. So every outer fold
gets flags for all its training cells from models that saw neither the cell's fold nor
the outer test fold: ``folds * (folds - 1) / 2`` trainings (10 for 5 folds) instead of
``folds * (folds - 1)`` for a plain nested cross-validation.

Resumable: finished pair models (their ``scores.csv``) are not retrained; an interrupted
one continues from its last epoch. Folds are those of ``malaria cv`` with the same seed.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import time
from pathlib import Path

from malaria_classifier.config import load_config
from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS
from malaria_classifier.data import check_dataset
from malaria_classifier.evaluate import write_rows_csv
from malaria_classifier.prediction import Predictor
from malaria_classifier.splits import assign_folds, fold_manifest, read_manifest
from malaria_classifier.training import train_model

SCORES_FILE = "scores.csv"
SCORE_COLUMNS = ("fold", "path", "sha256", "patient", "label", "probability")
FLAG_COLUMNS = ("fold", "path", "sha256", "patient", "label", "probability", "flagged_by")


def pair_dir(output: Path, first: int, second: int) -> Path:
    """Run folder of the model that saw neither fold ``first`` nor fold ``second``."""
    return output / f"pair_{first + 1}_{second + 1}"


def train_and_score(
    args: argparse.Namespace,
    report,
    records: list,
    fold_of_record: list[int],
    held_out: set[int],
    where: Path,
) -> None:
    """Train on the records of every fold but ``held_out``; score the held-out cells."""
    if (where / SCORES_FILE).is_file():
        print(f"{where.name}: scored earlier; skipped.", flush=True)
        return
    first = min(held_out)
    merged = [first if fold in held_out else fold for fold in fold_of_record]
    config = load_config(args.config, epochs=args.epochs)
    manifest = fold_manifest(
        records, report.hashes, merged, first, report.root, config.validation_fraction, config.seed
    )
    started = time.monotonic()
    resume = (where / "manifest.csv").is_file()
    train_model(args.data, config, where, resume=resume, verbose=2, manifest=manifest)
    tests = [row for row in manifest if row.split == "test"]
    predictor = Predictor(where / "model.keras")
    predictions = predictor.predict_paths([report.root / row.path for row in tests])
    fold_of_path = {
        record.path.relative_to(report.root).as_posix(): fold
        for record, fold in zip(records, fold_of_record, strict=True)
    }
    scores = []
    for row, prediction in zip(tests, predictions, strict=True):
        if prediction.error:
            raise SystemExit(f"{row.path} could not be scored: {prediction.error}")
        values = (fold_of_path[row.path] + 1, row.path, row.sha256, row.patient, row.label)
        scores.append(
            dict(zip(SCORE_COLUMNS, (*values, f"{prediction.probability:.6f}"), strict=True))
        )
    write_rows_csv(scores, list(SCORE_COLUMNS), where / SCORES_FILE)
    print(f"{where.name}: done in {(time.monotonic() - started) / 60:.1f} min", flush=True)


def contradicted(where: Path, confidence: float) -> list[dict[str, str]]:
    """The scored cells whose published label the model gives at most ``1 - confidence``."""
    found = []
    with open(where / SCORES_FILE, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            probability = float(row["probability"])
            label_probability = probability if row["label"] == POSITIVE_CLASS else 1 - probability
            if label_probability <= 1 - confidence:
                found.append(row | {"flagged_by": where.name})
    return found


def write_flags(args: argparse.Namespace, folds: int) -> None:
    """One row per (outer fold, training cell) whose label its pair model contradicts."""
    flags = []
    for first, second in itertools.combinations(range(folds), 2):
        for row in contradicted(pair_dir(args.output, first, second), args.confidence):
            # The cell is in one fold of the pair: it is a training cell of the other.
            outer = second if int(row["fold"]) - 1 == first else first
            flags.append(row | {"fold": outer + 1})
    flags.sort(key=lambda flag: (flag["fold"], flag["path"]))
    _write_csv(args.flags, FLAG_COLUMNS, flags)
    for outer in range(1, folds + 1):
        mine = [flag for flag in flags if flag["fold"] == outer]
        by_label = {name: sum(flag["label"] == name for flag in mine) for name in CLASS_NAMES}
        print(f"  outer fold {outer}: {len(mine)} training cells flagged {by_label}")


def flags_for_run(args: argparse.Namespace, report) -> None:
    """Flags for one run's split, from folds of its training and validation patients."""
    rows = read_manifest(args.run / "manifest.csv")
    seen = {row.path for row in rows if row.split in ("train", "validation")}
    records = [r for r in report.records if r.path.relative_to(report.root).as_posix() in seen]
    seed = load_config(args.config).seed
    fold_of_record = assign_folds(records, report.hashes, args.folds, seed)
    flags = []
    for fold in range(args.folds):
        where = args.output / f"fold_{fold + 1}"
        train_and_score(args, report, records, fold_of_record, {fold}, where)
        flags.extend(contradicted(where, args.confidence))
    flags.sort(key=lambda flag: flag["path"])
    columns = tuple(column for column in FLAG_COLUMNS if column != "fold")
    _write_csv(args.flags, columns, flags)
    in_training = {row.path for row in rows if row.split == "train"}
    by_label = {name: sum(flag["label"] == name for flag in flags) for name in CLASS_NAMES}
    print(
        f"  {len(flags)} cells flagged {by_label}, "
        f"{sum(flag['path'] in in_training for flag in flags)} of them in {args.run}'s training split"
    )


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict]) -> None:
    write_rows_csv(
        [{column: row[column] for column in columns} for row in rows], list(columns), path
    )
    print(f"Flags: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--output", type=Path, default=Path("runs/noise-pairs"))
    parser.add_argument("--flags", type=Path, default=Path("runs/noise-flags.csv"))
    parser.add_argument("--config", type=Path, default=None, help="recipe (default: built in)")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--run", type=Path, default=None, help="flag one run's training cells instead"
    )
    parser.add_argument("--epochs", type=int, default=8, help="epochs of each pair model")
    parser.add_argument(
        "--confidence", type=float, default=0.9, help="flag when P(other label) >= this"
    )
    args = parser.parse_args()
    report = check_dataset(args.data, progress=False)
    if args.run is not None:
        flags_for_run(args, report)
        return
    seed = load_config(args.config).seed
    fold_of_record = assign_folds(report.records, report.hashes, args.folds, seed)
    for first, second in itertools.combinations(range(args.folds), 2):
        where = pair_dir(args.output, first, second)
        train_and_score(args, report, report.records, fold_of_record, {first, second}, where)
    write_flags(args, args.folds)


if __name__ == "__main__":
    main()
