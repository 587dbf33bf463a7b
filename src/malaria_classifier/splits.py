"""Split images into train/validation/test by patient, and prove nothing leaks.

A cell-level random split lets one patient's cells sit in train and test, which
makes error rates look about three times lower than on new patients (Rajaraman et
al. 2018). Here the unit of splitting is the patient; patients that share an
identical image (same SHA-256) are kept together too.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from malaria_classifier.constants import CLASS_NAMES, POSITIVE_CLASS
from malaria_classifier.data import ImageRecord
from malaria_classifier.outputs import open_output

SPLITS: tuple[str, str, str] = ("train", "validation", "test")
MANIFEST_COLUMNS: tuple[str, ...] = ("path", "label", "patient", "split", "sha256")


class LeakageError(RuntimeError):
    """A patient or an identical image sits in two splits."""


@dataclass(frozen=True)
class ManifestRow:
    """One line of a run's ``manifest.csv``; ``path`` is relative to the data root."""

    path: str
    label: str
    patient: str
    split: str
    sha256: str


def split_by_patient(
    records: Sequence[ImageRecord],
    hashes: dict[Path, str],
    validation_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = 42,
) -> list[str]:
    """Assign each record to a split so that no patient is in two splits.

    Patients are stratified into those with parasitized cells and those without; in
    each stratum, patients (in a seeded random order) go to the split that brings the
    per-class cell counts closest to the requested proportions. So every split holds
    both classes, and infected and healthy patients, in similar proportions.

    Args:
        records: The labelled images.
        hashes: SHA-256 of each record's file, to keep identical images together.
        validation_fraction: Share of cells for validation.
        test_fraction: Share of cells for the test split.
        seed: Makes the assignment reproducible.

    Returns:
        The split name of each record, in the order of ``records``.

    Raises:
        ValueError: If the fractions are out of range or there are too few patients.
    """
    _check_fractions(validation_fraction, test_fraction)
    group_of_patient = _group_patients(records, hashes)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[group_of_patient[record.patient]].append(index)
    if len(groups) < len(SPLITS):
        raise ValueError(
            f"Only {len(groups)} patient group(s) found; a patient-level split needs at "
            f"least 3. Add images from more patients (see the patient rule in "
            f"malaria_classifier.data)."
        )
    targets = np.array(
        [1.0 - validation_fraction - test_fraction, validation_fraction, test_fraction]
    )
    chosen = _balance_groups(groups, records, targets, np.random.default_rng(seed))
    assignment = {name: SPLITS[index] for name, index in chosen.items()}
    empty = sorted(set(SPLITS) - set(assignment.values()))
    if empty:
        raise ValueError(
            f"The {', '.join(empty)} split(s) got no patients ({len(groups)} patient groups). "
            f"Add images from more patients."
        )
    return [assignment[group_of_patient[record.patient]] for record in records]


def _balance_groups(
    groups: dict[str, list[int]],
    records: Sequence[ImageRecord],
    targets: np.ndarray,
    rng: np.random.Generator,
) -> dict[str, int]:
    """Give each patient group a bin (index into ``targets``), stratified and balanced.

    Patients with and without parasitized cells are placed separately; within each
    stratum, groups in a seeded random order go to the bin that brings its per-class
    cell shares closest to ``targets``. Before that, every bin that is still empty
    takes the next group in the order (lowest bin first): the first stratum seeds
    all bins if it can, and later strata seed the bins it could not. So with at least
    as many groups as bins, no bin is left empty (a fold without test patients, a
    split without patients), whatever the mix of infected and healthy patients.

    When the first stratum has at least as many groups as bins, this is exactly the
    earlier algorithm (same random draws, same order, same bins), so the shipped
    model's split and existing cross-validations are unchanged.
    """
    assignment: dict[str, int] = {}
    bins = len(targets)
    empty_bins = list(range(bins))
    for stratum in _strata(groups, records):
        counts = np.array([_class_counts(groups[name], records) for name in stratum])
        totals = np.maximum(counts.sum(axis=0), 1)
        filled = np.zeros((bins, len(CLASS_NAMES)))
        order = rng.permutation(len(stratum))
        seeds, order = order[: len(empty_bins)], order[len(empty_bins) :]
        for bin_index, position in zip(empty_bins, seeds, strict=False):
            assignment[stratum[position]] = bin_index
            filled[bin_index] += counts[position]
        empty_bins = empty_bins[len(seeds) :]
        for position in order:
            chosen = _best_split(counts[position], filled, targets, totals)
            assignment[stratum[position]] = chosen
            filled[chosen] += counts[position]
    return assignment


