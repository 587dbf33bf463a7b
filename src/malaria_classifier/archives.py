"""Checks of a zip archive's member list, made before anything is extracted.

:mod:`malaria_classifier.download` runs them on the archive it fetched or was given:
names that would land outside the destination (zip-slip), sizes far beyond the real
archive (zip bomb) and the class-folder layout with its PNG count all come from the
zip's directory, so a bad archive is refused without writing a single file.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path, PurePosixPath

CLASS_DIRS: tuple[str, str] = ("Parasitized", "Uninfected")
MAX_SEARCH_DEPTH = 3  # how deep below the top the class folders may sit
OFFICIAL_IMAGE_COUNT = 27558
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")

# The official zip holds 27,558 PNGs of about 5-20 KB (about 340 MB; PNGs barely
# compress, so it unpacks to about the same). The caps leave a wide margin for mirrors
# yet stop a zip bomb before anything is written.
_MAX_UNPACKED_BYTES = 2 * 1024**3
_MAX_MEMBER_BYTES = 100 * 1024**2
_MAX_MEMBERS = 200_000
_MAX_COMPRESSION_RATIO = 100
_RATIO_CHECK_MIN_BYTES = 1024**2
_MB = 1024**2


class ArchiveRejectedError(Exception):
    """An archive failed verification; the caller adds what happens to the file."""


def check_member_names(infos: list[zipfile.ZipInfo], archive: Path, dest_dir: Path) -> None:
    """Raise if any member would land outside ``dest_dir`` (zip-slip).

    Names are checked both syntactically (absolute, drive letter, ``..``) and by
    resolving the final path, which also catches escapes through symlinks that
    already exist inside ``dest_dir``.
    """
    for info in infos:
        normalized = info.filename.replace("\\", "/")
        unsafe = (
            normalized.startswith("/")
            or _WINDOWS_DRIVE.match(normalized) is not None
            or ".." in PurePosixPath(normalized).parts
            or not (dest_dir / normalized).resolve().is_relative_to(dest_dir)
        )
        if unsafe:
            raise ArchiveRejectedError(
                f"Refusing {archive}: member {info.filename!r} would be written outside "
                f"{dest_dir} (absolute path or '..'); the archive is not the official one "
                "or has been tampered with."
            )


def check_sizes(infos: list[zipfile.ZipInfo], archive: Path) -> None:
    """Refuse an archive that would unpack far beyond the real one (a zip bomb).

    The sizes come from the zip's directory; :mod:`zipfile` never writes more than
    a member's recorded size, so checking them up front bounds what extraction writes.
    """
    if len(infos) > _MAX_MEMBERS:
        raise ArchiveRejectedError(
            f"{archive} lists {len(infos):,} files, more than the {_MAX_MEMBERS:,} allowed "
            f"(the official archive holds about {OFFICIAL_IMAGE_COUNT:,}); it is not the "
            "malaria archive."
        )
    total = sum(info.file_size for info in infos)
    if total > _MAX_UNPACKED_BYTES:
        raise ArchiveRejectedError(
            f"{archive} would unpack to {total // _MB:,} MB, more than the "
            f"{_MAX_UNPACKED_BYTES // _MB:,} MB allowed (the official archive unpacks to "
            "about 340 MB); it looks like a zip bomb or is not the malaria archive."
        )
    for info in infos:
        ratio = info.file_size / max(info.compress_size, 1)
        too_big = info.file_size > _MAX_MEMBER_BYTES
        if too_big or (info.file_size > _RATIO_CHECK_MIN_BYTES and ratio > _MAX_COMPRESSION_RATIO):
            raise ArchiveRejectedError(
                f"Member {info.filename!r} of {archive} unpacks to {info.file_size // _MB:,} MB "
                f"from {info.compress_size:,} bytes ({ratio:,.0f}:1); cell images are well "
                f"under 1 MB and barely compress, so files over {_MAX_MEMBER_BYTES // _MB} MB "
                f"or compressed more than {_MAX_COMPRESSION_RATIO}:1 are refused as a zip bomb."
            )


def find_layout(infos: list[zipfile.ZipInfo], archive: Path, source: str) -> tuple[str, int]:
    """Find the shallowest folder in the archive holding both class folders; count PNGs.

    Mirrors the search after extraction (``download_dest.find_class_root``: same depth
    limit, same order), so the folder found there is the one predicted here.
    """
    folders: set[tuple[str, ...]] = set()
    files: set[tuple[str, ...]] = set()
    for info in infos:
        parts = PurePosixPath(info.filename).parts
        if not info.is_dir():
            files.add(parts)
            parts = parts[:-1]
        folders.update(parts[: k + 1] for k in range(len(parts)))
    candidates = sorted(
        (len(folder), folder)
        for folder in folders | {()}
        if len(folder) <= MAX_SEARCH_DEPTH
        and not any(part.startswith((".", "__MACOSX")) for part in folder)
        and all(folder + (name,) in folders for name in CLASS_DIRS)
    )
    if not candidates:
        raise ArchiveRejectedError(
            f"No folder in {archive} (from {source}) holds both {CLASS_DIRS[0]}/ and "
            f"{CLASS_DIRS[1]}/. Check that the URL points at the NIH malaria "
            "cell_images.zip (or a faithful mirror)."
        )
    root = candidates[0][1]
    count = sum(
        1
        for parts in files
        if len(parts) == len(root) + 2
        and parts[: len(root)] == root
        and parts[len(root)] in CLASS_DIRS
        and parts[-1].lower().endswith(".png")
    )
    if count == 0:
        raise ArchiveRejectedError(
            f"{archive} (from {source}) holds no PNG images in its class folders."
        )
    return "/".join(root) or ".", count
