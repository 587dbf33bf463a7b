"""Tests for ``malaria_classifier.splits``: patient-level splits, leakage checks, manifests.

Records are built directly with fake paths and fake hashes: splitting never opens a file.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from malaria_classifier.constants import CLASS_NAMES
from malaria_classifier.data import ImageRecord
from malaria_classifier.splits import (
    MANIFEST_COLUMNS,
    LeakageError,
    ManifestRow,
    _balance_groups,
    _best_split,
    _class_counts,
    _group_patients,
    _strata,
    assign_folds,
    build_manifest,
    check_no_leakage,
    fold_manifest,
    leave_out_of_training,
    read_cell_list,
    read_manifest,
    split_by_patient,
    split_summary,
    write_manifest,
)

ROOT = Path("/data/cell_images")


def make_records(
    n_infected: int,
    n_healthy: int,
    parasitized_per_patient: int = 5,
    uninfected_per_infected: int = 5,
    cells_per_healthy: int = 10,
) -> tuple[list[ImageRecord], dict[Path, str]]:
    """Records for ``P1..Pn`` (cells in both classes) and ``C1..Cm`` (Uninfected only).

    Every record gets a unique fake path and a unique fake hash.
    """
    records: list[ImageRecord] = []

    def add(patient: str, label: str, count: int) -> None:
        for cell in range(count):
            path = ROOT / label / f"{patient}_field_cell_{cell}.png"
            records.append(ImageRecord(path, label, patient))

    for n in range(1, n_infected + 1):
        add(f"P{n}", "Parasitized", parasitized_per_patient)
        add(f"P{n}", "Uninfected", uninfected_per_infected)
    for n in range(1, n_healthy + 1):
        add(f"C{n}", "Uninfected", cells_per_healthy)
    hashes = {record.path: f"hash-of-{record.path.name}-{record.label}" for record in records}
    return records, hashes


def splits_of_patients(records, splits) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for record, split in zip(records, splits, strict=True):
        found[record.patient].add(split)
    return found


def row(path="Parasitized/a.png", label="Parasitized", patient="P1", split="train", sha="h1"):
    return ManifestRow(path=path, label=label, patient=patient, split=split, sha256=sha)


def clean_manifest() -> list[ManifestRow]:
    """Four cells, two training ones of one patient, then one validation and one test cell."""
    return [
        row("Parasitized/a.png", "Parasitized", "P1", "train", "h1"),
        row("Uninfected/b.png", "Uninfected", "P1", "train", "h2"),
        row("Parasitized/c.png", "Parasitized", "P2", "validation", "h3"),
        row("Uninfected/d.png", "Uninfected", "C1", "test", "h4"),
    ]


# --- split_by_patient --------------------------------------------------------------------


def test_split_returns_one_known_split_per_record():
    records, hashes = make_records(20, 10)

    splits = split_by_patient(records, hashes)

    assert len(splits) == len(records)
    assert set(splits) == {"train", "validation", "test"}


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_no_patient_is_in_two_splits(seed):
    records, hashes = make_records(30, 15)

    splits = split_by_patient(records, hashes, seed=seed)

    found = splits_of_patients(records, splits)
    assert len(found) == 45
    assert all(len(names) == 1 for names in found.values())


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    records, hashes = make_records(30, 15)

    first = split_by_patient(records, hashes, seed=7)
    again = split_by_patient(records, hashes, seed=7)
    other = split_by_patient(records, hashes, seed=8)

    assert first == again
    assert first != other


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_every_split_has_both_classes_and_healthy_donors(seed):
    records, hashes = make_records(20, 10)

    splits = split_by_patient(records, hashes, seed=seed)

    labels_in: dict[str, set[str]] = defaultdict(set)
    healthy_in: Counter[str] = Counter()
    for record, split in zip(records, splits, strict=True):
        labels_in[split].add(record.label)
        healthy_in[split] += record.patient.startswith("C")
    for split in ("train", "validation", "test"):
        assert labels_in[split] == {"Parasitized", "Uninfected"}, split
        assert healthy_in[split] > 0, split


@pytest.mark.parametrize(
    ("validation_fraction", "test_fraction"), [(0.15, 0.15), (0.2, 0.1), (0.1, 0.25)]
)
def test_fractions_are_respected_in_cells(validation_fraction, test_fraction):
    records, hashes = make_records(60, 40)  # 100 patients of 10 cells each
    assert len(records) == 1000

    splits = split_by_patient(
        records, hashes, validation_fraction=validation_fraction, test_fraction=test_fraction
    )

    counts = Counter(splits)
    expected = {
        "train": 1000 * (1 - validation_fraction - test_fraction),
        "validation": 1000 * validation_fraction,
        "test": 1000 * test_fraction,
    }
    for split, cells in expected.items():
        assert abs(counts[split] - cells) <= 20, (split, counts[split], cells)


def test_parasitized_share_is_similar_in_every_split():
    records, hashes = make_records(60, 40)

    splits = split_by_patient(records, hashes)

    for split in ("train", "validation", "test"):
        labels = [r.label for r, s in zip(records, splits, strict=True) if s == split]
        share = labels.count("Parasitized") / len(labels)
        assert 0.2 <= share <= 0.4, (split, share)  # 300 of 1000 cells overall


@pytest.mark.parametrize("seed", range(5))
def test_each_stratum_is_shared_out_in_proportion(seed):
    # Infected patients and healthy donors are split separately, so each group of patients
    # is spread over the splits in the requested proportions (within one patient's cells).
    records, hashes = make_records(40, 40)  # 400 cells from each kind of patient

    splits = split_by_patient(records, hashes, seed=seed)

    for kind in ("P", "C"):
        counts = Counter(s for r, s in zip(records, splits, strict=True) if r.patient[0] == kind)
        assert abs(counts["train"] - 280) <= 10, (kind, counts)
        assert abs(counts["validation"] - 60) <= 10, (kind, counts)
        assert abs(counts["test"] - 60) <= 10, (kind, counts)


@pytest.mark.parametrize("seed", range(12))
def test_patients_sharing_an_identical_image_stay_together(seed):
    records, hashes = make_records(20, 10)
    # P3 and C4 each hold a copy of one of P1's images; C4 also shares one with C9.
    by_name = {(r.patient, r.path.name, r.label): r for r in records}
    p1_image = by_name[("P1", "P1_field_cell_0.png", "Parasitized")]
    hashes[by_name[("P3", "P3_field_cell_2.png", "Uninfected")].path] = hashes[p1_image.path]
    hashes[by_name[("C4", "C4_field_cell_0.png", "Uninfected")].path] = hashes[p1_image.path]
    hashes[by_name[("C9", "C9_field_cell_5.png", "Uninfected")].path] = hashes[
        by_name[("C4", "C4_field_cell_7.png", "Uninfected")].path
    ] = "shared-by-C4-and-C9"

    splits = split_by_patient(records, hashes, seed=seed)

    found = splits_of_patients(records, splits)
    assert found["P1"] == found["P3"] == found["C4"] == found["C9"]
    assert len(found["P1"]) == 1


def test_records_without_a_hash_are_split_by_patient_only():
    records, hashes = make_records(10, 5)
    del hashes[records[0].path]

    splits = split_by_patient(records, hashes)

    assert all(len(s) == 1 for s in splits_of_patients(records, splits).values())


@pytest.mark.parametrize(
    ("validation_fraction", "test_fraction", "message"),
    [
        (0.0, 0.15, r"validation_fraction must be between 0 and 1 \(exclusive\), got 0\.0"),
        (1.0, 0.15, r"validation_fraction must be between 0 and 1 \(exclusive\), got 1\.0"),
        (0.15, -0.1, r"test_fraction must be between 0 and 1 \(exclusive\), got -0\.1"),
        (0.15, 1.5, r"test_fraction must be between 0 and 1 \(exclusive\), got 1\.5"),
        (0.5, 0.4, r"validation_fraction \+ test_fraction = 0\.90 leaves almost nothing"),
    ],
)
def test_bad_fractions_are_rejected(validation_fraction, test_fraction, message):
    records, hashes = make_records(10, 5)

    with pytest.raises(ValueError, match=message):
        split_by_patient(
            records, hashes, validation_fraction=validation_fraction, test_fraction=test_fraction
        )


def test_too_few_patients_is_rejected():
    records, hashes = make_records(1, 1)

    with pytest.raises(ValueError, match=r"Only 2 patient group\(s\) found; .* at least 3"):
        split_by_patient(records, hashes)


def test_patients_merged_by_shared_images_count_as_one_group():
    records, hashes = make_records(2, 1)
    for record in records:
        hashes[record.path] = "one image everywhere"

    with pytest.raises(ValueError, match=r"Only 1 patient group\(s\) found"):
        split_by_patient(records, hashes)


def test_three_patients_give_three_non_empty_splits():
    records, hashes = make_records(3, 0)

    splits = split_by_patient(records, hashes)

    assert set(splits) == {"train", "validation", "test"}


def test_two_infected_patients_and_healthy_donors_fill_every_split():
    """Too few infected patients to seed three splits: healthy donors seed the rest."""
    records, hashes = make_records(2, 4)

    splits = split_by_patient(records, hashes, seed=0)

    assert set(splits) == {"train", "validation", "test"}
    infected_in = {
        split
        for split, names in _patients_by_split(records, splits).items()
        if any(name.startswith("P") for name in names)
    }
    assert infected_in == {"train", "validation"}  # the two infected patients apart


def _patients_by_split(records, splits) -> dict[str, set[str]]:
    found: dict[str, set[str]] = defaultdict(set)
    for record, split in zip(records, splits, strict=True):
        found[split].add(record.patient)
    return found


# --- balancing and folds -----------------------------------------------------------------


def varied_records(n_infected: int, n_healthy: int) -> tuple[list[ImageRecord], dict[Path, str]]:
    """Like ``make_records``, with patients of different sizes, so balancing has choices."""
    records: list[ImageRecord] = []

    def add(patient: str, label: str, count: int) -> None:
        records.extend(
            ImageRecord(ROOT / label / f"{patient}_cell_{cell}.png", label, patient)
            for cell in range(count)
        )

    for n in range(1, n_infected + 1):
        add(f"P{n}", "Parasitized", 2 + (n * 7) % 9)
        add(f"P{n}", "Uninfected", 1 + (n * 5) % 6)
    for n in range(1, n_healthy + 1):
        add(f"C{n}", "Uninfected", 3 + (n * 4) % 7)
    hashes = {record.path: f"h-{record.path.name}-{record.label}" for record in records}
    return records, hashes


def patient_groups(records, hashes) -> dict[str, list[int]]:
    group_of_patient = _group_patients(records, hashes)
    groups: dict[str, list[int]] = defaultdict(list)
    for index, record in enumerate(records):
        groups[group_of_patient[record.patient]].append(index)
    return groups


def balance_groups_as_shipped(groups, records, targets, rng) -> dict[str, int]:
    """``_balance_groups`` as released (frozen copy): only the first stratum seeded bins.

    The shipped model's split and existing cross-validations were made with it.
    """
    assignment: dict[str, int] = {}
    bins = len(targets)
    for stratum_index, stratum in enumerate(_strata(groups, records)):
        counts = np.array([_class_counts(groups[name], records) for name in stratum])
        totals = np.maximum(counts.sum(axis=0), 1)
        filled = np.zeros((bins, len(CLASS_NAMES)))
        order = rng.permutation(len(stratum))
        if stratum_index == 0 and len(stratum) >= bins:
            for bin_index, position in enumerate(order[:bins]):
                assignment[stratum[position]] = bin_index
                filled[bin_index] += counts[position]
            order = order[bins:]
        for position in order:
            chosen = _best_split(counts[position], filled, targets, totals)
            assignment[stratum[position]] = chosen
            filled[chosen] += counts[position]
    return assignment


@pytest.mark.parametrize(
    "targets",
    [[0.2] * 5, [1 / 3] * 3, [0.1] * 10, [0.7, 0.15, 0.15], [0.85, 0.15], [0.75, 0.25]],
    ids=["5-folds", "3-folds", "10-folds", "split", "fold-rest-0.15", "fold-rest-0.25"],
)
@pytest.mark.parametrize("n_infected", [10, 14])
def test_balancing_is_unchanged_when_the_first_stratum_fills_every_bin(targets, n_infected):
    records, hashes = varied_records(n_infected, 6)
    groups = patient_groups(records, hashes)
    for seed in range(10):
        new = _balance_groups(groups, records, np.array(targets), np.random.default_rng(seed))
        old = balance_groups_as_shipped(
            groups, records, np.array(targets), np.random.default_rng(seed)
        )
        assert new == old, seed


def by_patient(records, values) -> dict[str, object]:
    return dict(
        sorted(
            {record.patient: value for record, value in zip(records, values, strict=True)}.items()
        )
    )


def test_recorded_folds_fold_split_and_split_are_unchanged():
    """Recorded with the released code: folds, a fold's train/validation, the split."""
    records, hashes = varied_records(9, 5)

    folds = assign_folds(records, hashes, 5, 42)
    rows = fold_manifest(records, hashes, folds, 2, ROOT, 0.25, 42)

    assert by_patient(records, folds) == {
        "C1": 2, "C2": 3, "C3": 0, "C4": 4, "C5": 1, "P1": 1, "P2": 3,
        "P3": 3, "P4": 0, "P5": 4, "P6": 2, "P7": 0, "P8": 2, "P9": 4,
    }  # fmt: skip
    assert {row.patient: row.split for row in rows} == {
        "C1": "test", "C2": "train", "C3": "train", "C4": "train", "C5": "validation",
        "P1": "validation", "P2": "train", "P3": "train", "P4": "train", "P5": "train",
        "P6": "test", "P7": "train", "P8": "test", "P9": "train",
    }  # fmt: skip
    assert by_patient(records, split_by_patient(records, hashes, 0.15, 0.15, 42)) == {
        "C1": "train", "C2": "validation", "C3": "train", "C4": "test", "C5": "train",
        "P1": "validation", "P2": "train", "P3": "train", "P4": "train", "P5": "train",
        "P6": "train", "P7": "train", "P8": "test", "P9": "train",
    }  # fmt: skip


