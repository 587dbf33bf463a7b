"""What a download's ``--dest`` already holds, looked at before anything is fetched.

:func:`find_ready_data` returns complete data from an earlier download (the completion
marker matches what is on disk; with ``--sha256``, the archive it came from is checked
by :func:`check_kept_archive`) or unpacked by hand with exactly the expected count.
:func:`refuse_unknown_files` refuses a folder holding anything a download did not write
(the kept archive, its source record, the marker, pooch's temporary files, the members
the kept archive lists and the class folders a marker names are ours), so a download is
never mixed into someone's own files. The records themselves (:data:`SOURCE_RECORD`,
:data:`COMPLETE_MARKER`) are written by :mod:`download`.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from malaria_classifier.archives import CLASS_DIRS, MAX_SEARCH_DEPTH
from malaria_classifier.images import sha256_of_file

ARCHIVE_NAME = "cell_images.zip"  # the archive's name in ``dest``, whatever the URL
SOURCE_RECORD = ".download-source.json"  # beside the archive: the URL it came from
COMPLETE_MARKER = ".download-complete.json"
_POOCH_TEMP = re.compile(r"^tmp[a-z0-9_]{8}$")  # tempfile's names, left by a killed download
_OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_MAX_SCANNED_FILES = 100_000  # enough to describe what a folder holds without walking a disk


class DownloadError(RuntimeError):
    """Getting or unpacking the data set failed; the message says what to do next."""


def count_images(root: Path) -> int:
    """Count ``*.png`` files directly inside ``root/Parasitized`` and ``root/Uninfected``.

    Only PNGs are counted so that junk the archive ships (``Thumbs.db``) does not
    make a complete download look incomplete, or hide a missing image.

    Args:
        root: Folder that holds the two class folders.

    Returns:
        The total number of PNG files in both class folders.
    """
    total = 0
    for name in CLASS_DIRS:
        folder = root / name
        if folder.is_dir():
            total += sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    return total


def find_ready_data(
    dest_dir: Path,
    url: str,
    known_hash: str | None,
    expected_image_count: int | None,
    say: Callable[[str], None],
) -> Path | None:
    """Return the class-folder root if ``dest_dir`` already holds complete data.

    Data finished by an earlier run (the marker matches what is on disk) counts; so
    does data unpacked by hand with exactly the expected count, since returning it
    writes nothing. With ``known_hash``, the archive the data came from is checked.
    """
    root = find_class_root(dest_dir)
    if root is None:
        return None
    found = count_images(root)
    marker = read_json(dest_dir / COMPLETE_MARKER)
    if marker is not None and _marker_matches(marker, dest_dir, root, found):
        origin = marker.get("url")
        if expected_image_count is not None and found != expected_image_count:
            raise DownloadError(
                f"{root} holds {found} PNG images from an earlier, complete download of "
                f"{origin or 'a local zip'}, but {expected_image_count} are expected. If "
                f"that set is what you want, pass --expected-images {found} (or 0 to skip "
                "the count check); to download another, pass an empty or new --dest."
            )
        if origin and origin != url:
            say(
                f"the data in {root} were downloaded from {origin}, not {url}; nothing was "
                f"fetched. To download from {url}, pass an empty or new --dest."
            )
    elif marker is not None or expected_image_count is None or found != expected_image_count:
        return None
    if known_hash is not None:
        check_kept_archive(dest_dir, root, known_hash, marker, say)
    return root


def _marker_matches(marker: dict[str, Any], dest_dir: Path, root: Path, found: int) -> bool:
    recorded_root = marker.get("root", _relative(root, dest_dir))
    return marker.get("image_count") == found and recorded_root == _relative(root, dest_dir)


def check_kept_archive(
    dest_dir: Path,
    root: Path,
    known_hash: str,
    marker: dict[str, Any] | None,
    say: Callable[[str], None],
) -> None:
    """Check ``--sha256`` against the archive that complete data came from."""
    archive = dest_dir / ARCHIVE_NAME
    if archive.is_file():
        actual, what = sha256_of_file(archive), f"The archive {archive}"
    elif marker is not None and marker.get("archive_sha256"):
        actual = marker["archive_sha256"]
        what = f"The archive that {root} was extracted from (since deleted)"
    else:
        say(
            f"--sha256 could not be checked: {archive} is no longer there, so nothing "
            f"shows which archive the data in {root} came from. To check the digest, "
            "download again into an empty or new --dest."
        )
        return
    if actual != known_hash:
        raise DownloadError(
            f"{what} has SHA-256 {actual}, not {known_hash} as given with --sha256, so the "
            f"data in {root} are not from the archive you expected. Check the digest; to "
            "download and check it afresh, pass an empty or new --dest. Nothing was changed."
        )
    if not archive.is_file():
        say(
            f"--sha256 matches the digest recorded when {root} was downloaded; the archive "
            "itself was deleted, so the extracted files could not be re-checked."
        )


def refuse_unknown_files(dest_dir: Path) -> None:
    """Raise if ``dest_dir`` holds files that no run of this function wrote.

    Ours are the archive, its source record, the marker, pooch's temporary files,
    files the kept archive lists (an interrupted extraction) and the class folders a
    marker names. Anything else belongs to the user, and extracting beside it would
    mix two data sets that no later run could tell apart.
    """
    members = _member_names(dest_dir / ARCHIVE_NAME)
    marker = read_json(dest_dir / COMPLETE_MARKER) or {}
    marked = _class_prefixes(marker.get("root"))
    pngs = others = 0
    example = ""
    for rel in _files_below(dest_dir):
        if _is_ours(rel, members, marked):
            continue
        example = example or rel
        if rel.lower().endswith(".png"):
            pngs += 1
        else:
            others += 1
    if not pngs and not others:
        return
    held = [f"{pngs} PNG image{'s' * (pngs != 1)}"] if pngs else []
    held += [f"{others} other file{'s' * (others != 1)}"] if others else []
    more = "at least " if pngs + others >= _MAX_SCANNED_FILES else ""
    raise DownloadError(
        f"--dest {dest_dir} already holds {more}{' and '.join(held)} not from this download "
        f"(e.g. {example}). Extracting the archive beside them would mix two data sets. "
        "Pass an empty or new --dest (it is created if needed); nothing was downloaded "
        "or changed."
    )


def _is_ours(rel: str, members: frozenset[str], marked: tuple[str, ...]) -> bool:
    top_level = "/" not in rel
    if top_level and (rel in (ARCHIVE_NAME, SOURCE_RECORD, COMPLETE_MARKER)):
        return True
    if top_level and _POOCH_TEMP.match(rel):
        return True
    return rel.rsplit("/", 1)[-1] in _OS_JUNK or rel in members or rel.startswith(marked)


def _class_prefixes(root: object) -> tuple[str, ...]:
    """Paths (relative to ``dest``) of the class folders under a marker's root."""
    if not isinstance(root, str):
        return ()
    prefix = "" if root == "." else f"{root}/"
    return tuple(f"{prefix}{name}/" for name in CLASS_DIRS)


