"""Find cell images on disk, name their patients, and check a data folder before use.

The NIH layout is ``DIR/Parasitized/*.png`` and ``DIR/Uninfected/*.png`` (or a parent
of those, such as the ``cell_images/`` folder of the official archive). Patients are
read from NIH file names so that splits can keep every patient in one split.

Patient rule (see ``shared/data/README.md``):

1. ``^C(\\d+)[A-Za-z_]*?P(\\d+)`` -> ``P<second number>`` (infected patients; their
   uninfected cells sit in ``Uninfected/`` under the same patient);
2. otherwise ``^C(\\d+)`` -> ``C<number>`` (healthy donors, one slide each);
3. otherwise the source field image: the name up to ``_cell_<n>`` (``field:<stem>``),
   or the whole file stem when there is no ``_cell_`` part. Cells cut from one field
   image then always share a split, which is the best available guard when the
   patient is unknown.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from malaria_classifier.constants import CLASS_NAMES, IMAGE_SUFFIXES
from malaria_classifier.images import ImageLoadError, load_rgb_image, sha256_of_file

_INFECTED_PATIENT = re.compile(r"^C(\d+)[A-Za-z_]*?P(\d+)")
_SLIDE = re.compile(r"^C(\d+)")
_CELL_SUFFIX = re.compile(r"_cell_\d+$")
_MAX_SEARCH_DEPTH = 3
# Patient ids of names outside the NIH rule start with this (their source field image).
FIELD_PREFIX = "field:"


class DataLayoutError(ValueError):
    """A data folder is not laid out as expected; the message says how to fix it."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image: where it is, its class and its patient."""

    path: Path
    label: str
    patient: str


def patient_id_from_name(file_name: str) -> str:
    """Return the patient id encoded in an NIH cell file name (rule in the module doc).

    Examples:
        >>> patient_id_from_name("C33P1thinF_IMG_20150619_114756a_cell_179.png")
        'P1'
        >>> patient_id_from_name("C1_thinF_IMG_20150604_104722_cell_9.png")
        'C1'
        >>> patient_id_from_name("smear7_field2_cell_3.png")
        'field:smear7_field2'
    """
    stem = Path(file_name).stem
    infected = _INFECTED_PATIENT.match(stem)
    if infected:
        return f"P{int(infected.group(2))}"
    slide = _SLIDE.match(stem)
    if slide:
        return f"C{int(slide.group(1))}"
    return f"{FIELD_PREFIX}{_CELL_SUFFIX.sub('', stem)}"


def find_class_root(directory: str | Path, allow_one_class: bool = False) -> Path:
    """Find the folder that holds one sub-folder per class.

    Accepts the class root itself or a parent up to three levels above it, so both
    ``cell_images/`` and the folder it was extracted into work. Linked folders are
    followed (a data folder is often a link to a shared copy).

    Class folder names are case-sensitive: a label is the folder's name, and it is
    kept in manifests and data fingerprints, so ``parasitized/`` is refused with a
    message that says to rename it rather than silently read as ``Parasitized/``.

    With ``allow_one_class`` (evaluation: a folder of healthy donors' cells only is a
    fair test of specificity) a folder with one class folder is accepted too, unless the
    other is there under a wrongly cased name.

    Raises:
        DataLayoutError: If no such folder exists, or only one class folder does (and
            ``allow_one_class`` is False).
    """
    root = Path(directory)
    if not root.exists():
        raise DataLayoutError(f"Data folder {root} does not exist. Check the path.")
    if not root.is_dir():
        raise DataLayoutError(f"{root} is a file; pass the folder that holds the images.")
    for candidate in _walk_dirs(root, _MAX_SEARCH_DEPTH):
        present = [name for name in CLASS_NAMES if (candidate / name).is_dir()]
        if len(present) == len(CLASS_NAMES):
            return candidate
        if present:
            missing = sorted(set(CLASS_NAMES) - set(present))
            misspelled = [
                (found, proper)
                for found, proper in _case_variants(candidate)
                if proper == missing[0]
            ]
            if allow_one_class and not misspelled:
                return candidate
            hint = f" It has {_rename_hint(misspelled)}." if misspelled else ""
            raise DataLayoutError(
                f"{candidate} has {present[0]}/ but no {missing[0]}/ folder. Both classes are "
                f"needed: put the images in {candidate}/Parasitized and {candidate}/Uninfected."
                f"{hint}"
            )
    searched = (
        f"No Parasitized/ and Uninfected/ folders found in {root} "
        f"(searched {_MAX_SEARCH_DEPTH} levels deep)"
    )
    for candidate in _walk_dirs(root, _MAX_SEARCH_DEPTH):
        misspelled = _case_variants(candidate)
        if misspelled:
            absent = [
                name for name in CLASS_NAMES if name not in {proper for _, proper in misspelled}
            ]
            also = f" Both classes are needed: also add {absent[0]}/." if absent else ""
            raise DataLayoutError(
                f"{searched}, but {candidate} has {_rename_hint(misspelled)}.{also}"
            )
    raise DataLayoutError(
        f"{searched}. Expected the NIH layout: "
        f"DIR/Parasitized/*.png and DIR/Uninfected/*.png; run `malaria data download` "
        f"to get the official data."
    )