@pytest.mark.parametrize("folds", [3, 5, 6])
def test_every_fold_gets_patients_when_infected_patients_are_fewer_than_folds(folds):
    """Two infected patients, four healthy donors: the donors seed the folds left empty."""
    records, hashes = varied_records(2, 4)
    for seed in range(10):
        fold_of_record = assign_folds(records, hashes, folds, seed)

        assert set(fold_of_record) == set(range(folds)), seed
        fold_of_patient = by_patient(records, fold_of_record)
        assert fold_of_patient["P1"] != fold_of_patient["P2"]  # infected spread first
        for record, fold in zip(records, fold_of_record, strict=True):
            assert fold_of_patient[record.patient] == fold  # patients stay whole


def test_balancing_seeds_every_bin_from_later_strata():
    """One infected patient and two donors, three bins: each gets one group."""
    records, hashes = varied_records(1, 2)
    groups = patient_groups(records, hashes)
    chosen = _balance_groups(groups, records, np.full(3, 1 / 3), np.random.default_rng(0))
    assert sorted(chosen.values()) == [0, 1, 2]
    assert chosen["P1"] == 0  # the infected stratum seeds first, from bin 0


def test_an_empty_fold_is_refused_naming_it_from_one(monkeypatch):
    records, hashes = varied_records(6, 2)
    monkeypatch.setattr(
        "malaria_classifier.splits._balance_groups",
        lambda groups, *_: dict.fromkeys(groups, 0),
    )
    with pytest.raises(ValueError, match=r"Fold\(s\) \[2, 3\] of 3 got no patients \(8 patient"):
        assign_folds(records, hashes, 3, 42)