def assign_folds(
    records: Sequence[ImageRecord], hashes: dict[Path, str], folds: int = 5, seed: int = 42
) -> list[int]:
    """Patient-grouped, stratified k-fold: the fold (0..folds-1) of each record.

    The same rules as :func:`split_by_patient`: a patient (and any patient sharing an
    identical image) lies in exactly one fold; infected patients and healthy donors
    are spread over the folds separately, and each fold gets about ``1/folds`` of
    each class's cells.

    Raises:
        ValueError: If ``folds`` is below 2, there are fewer patient groups than folds,
            or a fold got no patients (which the balancing rules out; checked so that a
            cross-validation can never train k-1 folds and then stop at an empty one).
    """
    if not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer of at least 2, got {folds!r}.")
    group_of_patient = _group_patients(records, hashes)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[group_of_patient[record.patient]].append(index)
    if len(groups) < folds:
        raise ValueError(
            f"{folds} folds need at least {folds} patient groups, but only {len(groups)} "
            f"were found. Use fewer folds or add images from more patients."
        )
    chosen = _balance_groups(
        groups, records, np.full(folds, 1.0 / folds), np.random.default_rng(seed)
    )
    empty = sorted(set(range(folds)) - set(chosen.values()))
    if empty:
        raise ValueError(
            f"Fold(s) {[fold + 1 for fold in empty]} of {folds} got no patients "
            f"({len(groups)} patient groups). Use fewer folds or add images from more "
            f"patients."
        )
    return [chosen[group_of_patient[record.patient]] for record in records]


def fold_manifest(
    records: Sequence[ImageRecord],
    hashes: dict[Path, str],
    fold_of_record: Sequence[int],
    fold: int,
    root: Path,
    validation_fraction: float = 0.15,
    seed: int = 42,
) -> list[ManifestRow]:
    """The manifest of one cross-validation fold: its patients are ``test``.

    The other folds' patients are split into ``train`` and ``validation`` (for early
    stopping and the best epoch) with ``validation_fraction`` of *their* cells in
    validation, by patient and stratified like :func:`split_by_patient`.

    ``fold`` counts from 0, as :func:`assign_folds` numbers folds; messages count from
    1, as the run folders do (``fold_1``, ...), since that is what a user sees.

    Raises:
        ValueError: If ``fold`` has no records, or the rest cannot be split.
    """
    if fold not in set(fold_of_record):
        present = sorted(value + 1 for value in set(fold_of_record))
        raise ValueError(
            f"Fold {fold + 1} has no records; the records lie in folds {present} "
            f"(numbered from 1, like fold_1). Make the folds with assign_folds, which gives "
            f"every fold patients, or use fewer folds."
        )
    if not 0.0 < validation_fraction < 0.9:
        raise ValueError(
            f"validation_fraction must be between 0 and 0.9, got {validation_fraction}."
        )
    rest = [index for index, value in enumerate(fold_of_record) if value != fold]
    rest_records = [records[index] for index in rest]
    group_of_patient = _group_patients(rest_records, hashes)
    groups: dict[str, list[int]] = defaultdict(list)
    for position, record in enumerate(rest_records):
        groups[group_of_patient[record.patient]].append(position)
    if len(groups) < 2:
        raise ValueError(
            f"Only {len(groups)} patient group(s) outside fold {fold + 1}; training needs at "
            f"least 2 (train and validation). Use fewer folds or more patients."
        )
    targets = np.array([1.0 - validation_fraction, validation_fraction])
    chosen = _balance_groups(groups, rest_records, targets, np.random.default_rng(seed + fold))
    splits = ["test"] * len(records)
    for index in rest:
        splits[index] = ("train", "validation")[chosen[group_of_patient[records[index].patient]]]
    return build_manifest(records, hashes, splits, root)


def _class_counts(members: list[int], records: Sequence[ImageRecord]) -> list[int]:
    return [sum(records[i].label == label for i in members) for label in CLASS_NAMES]