def _files_below(folder: Path) -> Iterator[str]:
    """Yield the paths of the files under ``folder``, relative and with ``/``."""
    seen = 0
    for current, _dirs, files in os.walk(folder):
        base = Path(current).relative_to(folder)
        for name in files:
            yield (base / name).as_posix()
            seen += 1
            if seen >= _MAX_SCANNED_FILES:
                return


def _member_names(archive: Path) -> frozenset[str]:
    """File names listed by ``archive``, or none if it is missing or unreadable."""
    try:
        with zipfile.ZipFile(archive) as zf:
            return frozenset(name for name in zf.namelist() if not name.endswith("/"))
    except (zipfile.BadZipFile, OSError, EOFError):
        return frozenset()


def has_extracted_files(dest_dir: Path) -> bool:
    """Whether ``dest_dir`` holds anything beside our top-level files (and OS junk)."""
    return any(not _is_ours(rel, frozenset(), ()) for rel in _files_below(dest_dir))


def find_class_root(dest_dir: Path) -> Path | None:
    """Find the shallowest folder under ``dest_dir`` holding both class folders.

    The official archive nests them in ``cell_images/``, mirrors sometimes do not or
    add another level, so we search a few levels deep in a fixed (sorted) order.
    """
    level = [dest_dir]
    for _ in range(MAX_SEARCH_DEPTH + 1):
        for folder in level:
            if all((folder / name).is_dir() for name in CLASS_DIRS):
                return folder
        level = [
            child
            for folder in level
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.name.startswith((".", "__MACOSX"))
        ]
    return None


def read_json(path: Path) -> dict[str, Any] | None:
    """Read one of our small JSON records; ``None`` if missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: Path, dest_dir: Path) -> str:
    return path.relative_to(dest_dir).as_posix()