def test_fold_manifest_numbers_folds_from_one_like_the_fold_folders():
    records, hashes = varied_records(4, 0)
    fold_of_record = [0 if record.patient in {"P1", "P2"} else 2 for record in records]

    with pytest.raises(
        ValueError, match=r"Fold 2 has no records; the records lie in folds \[1, 3\]"
    ):
        fold_manifest(records, hashes, fold_of_record, 1, ROOT)
    only_p3 = [0 if record.patient == "P3" else 1 for record in records]
    with pytest.raises(ValueError, match=r"Only 1 patient group\(s\) outside fold 2;"):
        fold_manifest(records, hashes, only_p3, 1, ROOT)


# --- check_no_leakage --------------------------------------------------------------------


def test_clean_manifest_passes():
    rows = clean_manifest()

    assert check_no_leakage(rows) is None


def test_patient_in_two_splits_is_a_leak():
    rows = [
        row("Parasitized/a.png", "Parasitized", "P1", "train", "h1"),
        row("Uninfected/b.png", "Uninfected", "P1", "test", "h2"),
        row("Parasitized/c.png", "Parasitized", "P2", "validation", "h3"),
    ]

    with pytest.raises(
        LeakageError,
        match=r"^Patient P1 is in splits \['test', 'train'\] \(files \['Parasitized/a\.png', "
        r"'Uninfected/b\.png'\]; 1 such case\(s\) in total\)",
    ):
        check_no_leakage(rows)