def _case_variants(folder: Path) -> list[tuple[str, str]]:
    """Sub-folders named like a class but in other case, as ``(name, class name)``."""
    proper_of = {name.casefold(): name for name in CLASS_NAMES}
    try:
        children = sorted(p.name for p in folder.iterdir() if p.is_dir())
    except OSError:
        return []
    return [
        (name, proper_of[name.casefold()])
        for name in children
        if name.casefold() in proper_of and name not in CLASS_NAMES
    ]


def _rename_hint(misspelled: list[tuple[str, str]]) -> str:
    found = ", ".join(f"{name}/" for name, _ in misspelled)
    renames = " and ".join(f"{name}/ to {proper}/" for name, proper in misspelled)
    return (
        f"{found}: class folder names are case-sensitive (the folder name is the label), "
        f"so rename {renames}"
    )


def _walk_dirs(root: Path, max_depth: int) -> Iterator[Path]:
    """Breadth-first folders under ``root`` (itself first), following linked folders.

    Each real folder comes once (by device and inode, as in :func:`walk_files`), so a
    link loop or two links to one folder cannot repeat it.
    """
    seen: set[tuple[int, int]] = set()
    level = [root]
    for _ in range(max_depth + 1):
        next_level: list[Path] = []
        for folder in level:
            try:
                info = folder.stat()
            except OSError:
                continue
            if (info.st_dev, info.st_ino) in seen:
                continue
            seen.add((info.st_dev, info.st_ino))
            yield folder
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir())
            except OSError:
                continue
            next_level.extend(children)
        level = next_level


def walk_files(
    folder: Path, seen: set[tuple[int, int]] | None = None
) -> Iterator[tuple[Path, str | None]]:
    """Every file under ``folder`` in sorted order, as ``(path, None)``; a folder that
    cannot be listed comes as ``(folder, error message)`` instead of vanishing.

    Linked folders are followed (cells are often gathered by linking slide folders
    together), each real folder once, so a link loop cannot make the walk endless.

    Args:
        folder: Where to start.
        seen: ``(st_dev, st_ino)`` of real folders not to walk (again); the walk adds
            the ones it walks, so a caller can pass the set of one walk to the next.
    """
    problems: list[OSError] = []
    seen = set() if seen is None else seen
    for current, dirs, files in os.walk(folder, onerror=problems.append, followlinks=True):
        yield from _folder_errors(problems)
        try:
            info = os.stat(current)
        except OSError:
            dirs[:] = []
            continue
        if (info.st_dev, info.st_ino) in seen:
            dirs[:] = []  # reached again through a link: already walked
            continue
        seen.add((info.st_dev, info.st_ino))
        dirs.sort()
        for name in sorted(files):
            yield Path(current) / name, None
    yield from _folder_errors(problems)


def _folder_errors(problems: list[OSError]) -> Iterator[tuple[Path, str]]:
    while problems:
        problem = problems.pop(0)
        reason = problem.strerror or str(problem)
        yield (
            Path(problem.filename),
            f"{problem.filename}: folder cannot be read ({reason}); its images were "
            f"skipped. Check its permissions.",
        )