def _best_split(
    group_counts: np.ndarray, filled: np.ndarray, targets: np.ndarray, totals: np.ndarray
) -> int:
    """The split whose per-class shares move closest to their targets with this group.

    Minimizes the increase in squared error between each split's share of each class
    and its target fraction, so classes stay in similar proportions in every split.
    """
    goal = targets[:, None] * totals[None, :]
    increase = ((group_counts**2 + 2 * group_counts * (filled - goal)) / totals**2).sum(axis=1)
    return int(np.argmin(increase))


def _check_fractions(validation_fraction: float, test_fraction: float) -> None:
    for name, value in (
        ("validation_fraction", validation_fraction),
        ("test_fraction", test_fraction),
    ):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be between 0 and 1 (exclusive), got {value}.")
    if validation_fraction + test_fraction >= 0.9:
        raise ValueError(
            f"validation_fraction + test_fraction = {validation_fraction + test_fraction:.2f} "
            f"leaves almost nothing to train on; keep their sum below 0.9."
        )


def _group_patients(records: Sequence[ImageRecord], hashes: dict[Path, str]) -> dict[str, str]:
    """Union patients that share an identical image; returns patient -> group name."""
    parent: dict[str, str] = {record.patient: record.patient for record in records}

    def find(patient: str) -> str:
        while parent[patient] != patient:
            parent[patient] = parent[parent[patient]]
            patient = parent[patient]
        return patient

    first_patient_of_hash: dict[str, str] = {}
    for record in records:
        digest = hashes.get(record.path)
        if digest is None:
            continue
        other = first_patient_of_hash.setdefault(digest, record.patient)
        root_a, root_b = find(other), find(record.patient)
        if root_a != root_b:
            parent[max(root_a, root_b)] = min(root_a, root_b)
    return {patient: find(patient) for patient in parent}


def _strata(groups: dict[str, list[int]], records: Sequence[ImageRecord]) -> list[list[str]]:
    with_positive = sorted(
        name
        for name, members in groups.items()
        if any(records[i].label == POSITIVE_CLASS for i in members)
    )
    without_positive = sorted(set(groups) - set(with_positive))
    return [stratum for stratum in (with_positive, without_positive) if stratum]


def build_manifest(
    records: Sequence[ImageRecord], hashes: dict[Path, str], splits: Sequence[str], root: Path
) -> list[ManifestRow]:
    """Combine records, hashes and split names into manifest rows (paths relative)."""
    return [
        ManifestRow(
            path=record.path.relative_to(root).as_posix(),
            label=record.label,
            patient=record.patient,
            split=split,
            sha256=hashes[record.path],
        )
        for record, split in zip(records, splits, strict=True)
    ]


def check_no_leakage(rows: Sequence[ManifestRow]) -> None:
    """Fail loudly if a patient or an identical image appears in two splits.

    Raises:
        LeakageError: Naming the patient or files and the splits involved.
    """
    for key, what in (("patient", "Patient"), ("sha256", "Identical image (SHA-256)")):
        splits_of: dict[str, set[str]] = defaultdict(set)
        for row in rows:
            splits_of[getattr(row, key)].add(row.split)
        leaks = {value: sorted(found) for value, found in splits_of.items() if len(found) > 1}
        if leaks:
            value, found = next(iter(sorted(leaks.items())))
            examples = [row.path for row in rows if getattr(row, key) == value][:3]
            raise LeakageError(
                f"{what} {value} is in splits {found} (files {examples}; {len(leaks)} such "
                f"case(s) in total). Test figures would be inflated. Re-create the split with "
                f"split_by_patient instead of editing the manifest by hand."
            )


def split_summary(rows: Sequence[ManifestRow]) -> dict[str, dict[str, int]]:
    """Cells per class and patients per split, for logs and the model card."""
    summary: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        members = [row for row in rows if row.split == split]
        entry = {label: sum(row.label == label for row in members) for label in CLASS_NAMES}
        entry["cells"] = len(members)
        entry["patients"] = len({row.patient for row in members})
        summary[split] = entry
    return summary


def write_manifest(rows: Sequence[ManifestRow], path: Path) -> None:
    """Write the manifest CSV atomically (a crash never leaves half a file)."""
    with open_output(path) as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        for row in rows:
            writer.writerow([getattr(row, column) for column in MANIFEST_COLUMNS])