def test_identical_image_in_two_splits_is_a_leak():
    rows = [
        row("Parasitized/a.png", "Parasitized", "P1", "train", "same"),
        row("Parasitized/c.png", "Parasitized", "P2", "validation", "same"),
        row("Uninfected/d.png", "Uninfected", "C1", "test", "h4"),
    ]

    with pytest.raises(
        LeakageError,
        match=r"^Identical image \(SHA-256\) same is in splits \['train', 'validation'\]",
    ):
        check_no_leakage(rows)


def test_identical_image_within_one_split_is_not_a_leak():
    rows = [
        row("Parasitized/a.png", "Parasitized", "P1", "train", "same"),
        row("Parasitized/c.png", "Parasitized", "P2", "train", "same"),
    ]

    check_no_leakage(rows)  # passes by not raising: a duplicate inside one split is no leak


def test_manifest_from_split_by_patient_has_no_leak():
    records, hashes = make_records(20, 10)
    splits = split_by_patient(records, hashes, seed=3)

    rows = build_manifest(records, hashes, splits, ROOT)

    # Not vacuous: every record is in the manifest, in its own split, and all three splits
    # hold patients (a manifest with one split could never leak).
    assert [row.split for row in rows] == splits
    assert {row.patient for row in rows} == {record.patient for record in records}
    assert {row.split for row in rows} == {"train", "validation", "test"}
    check_no_leakage(rows)  # passes by not raising