def is_image_file(path: Path) -> bool:
    """Tell image files from the rest by suffix (``Thumbs.db`` and notes are skipped)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


@dataclass
class Discovery:
    """What :func:`discover_images` found under a class root."""

    root: Path
    records: list[ImageRecord]
    skipped_files: list[Path] = field(default_factory=list)
    unreadable_folders: list[tuple[Path, str]] = field(default_factory=list)
    # Images under the root but in neither class folder: no label, so not used.
    outside_class_folders: list[Path] = field(default_factory=list)


def discover_images(directory: str | Path, allow_one_class: bool = False) -> Discovery:
    """List labelled images under a data folder in a deterministic order.

    Images under the class root but outside both class folders (``DIR/stray.png``,
    ``DIR/Other/x.png``) have no label; they are listed in ``outside_class_folders``
    so that a report can say they were left out.

    Args:
        directory: The class root or a folder above it (:func:`find_class_root`).
        allow_one_class: Accept a missing or empty class folder (evaluation); training
            and splitting need both classes.

    Raises:
        DataLayoutError: If the layout is wrong, a class has no images (unless
            ``allow_one_class``) or there is no image at all.
    """
    root = find_class_root(directory, allow_one_class)
    records: list[ImageRecord] = []
    skipped: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    in_class_folders: set[tuple[int, int]] = set()
    for label in CLASS_NAMES:
        found = 0
        # Each class is walked on its own, so a folder linked into both classes still
        # gives both labels (a label conflict the check reports).
        walked: set[tuple[int, int]] = set()
        if allow_one_class and not (root / label).is_dir():
            continue
        for path, error in walk_files(root / label, walked):
            if error is not None:
                unreadable.append((path, error))
            elif is_image_file(path):
                records.append(ImageRecord(path, label, patient_id_from_name(path.name)))
                found += 1
            else:
                skipped.append(path)
        if found == 0 and not allow_one_class:
            unlisted = [error for path, error in unreadable if path == root / label]
            raise DataLayoutError(
                unlisted[0]
                if unlisted
                else f"{root / label} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}). "
                f"Each class needs at least one image."
            )
        in_class_folders |= walked
    if not records:
        folders = " or ".join(f"{root / label}" for label in CLASS_NAMES)
        first_error = f" ({unreadable[0][1]})" if unreadable else ""
        raise DataLayoutError(
            f"{folders} hold no images ({', '.join(sorted(IMAGE_SUFFIXES))}){first_error}. "
            f"Put the cell images in the folder of their class."
        )
    # Folders already walked as a class (a link to one included) are not walked again;
    # folders that cannot be listed here hold no labelled images, so are not reported.
    outside = [
        path
        for path, error in walk_files(root, in_class_folders)
        if error is None and is_image_file(path)
    ]
    return Discovery(
        root=root,
        records=records,
        skipped_files=skipped,
        unreadable_folders=unreadable,
        outside_class_folders=outside,
    )


@dataclass
class FileCheck:
    """Result of reading one file fully: its hash and size, or why it failed."""

    sha256: str | None
    height: int | None
    width: int | None
    error: str | None


def check_file(path: Path) -> FileCheck:
    """Decode a file completely (catches truncation) and hash its contents."""
    try:
        image = load_rgb_image(path)
        return FileCheck(sha256_of_file(path), image.shape[0], image.shape[1], None)
    except ImageLoadError as error:
        return FileCheck(None, None, None, str(error))
    except OSError as error:  # the file vanished between the two reads
        return FileCheck(None, None, None, f"{path}: cannot be read ({error}).")


def check_files(paths: Iterable[Path], workers: int | None = None) -> Iterator[FileCheck]:
    """Check many files in parallel (Pillow releases the GIL while decoding)."""
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as executor:
        yield from executor.map(check_file, paths, chunksize=1)


def printable(text: str) -> str:
    """``text`` safe to print and to write as UTF-8 JSON.

    A file name that is not valid UTF-8 reaches Python with its bad bytes as lone
    surrogates (``os.fsdecode``); those crash a strict UTF-8 terminal and make JSON that
    other readers reject. Each such byte becomes U+FFFD instead.

    Examples:
        >>> printable("bad_\\udce9.png")
        'bad_\ufffd.png'
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decoding makes
        raw = text.encode("utf-8", "replace")
    return raw.decode("utf-8", "replace")


