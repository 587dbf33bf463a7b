"""Where the cross-validation errors are: confidence bands, patients, and pictures to look at.

Usage:
    python bench/ensemble_cv.py runs/cv-e20 --scores runs/cv-e20-scores.csv
    python bench/error_gallery.py runs/cv-e20-scores.csv [--column runs/cv-e20] \
        [--data ../shared/data/nih-cell-images] [--output runs/error-gallery]

Reads the per-cell scores that ``bench/ensemble_cv.py --scores`` writes (every cell of
the 160 patients, each scored by the fold model that never saw its patient) and prints
how many cells are wrong at each confidence, how the errors concentrate on patients,
and false-negative / false-positive rates by kind of patient. It also draws galleries
(PNG, into ``--output``; never commit them, they are pictures of the dataset) of
randomly drawn cells that the model calls wrong with at least 0.9 confidence, per
label, and of the worst patient's missed and caught cells, so a person can judge
whether the model or the label is wrong. Unit: cell; threshold 0.5.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CONFIDENCES = (0.5, 0.8, 0.9, 0.99)
THUMBNAIL = 96
COLUMNS = 8


def read_scores(path: Path, column: str | None) -> tuple[list[dict], np.ndarray, str]:
    """The score rows, P(Parasitized) from ``column`` (default: the first member)."""
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise SystemExit(f"{path} holds no rows; write it with bench/ensemble_cv.py --scores.")
    column = (
        column or [name for name in rows[0] if name not in ("fold", "path", "patient", "label")][0]
    )
    if column not in rows[0]:
        raise SystemExit(f"{path} has no column {column!r}; its columns: {', '.join(rows[0])}.")
    return rows, np.array([float(row[column]) for row in rows]), column


def wrong_confidence(rows: list[dict], scores: np.ndarray) -> np.ndarray:
    """The probability the model gives the class that is *not* the label (> 0.5: an error)."""
    parasitized = np.array([row["label"] == "Parasitized" for row in rows])
    return np.where(parasitized, 1.0 - scores, scores)


def gallery(rows: list[dict], scores: np.ndarray, data: Path, path: Path, limit: int) -> None:
    """Thumbnails of ``rows`` with their label's initial and P(Parasitized) above each."""
    rows, scores = rows[:limit], scores[:limit]
    lines = max(1, -(-len(rows) // COLUMNS))
    sheet = Image.new("RGB", (COLUMNS * THUMBNAIL, lines * (THUMBNAIL + 12)), "white")
    pen = ImageDraw.Draw(sheet)
    for index, (row, score) in enumerate(zip(rows, scores, strict=True)):
        with Image.open(data / row["path"]) as image:
            cell = image.convert("RGB")
        cell.thumbnail((THUMBNAIL, THUMBNAIL))
        left, top = (index % COLUMNS) * THUMBNAIL, (index // COLUMNS) * (THUMBNAIL + 12)
        sheet.paste(cell, (left, top + 12))
        pen.text((left + 2, top), f"{row['label'][0]} p={score:.2f}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"wrote {path} ({len(rows)} cells)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scores", type=Path, help="CSV from bench/ensemble_cv.py --scores")
    parser.add_argument("--column", help="which member's scores (default the first)")
    parser.add_argument("--data", type=Path, default=Path("../shared/data/nih-cell-images"))
    parser.add_argument("--output", type=Path, default=Path("runs/error-gallery"))
    parser.add_argument("--per-gallery", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows, scores, column = read_scores(args.scores, args.column)
    wrong = wrong_confidence(rows, scores)
    labels = np.array([row["label"] for row in rows])
    patients = np.array([row["patient"] for row in rows])
    print(f"{column}: {len(rows):,} cells, {int((wrong > 0.5).sum()):,} errors")
    for level in CONFIDENCES:
        hit = wrong >= level
        by_label = Counter(labels[hit])
        print(
            f"  wrong with confidence >= {level}: {int(hit.sum()):,} "
            f"({hit.mean():.2%} of cells; labelled Parasitized {by_label['Parasitized']}, "
            f"Uninfected {by_label['Uninfected']})"
        )
    errors = Counter(patients[wrong > 0.5])
    total = sum(errors.values())
    ranked = errors.most_common()
    for top in (1, 5, 10, 20):
        share = sum(count for _, count in ranked[:top]) / max(total, 1)
        print(f"  the {top} patient(s) with most errors hold {share:.1%} of them")
    healthy = {p for p in set(patients) if not np.any(labels[patients == p] == "Parasitized")}
    is_healthy = np.isin(patients, list(healthy))
    for name, mask in (
        ("Uninfected cells of healthy donors", is_healthy & (labels == "Uninfected")),
        ("Uninfected cells of infected patients", ~is_healthy & (labels == "Uninfected")),
        ("Parasitized cells", labels == "Parasitized"),
    ):
        print(f"  error rate, {name}: {(wrong[mask] > 0.5).mean():.2%} of {int(mask.sum()):,}")

    rng = np.random.default_rng(args.seed)
    for label in ("Parasitized", "Uninfected"):
        chosen = rng.permutation(np.flatnonzero((wrong >= 0.9) & (labels == label)))
        gallery(
            [rows[i] for i in chosen],
            scores[chosen],
            args.data,
            args.output / f"confident-errors-labelled-{label.lower()}.png",
            args.per_gallery,
        )
    worst = ranked[0][0] if ranked else None
    if worst is not None:
        for kind, keep in (("missed", wrong > 0.5), ("caught", wrong <= 0.5)):
            chosen = rng.permutation(
                np.flatnonzero((patients == worst) & (labels == "Parasitized") & keep)
            )
            gallery(
                [rows[i] for i in chosen],
                scores[chosen],
                args.data,
                args.output / f"patient-{worst}-parasitized-{kind}.png",
                args.per_gallery,
            )


if __name__ == "__main__":
    main()
