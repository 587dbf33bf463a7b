"""Tests for ``malaria_classifier.splits``: patient-level splits, leakage checks, manifests.

Records are built directly with fake paths and fake hashes: splitting never opens a file.
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from malaria_classifier.data import ImageRecord
from malaria_classifier.splits import (
    MANIFEST_COLUMNS,
    LeakageError,
    ManifestRow,
    build_manifest,
    check_no_leakage,
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

    check_no_leakage(rows)


def test_manifest_from_split_by_patient_has_no_leak():
    records, hashes = make_records(20, 10)
    splits = split_by_patient(records, hashes, seed=3)

    rows = build_manifest(records, hashes, splits, ROOT)

    check_no_leakage(rows)


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