@dataclass
class DatasetReport:
    """Everything ``malaria data check`` tells a user about a data folder.

    The lists of strings are for people: their names are :func:`printable` (a byte
    that is not UTF-8 shows as U+FFFD), so they print and go into JSON safely.
    ``root``, ``records`` and ``hashes`` keep the real paths.
    """

    root: Path
    counts: dict[str, int]
    patients: dict[str, int]
    unreadable: list[tuple[str, str]]
    duplicates: list[list[str]]
    skipped_files: list[str]
    size_summary: dict[str, dict[str, float]]
    records: list[ImageRecord]
    hashes: dict[Path, str]
    # Images beside the class folders (DIR/stray.png, DIR/Other/x.png): not used.
    outside_class_folders: list[str] = field(default_factory=list)

    @property
    def label_conflicts(self) -> list[list[str]]:
        """Duplicate groups whose copies carry different labels: the same picture is
        called Parasitized and Uninfected, so at least one label is wrong."""
        labels = {record.path: record.label for record in self.records}
        by_hash: dict[str, list[Path]] = {}
        for path, digest in self.hashes.items():
            by_hash.setdefault(digest, []).append(path)
        return [
            sorted(printable(str(path)) for path in paths)
            for paths in by_hash.values()
            if len({labels.get(path) for path in paths}) > 1
        ]

    def fingerprint(self) -> str:
        """SHA-256 over the sorted ``relative path:content SHA-256`` of every readable image.

        A resumed search or cross-validation compares it with the one it started with.
        Relative to the data root, so the same images in a moved or copied folder give
        the same fingerprint; any image added, removed, renamed, relabelled (moved to
        the other class folder) or changed gives another one.
        """
        lines = sorted(
            f"{record.path.relative_to(self.root).as_posix()}:{self.hashes[record.path]}"
            for record in self.records
        )
        # NUL cannot occur in a path, so no two different lists join to the same text.
        joined = "\0".join(lines).encode("utf-8", "surrogateescape")
        return hashlib.sha256(joined).hexdigest()

    def to_dict(self) -> dict:
        """A JSON-ready summary (without the per-file lists of records and hashes)."""
        return {
            "root": printable(str(self.root)),
            "counts": self.counts,
            "patients": self.patients,
            "unreadable": [{"path": p, "error": e} for p, e in self.unreadable],
            "duplicate_groups": self.duplicates,
            "label_conflicts": self.label_conflicts,
            "skipped_files": self.skipped_files,
            "outside_class_folders": self.outside_class_folders,
            "image_size": self.size_summary,
            "patient_rule": "see malaria_classifier.data module docstring",
        }


def check_dataset(directory: str | Path, progress: bool = False) -> DatasetReport:
    """Read every image under a data folder and report what a user must know.

    Unreadable files are reported, not raised, so one bad file never stops the check.

    Args:
        directory: The class root or a parent of it.
        progress: Show a progress bar on the terminal.

    Returns:
        A :class:`DatasetReport`; its ``records`` hold only the readable images.
    """
    discovery = discover_images(directory)
    checks = check_files(record.path for record in discovery.records)
    if progress:
        from tqdm import tqdm

        checks = tqdm(checks, total=len(discovery.records), desc="Checking images", unit="img")
    readable: list[ImageRecord] = []
    hashes: dict[Path, str] = {}
    unreadable = [
        (printable(str(path)), printable(error)) for path, error in discovery.unreadable_folders
    ]
    heights: list[int] = []
    widths: list[int] = []
    for record, result in zip(discovery.records, checks, strict=True):
        if result.error is not None:
            unreadable.append((printable(str(record.path)), printable(result.error)))
            continue
        readable.append(record)
        hashes[record.path] = result.sha256
        heights.append(result.height)
        widths.append(result.width)
    return DatasetReport(
        root=discovery.root,
        counts={label: sum(r.label == label for r in readable) for label in CLASS_NAMES},
        patients=_count_patients(readable),
        unreadable=unreadable,
        duplicates=_duplicate_groups(hashes),
        skipped_files=[printable(str(path)) for path in discovery.skipped_files],
        size_summary={"height": _summarize(heights), "width": _summarize(widths)},
        records=readable,
        hashes=hashes,
        outside_class_folders=[printable(str(path)) for path in discovery.outside_class_folders],
    )


def _count_patients(records: list[ImageRecord]) -> dict[str, int]:
    patients_by_label: dict[str, set[str]] = {label: set() for label in CLASS_NAMES}
    for record in records:
        patients_by_label[record.label].add(record.patient)
    all_patients = set().union(*patients_by_label.values())
    with_parasitized = patients_by_label["Parasitized"]
    return {
        "total": len(all_patients),
        "with_parasitized_cells": len(with_parasitized),
        "with_only_uninfected_cells": len(all_patients - with_parasitized),
    }


def _duplicate_groups(hashes: dict[Path, str]) -> list[list[str]]:
    by_hash: dict[str, list[str]] = {}
    for path, digest in hashes.items():
        by_hash.setdefault(digest, []).append(printable(str(path)))
    return [sorted(paths) for paths in by_hash.values() if len(paths) > 1]


def _summarize(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    array = np.asarray(values)
    return {
        "min": int(array.min()),
        "p5": float(np.percentile(array, 5)),
        "median": float(np.median(array)),
        "p95": float(np.percentile(array, 95)),
        "max": int(array.max()),
    }
