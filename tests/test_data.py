"""Tests for ``malaria_classifier.data``: patient ids, layout discovery and the data check."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from malaria_classifier.data import (
    DataLayoutError,
    check_dataset,
    discover_images,
    find_class_root,
    patient_id_from_name,
)
from malaria_classifier.images import sha256_of_file

# --- patient_id_from_name ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("file_name", "expected"),
    [
        ("C33P1thinF_IMG_20150619_114756a_cell_179.png", "P1"),
        ("C100P61ThinF_IMG_20150918_144104_cell_162.png", "P61"),
        ("C39P4thinF_original_IMG_20150622_111206_cell_99.png", "P4"),
        ("C140P101ThinF_IMG_20151005_211735_cell_200.png", "P101"),
        ("C1_thinF_IMG_20150604_104722_cell_9.png", "C1"),
        ("C205NThinF_IMG_20151106_150155_cell_31.png", "C205"),
        ("C3thin_original_IMG_20150608_162922_cell_41.png", "C3"),
        ("C007_thinF_IMG_cell_1.png", "C7"),  # numbers lose leading zeros
        ("C33P01thinF_IMG_20150619_114756a_cell_1.png", "P1"),
        ("smear7_field2_cell_3.png", "field:smear7_field2"),
        ("smear7_field2_cell_12.png", "field:smear7_field2"),
        ("my_photo.jpg", "field:my_photo"),
        ("cellphone_shot_cell_x.png", "field:cellphone_shot_cell_x"),
    ],
)
def test_patient_id_from_name(file_name, expected):
    assert patient_id_from_name(file_name) == expected


def test_patient_id_ignores_folders():
    assert patient_id_from_name("Parasitized/C33P1thinF_IMG_20150619_114756a_cell_1.png") == "P1"


# --- find_class_root ---------------------------------------------------------------------


def test_find_class_root_accepts_the_root_itself(synthetic_dataset):
    assert find_class_root(synthetic_dataset) == synthetic_dataset


def test_find_class_root_finds_it_inside_a_parent(synthetic_dataset):
    assert find_class_root(synthetic_dataset.parent) == synthetic_dataset


def test_find_class_root_searches_three_levels_deep(tmp_path):
    deep = tmp_path / "a" / "b" / "cell_images"
    for label in ("Parasitized", "Uninfected"):
        (deep / label).mkdir(parents=True)

    assert find_class_root(tmp_path) == deep


def test_find_class_root_stops_after_three_levels(tmp_path):
    too_deep = tmp_path / "x" / "a" / "b" / "cell_images"
    for label in ("Parasitized", "Uninfected"):
        (too_deep / label).mkdir(parents=True)

    with pytest.raises(DataLayoutError, match=r"\(searched 3 levels deep\)"):
        find_class_root(tmp_path)
    assert find_class_root(tmp_path / "x") == too_deep


def test_find_class_root_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"

    with pytest.raises(
        DataLayoutError, match=f"^Data folder {re.escape(str(missing))} does not exist"
    ):
        find_class_root(missing)


def test_find_class_root_rejects_a_file(tmp_path):
    path = tmp_path / "images.zip"
    path.write_bytes(b"PK")

    with pytest.raises(DataLayoutError, match=f"^{re.escape(str(path))} is a file"):
        find_class_root(path)


def test_find_class_root_without_class_folders(tmp_path):
    (tmp_path / "photos").mkdir()

    with pytest.raises(
        DataLayoutError,
        match=f"No Parasitized/ and Uninfected/ folders found in {re.escape(str(tmp_path))}",
    ):
        find_class_root(tmp_path)


@pytest.mark.parametrize(
    ("present", "missing"), [("Parasitized", "Uninfected"), ("Uninfected", "Parasitized")]
)
def test_find_class_root_with_one_class_folder_names_the_missing_one(
    tmp_path, make_png, present, missing
):
    make_png(tmp_path / "cell_images" / present / "a_cell_1.png")

    with pytest.raises(DataLayoutError, match=f"has {present}/ but no {missing}/ folder"):
        find_class_root(tmp_path)


def test_one_class_folder_is_accepted_where_one_class_is_allowed(tmp_path, make_png):
    make_png(tmp_path / "donors" / "Uninfected" / "C1_thinF_IMG_x_cell_1.png")
    make_png(tmp_path / "donors" / "Uninfected" / "C1_thinF_IMG_x_cell_2.png")

    assert find_class_root(tmp_path, allow_one_class=True) == tmp_path / "donors"
    discovery = discover_images(tmp_path, allow_one_class=True)
    assert [record.label for record in discovery.records] == ["Uninfected", "Uninfected"]
    with pytest.raises(DataLayoutError, match="has Uninfected/ but no Parasitized/ folder"):
        discover_images(tmp_path)  # training and splitting need both classes


def test_one_class_allowed_still_needs_an_image_and_the_right_case(tmp_path):
    (tmp_path / "Parasitized").mkdir()
    (tmp_path / "Uninfected").mkdir()
    with pytest.raises(DataLayoutError, match=r"hold no images .*Put the cell images in"):
        discover_images(tmp_path, allow_one_class=True)
    (tmp_path / "Uninfected").rmdir()
    (tmp_path / "uninfected").mkdir()  # not a missing class: a misnamed one
    with pytest.raises(DataLayoutError, match="rename uninfected/ to Uninfected/"):
        find_class_root(tmp_path, allow_one_class=True)


def test_wrong_case_class_folders_are_refused_with_a_rename_hint(tmp_path):
    (tmp_path / "cells" / "parasitized").mkdir(parents=True)
    (tmp_path / "cells" / "uninfected").mkdir()

    with pytest.raises(DataLayoutError) as raised:
        find_class_root(tmp_path)

    assert str(raised.value) == (
        f"No Parasitized/ and Uninfected/ folders found in {tmp_path} (searched 3 levels "
        f"deep), but {tmp_path / 'cells'} has parasitized/, uninfected/: class folder names "
        f"are case-sensitive (the folder name is the label), so rename parasitized/ to "
        f"Parasitized/ and uninfected/ to Uninfected/."
    )


def test_one_wrong_case_class_folder_alone_names_the_other_class_too(tmp_path):
    (tmp_path / "PARASITIZED").mkdir()

    with pytest.raises(
        DataLayoutError,
        match=r"has PARASITIZED/: class folder names are case-sensitive .* so rename "
        r"PARASITIZED/ to Parasitized/\. Both classes are needed: also add Uninfected/\.$",
    ):
        find_class_root(tmp_path)


def test_one_class_folder_and_one_in_wrong_case_says_to_rename_it(tmp_path):
    (tmp_path / "Parasitized").mkdir()
    (tmp_path / "uninfected").mkdir()

    with pytest.raises(
        DataLayoutError,
        match=r"has Parasitized/ but no Uninfected/ folder\. .* It has uninfected/: class "
        r"folder names are case-sensitive .* so rename uninfected/ to Uninfected/\.$",
    ):
        find_class_root(tmp_path)


def test_find_class_root_follows_a_linked_data_folder(synthetic_dataset, tmp_path):
    holder = tmp_path / "F"
    holder.mkdir()
    (holder / "cell_images").symlink_to(synthetic_dataset, target_is_directory=True)

    assert find_class_root(holder) == holder / "cell_images"
    report = check_dataset(holder)
    assert report.counts == {"Uninfected": 34, "Parasitized": 24}
    assert report.fingerprint() == check_dataset(synthetic_dataset).fingerprint()


def test_find_class_root_walks_each_real_folder_once_despite_link_loops(tmp_path):
    from malaria_classifier.data import _walk_dirs

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop
    (tmp_path / "b_again").symlink_to(tmp_path / "a" / "b", target_is_directory=True)

    walked = list(_walk_dirs(tmp_path, 3))

    assert walked == [tmp_path, tmp_path / "a", tmp_path / "b_again"]
    with pytest.raises(DataLayoutError, match="No Parasitized/ and Uninfected/ folders"):
        find_class_root(tmp_path)


# --- discover_images ---------------------------------------------------------------------


def test_discover_images_lists_every_image_with_its_label_and_patient(synthetic_dataset):
    discovery = discover_images(synthetic_dataset.parent)

    assert discovery.root == synthetic_dataset
    assert len(discovery.records) == 24 + 34
    assert discovery.skipped_files == []
    for record in discovery.records:
        assert record.label == record.path.parent.name
        assert record.patient == patient_id_from_name(record.path.name)
    labels = [record.label for record in discovery.records]
    assert labels == ["Uninfected"] * 34 + ["Parasitized"] * 24
    assert {r.patient for r in discovery.records if r.label == "Parasitized"} == {
        "P1",
        "P2",
        "P3",
        "P4",
        "P5",
        "P6",
    }
    assert {r.patient for r in discovery.records if r.label == "Uninfected"} == {
        "P1",
        "P2",
        "P3",
        "P4",
        "P5",
        "P6",
        "C1",
        "C2",
        "C3",
        "C205",
    }


def test_discover_images_skips_and_lists_non_image_files(synthetic_dataset):
    thumbs = synthetic_dataset / "Parasitized" / "Thumbs.db"
    thumbs.write_bytes(b"\x00" * 10)
    notes = synthetic_dataset / "Uninfected" / "notes.txt"
    notes.write_text("labels checked\n", encoding="utf-8")
    hidden = synthetic_dataset / "Uninfected" / ".DS_Store.png"
    hidden.write_bytes(b"")

    discovery = discover_images(synthetic_dataset)

    assert sorted(discovery.skipped_files) == sorted([thumbs, notes, hidden])
    listed = {record.path for record in discovery.records}
    assert listed.isdisjoint({thumbs, notes, hidden})
    assert len(discovery.records) == 24 + 34


def test_discover_images_accepts_upper_case_suffixes_and_subfolders(tmp_path, make_png):
    make_png(tmp_path / "Parasitized" / "C33P1thinF_IMG_1_cell_1.PNG")
    make_png(tmp_path / "Uninfected" / "batch2" / "C1_thinF_IMG_2_cell_1.jpg")

    discovery = discover_images(tmp_path)

    assert [(r.path.name, r.label, r.patient) for r in discovery.records] == [
        ("C1_thinF_IMG_2_cell_1.jpg", "Uninfected", "C1"),
        ("C33P1thinF_IMG_1_cell_1.PNG", "Parasitized", "P1"),
    ]


def test_discover_images_order_does_not_depend_on_creation_order(tmp_path, make_png):
    names = [f"C{n}_thinF_IMG_cell_{n}.png" for n in (5, 1, 9, 3)]
    for name in names:
        make_png(tmp_path / "Uninfected" / name)
    for name in reversed(names):
        make_png(tmp_path / "Parasitized" / name.replace("_thinF", "P1thinF"))

    first = discover_images(tmp_path).records
    second = discover_images(tmp_path).records

    assert first == second
    uninfected = [r.path.name for r in first if r.label == "Uninfected"]
    parasitized = [r.path.name for r in first if r.label == "Parasitized"]
    assert uninfected == sorted(names)
    assert parasitized == sorted(name.replace("_thinF", "P1thinF") for name in names)


def test_discover_images_class_folder_without_images(tmp_path, make_png):
    make_png(tmp_path / "Parasitized" / "a_cell_1.png")
    (tmp_path / "Uninfected").mkdir()
    (tmp_path / "Uninfected" / "Thumbs.db").write_bytes(b"\x00")

    with pytest.raises(
        DataLayoutError,
        match=re.escape(str(tmp_path / "Uninfected")) + r" holds no images \(\.bmp, .*\.webp\)",
    ):
        discover_images(tmp_path)


# --- check_dataset -----------------------------------------------------------------------


def test_check_dataset_counts_classes_and_patients(synthetic_dataset):
    report = check_dataset(synthetic_dataset.parent)

    assert report.root == synthetic_dataset
    assert report.counts == {"Uninfected": 34, "Parasitized": 24}
    assert report.patients == {
        "total": 10,
        "with_parasitized_cells": 6,
        "with_only_uninfected_cells": 4,
    }
    assert report.unreadable == []
    assert report.duplicates == []
    assert len(report.records) == 58
    for side in ("height", "width"):
        assert report.size_summary[side]["min"] == 20
        assert report.size_summary[side]["max"] == 40


def test_check_dataset_hashes_match_the_files(synthetic_dataset):
    report = check_dataset(synthetic_dataset)

    assert set(report.hashes) == {record.path for record in report.records}
    for path, digest in report.hashes.items():
        assert digest == sha256_of_file(path)
    assert len(set(report.hashes.values())) == 58  # the fixture's images are all different


def test_check_dataset_reports_unreadable_file_and_goes_on(synthetic_dataset):
    good = synthetic_dataset / "Parasitized" / "C33P1thinF_IMG_20150619_114751a_cell_1.png"
    broken = synthetic_dataset / "Parasitized" / "C33P1thinF_IMG_20150619_114751a_cell_99.png"
    data = good.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    empty = synthetic_dataset / "Uninfected" / "C1_thinF_IMG_20150604_104722_cell_99.png"
    empty.write_bytes(b"")

    report = check_dataset(synthetic_dataset)

    assert [path for path, _ in report.unreadable] == [str(empty), str(broken)]
    errors = dict(report.unreadable)
    assert errors[str(broken)].startswith(f"{broken}: is truncated or corrupt")
    assert errors[str(empty)].startswith(f"{empty}: is empty (0 bytes)")
    assert report.counts == {"Uninfected": 34, "Parasitized": 24}
    assert broken not in {record.path for record in report.records}
    assert broken not in report.hashes
    assert len(report.records) == 58
    assert report.to_dict()["unreadable"][1] == {"path": str(broken), "error": errors[str(broken)]}


def test_check_dataset_finds_identical_contents_under_two_names(synthetic_dataset):
    source = synthetic_dataset / "Parasitized" / "C34P2thinF_IMG_20150619_114752a_cell_2.png"
    copy = synthetic_dataset / "Uninfected" / "C1_thinF_IMG_20150604_104722_cell_50.png"
    shutil.copyfile(source, copy)

    report = check_dataset(synthetic_dataset)

    assert report.duplicates == [sorted([str(source), str(copy)])]
    assert report.hashes[source] == report.hashes[copy]
    assert report.counts == {"Uninfected": 35, "Parasitized": 24}


def test_check_dataset_size_summary_is_exact(tmp_path, make_png):
    make_png(tmp_path / "Parasitized" / "a_cell_1.png", size=(20, 30), color=(1, 2, 3))
    make_png(tmp_path / "Parasitized" / "a_cell_2.png", size=(40, 25), color=(4, 5, 6))
    make_png(tmp_path / "Uninfected" / "b_cell_1.png", size=(33, 21), color=(7, 8, 9))

    summary = check_dataset(tmp_path).size_summary

    assert summary["height"]["min"] == 21
    assert summary["height"]["max"] == 30
    assert summary["height"]["median"] == 25.0
    assert summary["width"]["min"] == 20
    assert summary["width"]["max"] == 40
    assert summary["width"]["median"] == 33.0


def test_check_dataset_lists_skipped_files(synthetic_dataset):
    thumbs = synthetic_dataset / "Uninfected" / "Thumbs.db"
    thumbs.write_bytes(b"\x00")

    report = check_dataset(synthetic_dataset)

    assert report.skipped_files == [str(thumbs)]
    assert report.to_dict()["skipped_files"] == [str(thumbs)]


def test_images_outside_the_class_folders_are_reported(synthetic_dataset, make_png):
    stray = make_png(synthetic_dataset / "stray.png")
    other = make_png(synthetic_dataset / "Other" / "x.png")
    wrong_case = make_png(synthetic_dataset / "parasitized" / "y.jpg")
    (synthetic_dataset / "README.txt").write_text("not an image\n", encoding="utf-8")
    # A link to a class folder holds labelled images already: not reported again.
    (synthetic_dataset / "again").symlink_to(synthetic_dataset / "Parasitized")

    discovery = discover_images(synthetic_dataset)
    report = check_dataset(synthetic_dataset)

    assert discovery.outside_class_folders == [stray, other, wrong_case]
    assert report.outside_class_folders == [str(stray), str(other), str(wrong_case)]
    assert report.to_dict()["outside_class_folders"] == [str(stray), str(other), str(wrong_case)]
    assert report.counts == {"Uninfected": 34, "Parasitized": 24}


def test_no_images_outside_the_class_folders_gives_an_empty_list(synthetic_dataset):
    assert check_dataset(synthetic_dataset.parent).to_dict()["outside_class_folders"] == []


def _bytes_name(folder: Path, name: bytes) -> Path:
    """``folder/name`` for a name that is not UTF-8 (a surrogate escape in Python)."""
    path = folder / os.fsdecode(name)
    try:
        path.touch()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system does not take file names that are not UTF-8")
    return path


def _shown(path: Path) -> str:
    """How the report names ``path``: each byte that is not UTF-8 as U+FFFD."""
    return str(path).replace("\udcff", "\ufffd").replace("\udce9", "\ufffd")


def test_report_of_non_utf8_file_names_prints_and_writes_as_json(synthetic_dataset):
    source = synthetic_dataset / "Parasitized" / "C34P2thinF_IMG_20150619_114752a_cell_2.png"
    copy = _bytes_name(synthetic_dataset / "Uninfected", b"copy_\xff.png")
    shutil.copyfile(source, copy)
    broken = _bytes_name(synthetic_dataset / "Uninfected", b"bad_\xe9.png")
    notes = _bytes_name(synthetic_dataset / "Uninfected", b"n\xe9tes.txt")
    stray = _bytes_name(synthetic_dataset, b"stray_\xe9.png")

    report = check_dataset(synthetic_dataset)
    summary = report.to_dict()

    assert summary["unreadable"][0]["path"] == _shown(broken)
    assert summary["unreadable"][0]["error"].startswith(f"{_shown(broken)}: is empty")
    assert summary["duplicate_groups"] == [sorted([str(source), _shown(copy)])]
    assert summary["label_conflicts"] == [sorted([str(source), _shown(copy)])]
    assert summary["skipped_files"] == [_shown(notes)]
    assert summary["outside_class_folders"] == [_shown(stray)]
    # Strict UTF-8 (a terminal, ensure_ascii=False, other JSON readers) takes all of it.
    json.dumps(summary, ensure_ascii=False).encode("utf-8")
    printed = [*report.unreadable[0], *report.duplicates[0], *report.skipped_files]
    for text in printed + report.outside_class_folders + report.label_conflicts[0]:
        text.encode("utf-8")
    # The records keep the real names, so the files can still be opened.
    assert copy in report.hashes
    assert copy in {record.path for record in report.records}


def test_check_dataset_does_not_change_the_files(synthetic_dataset):
    before = {
        path: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(synthetic_dataset.rglob("*"))
        if path.is_file()
    }

    check_dataset(synthetic_dataset)

    after = {
        path: (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(synthetic_dataset.rglob("*"))
        if path.is_file()
    }
    assert after == before


# --- the shared NIH subset (names only, nothing decoded) -----------------------------------


def test_shared_subset_has_160_patients_120_with_parasitized_cells(shared_data_dir: Path):
    patients: dict[str, set[str]] = {}
    for label in ("Parasitized", "Uninfected"):
        with os.scandir(shared_data_dir / label) as entries:
            for entry in entries:
                patient = patient_id_from_name(entry.name)
                patients.setdefault(patient, set()).add(label)

    assert not any(patient.startswith("field:") for patient in patients)
    assert len(patients) == 160
    assert sum("Parasitized" in labels for labels in patients.values()) == 120
    assert all(p.startswith("P") for p, labels in patients.items() if "Parasitized" in labels)


def test_linked_folders_are_walked_once_and_unlistable_ones_reported(tmp_path, monkeypatch):
    from malaria_classifier.data import walk_files

    slides = tmp_path / "slides"
    (slides / "one").mkdir(parents=True)
    (slides / "one" / "a.png").write_bytes(b"x")
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    (gathered / "one").symlink_to(slides / "one")  # cells gathered by linking folders
    (gathered / "again").symlink_to(slides / "one")  # the same folder twice
    (gathered / "loop").symlink_to(gathered)
    (gathered / "closed").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == gathered / "closed":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    found = list(walk_files(gathered))
    files = [path for path, error in found if error is None]
    errors = [error for _, error in found if error is not None]
    assert [path.name for path in files] == ["a.png"]  # once, though linked twice
    assert len(errors) == 1 and "closed: folder cannot be read (Permission denied)" in errors[0]