# --- manifests ---------------------------------------------------------------------------


def test_build_manifest_uses_relative_posix_paths():
    records, hashes = make_records(
        3, 1, parasitized_per_patient=1, uninfected_per_infected=0, cells_per_healthy=1
    )
    splits = ["train", "validation", "test", "train"]

    rows = build_manifest(records, hashes, splits, ROOT)

    assert rows[0] == ManifestRow(
        path="Parasitized/P1_field_cell_0.png",
        label="Parasitized",
        patient="P1",
        split="train",
        sha256=hashes[records[0].path],
    )
    assert [r.split for r in rows] == splits
    assert rows[3].path == "Uninfected/C1_field_cell_0.png"


def test_manifest_round_trip(tmp_path):
    records, hashes = make_records(6, 3)
    rows = build_manifest(records, hashes, split_by_patient(records, hashes), ROOT)
    path = tmp_path / "manifest.csv"

    write_manifest(rows, path)

    assert read_manifest(path) == rows
    with open(path, newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert header == ["path", "label", "patient", "split", "sha256"]
    assert tuple(header) == MANIFEST_COLUMNS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv"]  # no .tmp left


def test_manifest_round_trip_keeps_commas_and_quotes(tmp_path):
    rows = [row('Parasitized/odd, "name".png', "Parasitized", "field:odd, x", "test", "h1")]
    path = tmp_path / "manifest.csv"

    write_manifest(rows, path)

    assert read_manifest(path) == rows


def test_write_manifest_replaces_an_old_one(tmp_path):
    path = tmp_path / "manifest.csv"
    write_manifest([row(), row(path="Parasitized/b.png", sha="h2")], path)

    write_manifest([row()], path)

    assert read_manifest(path) == [row()]


def test_read_manifest_missing_columns(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("path,label,patient\nParasitized/a.png,Parasitized,P1\n", encoding="utf-8")

    with pytest.raises(
        ValueError, match=r"columns \['sha256', 'split'\] are missing \(expected path, label"
    ):
        read_manifest(path)


def test_read_manifest_of_an_empty_file(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_text("", encoding="utf-8")

    with pytest.raises(ValueError, match="is not a manifest"):
        read_manifest(path)


# --- split_summary -----------------------------------------------------------------------


def test_split_summary_counts_cells_classes_and_patients():
    rows = [
        row("Parasitized/a.png", "Parasitized", "P1", "train", "h1"),
        row("Parasitized/b.png", "Parasitized", "P1", "train", "h2"),
        row("Uninfected/c.png", "Uninfected", "P1", "train", "h3"),
        row("Uninfected/d.png", "Uninfected", "C1", "train", "h4"),
        row("Parasitized/e.png", "Parasitized", "P2", "validation", "h5"),
        row("Uninfected/f.png", "Uninfected", "C2", "validation", "h6"),
        row("Uninfected/g.png", "Uninfected", "C2", "validation", "h7"),
    ]

    summary = split_summary(rows)

    assert summary == {
        "train": {"Uninfected": 2, "Parasitized": 2, "cells": 4, "patients": 2},
        "validation": {"Uninfected": 2, "Parasitized": 1, "cells": 3, "patients": 2},
        "test": {"Uninfected": 0, "Parasitized": 0, "cells": 0, "patients": 0},
    }


# --- cell lists: leaving cells out of training ------------------------------------------


def write_csv(path: Path, header: list[str], lines: list[list[str]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(lines)
    return path


def test_cell_list_by_sha256_applies_to_every_fold(tmp_path):
    listed = write_csv(tmp_path / "cells.csv", ["sha256", "note"], [["h1", "x"], ["h2", ""]])

    assert read_cell_list(listed) == {None: {"h1", "h2"}}


def test_cell_list_by_path_and_fold_gives_each_fold_its_cells(tmp_path):
    listed = write_csv(
        tmp_path / "cells.csv",
        ["fold", "path"],
        [["1", "Parasitized/a.png"], ["2", "Uninfected/b.png"], ["", "Uninfected/c.png"]],
    )

    assert read_cell_list(listed) == {
        1: {"Parasitized/a.png"},
        2: {"Uninfected/b.png"},
        None: {"Uninfected/c.png"},
    }


@pytest.mark.parametrize(
    ("header", "lines", "message"),
    [
        (["name"], [["a.png"]], r"has columns \['name'\], but needs a sha256 or a path column"),
        (["fold", "sha256"], [["0", "h1"]], r"line 2: fold must be a fold number .* got '0'"),
        (["fold", "sha256"], [["one", "h1"]], r"line 2: fold must be .* got 'one'"),
    ],
)
def test_bad_cell_lists_are_refused_naming_file_and_line(tmp_path, header, lines, message):
    listed = write_csv(tmp_path / "cells.csv", header, lines)

    with pytest.raises(ValueError, match=message) as raised:
        read_cell_list(listed)
    assert str(listed) in str(raised.value)


def test_missing_cell_list_says_what_file_is_expected(tmp_path):
    with pytest.raises(ValueError, match="does not exist. Give a CSV with a sha256 or path"):
        read_cell_list(tmp_path / "absent.csv")


def test_only_training_cells_are_left_out_and_the_rest_is_counted():
    rows = clean_manifest()

    left_out, counts = leave_out_of_training(rows, {"h1", "Uninfected/b.png", "h3", "h4", "h9"})

    assert left_out == rows[:2]
    assert counts == {"left_out": 2, "not_training": 2, "not_found": 1}


def test_a_manifest_that_is_not_text_is_named(tmp_path):
    path = tmp_path / "manifest.csv"
    path.write_bytes(b"\xbd\x00binary")
    with pytest.raises(ValueError, match=r"manifest\.csv is not a manifest: it is not UTF-8"):
        read_manifest(path)


def test_a_spreadsheets_utf8_cell_list_is_read_and_another_encoding_is_named(tmp_path):
    excel = tmp_path / "excel.csv"
    excel.write_bytes("\ufeffsha256\nh1\n".encode())  # "CSV UTF-8" starts with a BOM
    assert read_cell_list(excel) == {None: {"h1"}}
    latin = tmp_path / "latin.csv"
    latin.write_bytes("path\nParasitized/caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv is not UTF-8 text .* CSV UTF-8"):
        read_cell_list(latin)