def missing_cells(rows: Iterable[ManifestRow], root: Path) -> list[str]:
    """The manifest paths with no file under ``root`` (a run opened on other data)."""
    return [row.path for row in rows if not (root / row.path).is_file()]


def read_manifest(path: Path) -> list[ManifestRow]:
    """Read a manifest CSV written by :func:`write_manifest`.

    Raises:
        ValueError: If the file is not UTF-8 text or lacks the expected columns.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or [])
            if missing:
                raise ValueError(
                    f"{path} is not a manifest: columns {sorted(missing)} are missing "
                    f"(expected {', '.join(MANIFEST_COLUMNS)})."
                )
            return [
                ManifestRow(**{column: line[column] for column in MANIFEST_COLUMNS})
                for line in reader
            ]
    except UnicodeDecodeError:
        raise ValueError(
            f"{path} is not a manifest: it is not UTF-8 text. Use the manifest.csv that "
            f"`malaria train` wrote into the run folder."
        ) from None


CELL_LIST_KEYS: tuple[str, ...] = ("sha256", "path")


def read_cell_list(path: str | Path) -> dict[int | None, set[str]]:
    """Read a list of cells to leave out of training, e.g. suspected label errors.

    The file is a CSV with a ``sha256`` or a ``path`` column (as in ``manifest.csv``:
    the SHA-256 of the image, or its path relative to the data root); an optional
    ``fold`` column (1, 2, ...) limits a row to that cross-validation fold, so that
    nested cross-validation can give each fold its own list.

    Returns:
        The cells' sha256 or path per fold number; key ``None`` holds the rows that
        apply to every fold (no ``fold`` column, or an empty value).

    Raises:
        ValueError: If the file is missing, has neither column, or a fold is not a
            positive integer; the message names the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"Cell list {path} does not exist. Give a CSV with a sha256 or path column "
            f"(one cell per row, as in a run's manifest.csv)."
        )
    try:
        return _read_cell_rows(path)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"Cell list {path} is not UTF-8 text (byte {error.start} cannot be read). Save "
            f"it as UTF-8 CSV (in a spreadsheet: CSV UTF-8) and pass it again."
        ) from None


def _read_cell_rows(path: Path) -> dict[int | None, set[str]]:
    cells: dict[int | None, set[str]] = defaultdict(set)
    # utf-8-sig: a spreadsheet's "CSV UTF-8" starts with a byte-order mark, which would
    # otherwise become part of the first column's name.
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [key for key in CELL_LIST_KEYS if key in (reader.fieldnames or [])]
        if not columns:
            raise ValueError(
                f"Cell list {path} has columns {reader.fieldnames or []}, but needs a sha256 "
                f"or a path column (as in a run's manifest.csv)."
            )
        for line_number, line in enumerate(reader, start=2):
            fold = _fold_number(line.get("fold"), path, line_number)
            # One key per cell (sha256 if given), so counts are counts of cells.
            if line[columns[0]]:
                cells[fold].add(line[columns[0]])
    return dict(cells)


def _fold_number(value: str | None, path: Path, line_number: int) -> int | None:
    if value is None or value.strip() == "":
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise ValueError(
            f"Cell list {path}, line {line_number}: fold must be a fold number (1, 2, ...), "
            f"got {value!r}."
        )
    return int(value)


def leave_out_of_training(
    rows: Sequence[ManifestRow], cells: set[str]
) -> tuple[list[ManifestRow], dict[str, int]]:
    """The training rows named in ``cells`` (by sha256 or path), and what matched where.

    Only training cells are ever left out: validation and test cells stay, so every
    figure is still scored against the published labels of every cell.

    Returns:
        The rows to leave out, and counts: ``left_out`` (rows), ``not_training``
        (rows of listed cells in validation or test, kept) and ``not_found`` (listed
        cells in no row).
    """
    matched: set[str] = set()
    left_out, kept_elsewhere = [], 0
    for row in rows:
        hits = {row.sha256, row.path} & cells
        if not hits:
            continue
        matched |= hits
        if row.split == "train":
            left_out.append(row)
        else:
            kept_elsewhere += 1
    counts = {
        "left_out": len(left_out),
        "not_training": kept_elsewhere,
        "not_found": len(cells - matched),
    }
    return left_out, counts
