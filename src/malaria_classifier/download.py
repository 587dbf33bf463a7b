"""Download the official NIH malaria cell archive, verify it and unpack it safely.

Nothing here runs unless a user asks for it: the package never reaches the network on
import or during training. Each failure mode gets its own, actionable
:class:`DownloadError`:

1. **Look** at ``dest`` first. Complete data from an earlier run is returned at once;
   a folder holding anything this module did not write (images of another layout,
   a partial copy made by hand) is refused before anything is fetched, so the
   download is never mixed into someone's own files.
2. **Fetch** with :func:`pooch.retrieve` into ``dest/cell_images.zip``. Pooch streams
   into a temporary file and renames it only after the download finished and (when a
   SHA-256 was given) the hash matched. A small JSON record beside the archive says
   which URL it came from, so changing ``--url`` downloads again instead of re-using
   the old file. A zip the user copied to ``dest/cell_images.zip`` is used as is.
3. **Verify** the archive before writing a single image: member names that are
   absolute or contain ``..`` (zip-slip), sizes that would unpack far beyond the real
   archive (zip bomb), a missing ``Parasitized/`` + ``Uninfected/`` layout, a wrong PNG
   count, and CRC errors are all refused. A downloaded archive that fails is deleted,
   so the next run fetches a fresh one; a zip the user placed there is left alone.
4. **Extract** into ``dest`` only, then write a completion marker.
"""

from __future__ import annotations

import ftplib
import json
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pooch
import requests

from malaria_classifier.archives import (
    CLASS_DIRS,
    MAX_SEARCH_DEPTH,
    OFFICIAL_IMAGE_COUNT,
    ArchiveRejectedError,
    check_member_names,
    check_sizes,
    find_layout,
)
from malaria_classifier.images import sha256_of_file
from malaria_classifier.outputs import missing_folders, remove_empty_folders

OFFICIAL_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
EXPECTED_IMAGE_COUNT = OFFICIAL_IMAGE_COUNT  # 13,779 Parasitized + 13,779 Uninfected
ARCHIVE_NAME = "cell_images.zip"  # the archive's name in ``dest``, whatever the URL

_CLASS_DIRS = CLASS_DIRS
_SOURCE_RECORD = ".download-source.json"  # beside the archive: the URL it came from
_COMPLETE_MARKER = ".download-complete.json"
_MAX_SEARCH_DEPTH = MAX_SEARCH_DEPTH
_URL_SCHEMES = ("http", "https", "ftp")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_POOCH_TEMP = re.compile(r"^tmp[a-z0-9_]{8}$")  # tempfile's names, left by a killed download
_OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
_MAX_SCANNED_FILES = 100_000  # enough to describe what a folder holds without walking a disk


class DownloadError(RuntimeError):
    """Getting or unpacking the data set failed; the message says what to do next."""


def download_dataset(
    dest: str | Path,
    url: str = OFFICIAL_URL,
    sha256: str | None = None,
    progress: bool = True,
    expected_image_count: int | None = EXPECTED_IMAGE_COUNT,
    notify: Callable[[str], None] | None = None,
) -> Path:
    """Download, verify and extract the malaria cell archive into ``dest``.

    Safe to call again: complete data from an earlier run is returned without a
    download, an interrupted run continues, and nothing is written outside ``dest``.

    Example:
        >>> root = download_dataset("data")  # doctest: +SKIP
        >>> root.name  # doctest: +SKIP
        'cell_images'

    Args:
        dest: Folder to hold the archive and the extracted images; created if missing.
            It must be empty, new, or hold only an earlier download by this function
            (or a zip copied to ``dest/cell_images.zip``, which is used instead of
            downloading).
        url: Where to fetch the zip from (http, https or ftp). Defaults to the official
            NIH/NLM address; pass a mirror when that host is unreachable.
        sha256: Expected SHA-256 hex digest of the zip (an optional ``sha256:`` prefix
            is accepted). A download or kept archive whose hash differs is refused.
            When ``None``, integrity rests on the zip's own CRC checks.
        progress: Show a progress bar while downloading (needs ``tqdm``).
        expected_image_count: Number of ``*.png`` files expected under
            ``Parasitized/`` and ``Uninfected/`` together. ``None`` skips the check,
            e.g. for a mirror that serves a subset on purpose.
        notify: Called with notes that are not errors (e.g. that ``sha256`` could not
            be checked because the archive was deleted). Defaults to printing them
            to stderr.

    Returns:
        The folder that directly holds ``Parasitized/`` and ``Uninfected/``
        (``dest/cell_images`` for the official archive).

    Raises:
        DownloadError: ``dest`` holds other files, the URL is not http(s)/ftp, the
            download failed, the hash did not match, the archive is corrupt, unsafe
            or too large, the expected folders are missing, or the image count
            differs from ``expected_image_count``.
    """
    say = notify or _print_note
    dest_dir = Path(dest).expanduser().resolve()
    _check_url(url, dest_dir)
    known_hash = _known_hash(sha256)
    if expected_image_count is not None and expected_image_count < 1:
        raise DownloadError(
            f"Expected image count {expected_image_count} is not a positive number; give "
            "the number of PNG images the archive holds, or skip the check "
            "(--expected-images 0)."
        )
    if dest_dir.exists() and not dest_dir.is_dir():
        raise DownloadError(
            f"--dest {dest_dir} is a file; the data set needs a folder. Give a folder name "
            f"(it is created if needed)."
        )
    if dest_dir.is_dir():
        ready = _ready_data(dest_dir, url, known_hash, expected_image_count, say)
        if ready is not None:
            return ready
        _refuse_unknown_files(dest_dir)
    created = _make_folder(dest_dir)
    try:
        archive, ours = _obtain_archive(dest_dir, url, known_hash, progress, say)
        source = url if ours else f"the zip already in {dest_dir}"
        layout_root, image_count = _verify_archive(
            archive, dest_dir, source, expected_image_count, ours
        )
        return _extract(archive, dest_dir, url if ours else None, layout_root, image_count)
    except BaseException:
        remove_empty_folders(created)  # made by this call and still empty: leave no trace
        raise


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
    for name in _CLASS_DIRS:
        folder = root / name
        if folder.is_dir():
            total += sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")
    return total


def _print_note(note: str) -> None:
    print(f"Note: {note}", file=sys.stderr)


def _check_url(url: str, dest_dir: Path) -> None:
    """Refuse local paths and other schemes before pooch gives a cryptic error."""
    if urlparse(url).scheme.lower() not in _URL_SCHEMES:
        raise DownloadError(
            f"--url {url!r} is not an http, https or ftp address; only those can be "
            f"downloaded. To use a zip you already have, copy it to "
            f"{dest_dir / ARCHIVE_NAME} and run the same command again without --url: a "
            "zip found there is verified and extracted without downloading."
        )


def _known_hash(sha256: str | None) -> str | None:
    """Turn the user's digest into lower-case hex, rejecting typos before downloading."""
    if sha256 is None:
        return None
    digest = sha256.strip()
    if digest.lower().startswith("sha256:"):
        digest = digest[len("sha256:") :]
    if not _SHA256_HEX.match(digest):
        raise DownloadError(
            f"{sha256!r} is not a SHA-256 digest: expected 64 hexadecimal characters, "
            "optionally prefixed with 'sha256:'."
        )
    return digest.lower()


def _ready_data(
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
    root = _find_class_root(dest_dir)
    if root is None:
        return None
    found = count_images(root)
    marker = _read_json(dest_dir / _COMPLETE_MARKER)
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
        _check_kept_archive(dest_dir, root, known_hash, marker, say)
    return root


def _marker_matches(marker: dict[str, Any], dest_dir: Path, root: Path, found: int) -> bool:
    recorded_root = marker.get("root", _relative(root, dest_dir))
    return marker.get("image_count") == found and recorded_root == _relative(root, dest_dir)


def _check_kept_archive(
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


def _refuse_unknown_files(dest_dir: Path) -> None:
    """Raise if ``dest_dir`` holds files that no run of this function wrote.

    Ours are the archive, its source record, the marker, pooch's temporary files,
    files the kept archive lists (an interrupted extraction) and the class folders a
    marker names. Anything else belongs to the user, and extracting beside it would
    mix two data sets that no later run could tell apart.
    """
    members = _member_names(dest_dir / ARCHIVE_NAME)
    marker = _read_json(dest_dir / _COMPLETE_MARKER) or {}
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
    if top_level and (rel in (ARCHIVE_NAME, _SOURCE_RECORD, _COMPLETE_MARKER)):
        return True
    if top_level and _POOCH_TEMP.match(rel):
        return True
    return rel.rsplit("/", 1)[-1] in _OS_JUNK or rel in members or rel.startswith(marked)


def _class_prefixes(root: object) -> tuple[str, ...]:
    """Paths (relative to ``dest``) of the class folders under a marker's root."""
    if not isinstance(root, str):
        return ()
    prefix = "" if root == "." else f"{root}/"
    return tuple(f"{prefix}{name}/" for name in _CLASS_DIRS)


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


def _obtain_archive(
    dest_dir: Path,
    url: str,
    known_hash: str | None,
    progress: bool,
    say: Callable[[str], None],
) -> tuple[Path, bool]:
    """Return the archive to extract and whether this module downloaded it.

    A kept download is re-used only if it came from ``url`` (and matches
    ``known_hash``); otherwise it is replaced, unless files were already extracted
    from it, which a different archive must not be mixed into.
    """
    archive = dest_dir / ARCHIVE_NAME
    source = _read_json(dest_dir / _SOURCE_RECORD)
    if archive.is_file() and source is None:
        say(f"using {archive}, which was already there; {url} was not requested.")
        actual = sha256_of_file(archive) if known_hash else None
        if actual != known_hash:
            raise DownloadError(
                f"{archive} (not downloaded by this command) has SHA-256 {actual}, not "
                f"{known_hash} as given with --sha256. Check the digest, or replace that "
                "file with the right one (or move it away to download from --url). "
                "Nothing was changed."
            )
        return archive, False
    marker = _read_json(dest_dir / _COMPLETE_MARKER) or {}
    origin = (source or {}).get("url") or marker.get("url")
    kept = archive.is_file() and origin == url
    if kept and (known_hash is None or sha256_of_file(archive) == known_hash):
        return archive, True
    if (kept or origin not in (None, url)) and _has_extracted_files(dest_dir):
        why = (
            f"it does not match --sha256 {known_hash}"
            if kept
            else f"it came from {origin}, but you asked for {url}"
        )
        raise DownloadError(
            f"{dest_dir} holds files extracted from an earlier download, and {why}; "
            "extracting another archive over them would mix the two. Run the earlier "
            "command again to finish that copy, or pass an empty or new --dest. Nothing "
            "was changed."
        )
    _discard_archive(dest_dir)
    (dest_dir / _SOURCE_RECORD).write_text(json.dumps({"url": url}) + "\n", encoding="utf-8")
    try:
        fetched = _fetch(url, dest_dir, known_hash, progress)
    except BaseException:
        _discard_archive(dest_dir)
        raise
    _make_readable(fetched)
    return fetched, True


def _has_extracted_files(dest_dir: Path) -> bool:
    """Whether ``dest_dir`` holds anything beside our top-level files (and OS junk)."""
    return any(not _is_ours(rel, frozenset(), ()) for rel in _files_below(dest_dir))


def _discard_archive(dest_dir: Path) -> None:
    """Delete our archive and its source record (both written by this module)."""
    (dest_dir / ARCHIVE_NAME).unlink(missing_ok=True)
    (dest_dir / _SOURCE_RECORD).unlink(missing_ok=True)


def _fetch(url: str, dest_dir: Path, known_hash: str | None, progress: bool) -> Path:
    """Download ``url`` to ``dest_dir/cell_images.zip`` with pooch and return its path."""
    # Pooch's own INFO lines duplicate what the CLI prints; its handler is also bound
    # to the stderr of the moment it was imported, which test runners replace.
    pooch.get_logger().setLevel("WARNING")
    try:
        fetched = pooch.retrieve(
            url,
            known_hash=f"sha256:{known_hash}" if known_hash else None,
            fname=ARCHIVE_NAME,
            path=dest_dir,
            progressbar=progress,
        )
    except requests.HTTPError as exc:
        raise DownloadError(
            f"Could not download {url}: the server answered {_cause(exc)}. Check the URL, "
            "or pass --url with a mirror of cell_images.zip."
        ) from exc
    except requests.RequestException as exc:
        raise DownloadError(
            f"Could not download {url}: {_cause(exc)}. Check your network connection (and proxy "
            "settings), or pass --url with a mirror of cell_images.zip."
        ) from exc
    except ValueError as exc:  # pooch: hash mismatch
        raise DownloadError(
            f"Download from {url} was rejected: {_cause(exc)}. No archive was kept. If you gave "
            "--sha256, check the digest; otherwise the server sent something other than "
            "the expected archive, so try again later or pass --url with a mirror."
        ) from exc
    except (ftplib.Error, EOFError) as exc:
        raise DownloadError(
            f"Could not download {url}: {_cause(exc)}. Check the URL, or pass --url with a "
            "mirror of cell_images.zip."
        ) from exc
    except OSError as exc:
        raise DownloadError(
            f"Could not save the download from {url} into {dest_dir}: {_cause(exc)}. Check that "
            "the folder is writable and the disk has space (about 700 MB)."
        ) from exc
    return Path(fetched)


def _make_readable(path: Path) -> None:
    """Give the download the mode of a normal new file (tempfile creates it as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _cause(exc: BaseException) -> str:
    """Render an underlying error without a trailing period, to splice into a sentence."""
    return str(exc).strip().rstrip(".") or type(exc).__name__


def _verify_archive(
    archive: Path, dest_dir: Path, source: str, expected_image_count: int | None, ours: bool
) -> tuple[str, int]:
    """Check the archive completely before extracting anything.

    Returns:
        The class folders' parent inside the archive (``"."`` for the top) and the
        number of PNG images it holds there.
    """
    try:
        try:
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
                check_member_names(infos, archive, dest_dir)
                check_sizes(infos, archive)
                layout_root, image_count = find_layout(infos, archive, source)
                if expected_image_count is not None and image_count != expected_image_count:
                    raise ArchiveRejectedError(
                        f"Found {image_count} PNG images in {archive} (from {source}) but "
                        f"expected {expected_image_count}: it looks incomplete or is not the "
                        "official archive. Pass --url with another mirror; if this one "
                        f"serves a different number on purpose, pass --expected-images "
                        f"{image_count} (or 0 to skip the count check)."
                    )
                bad_member = zf.testzip()
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
            raise ArchiveRejectedError(
                f"{archive} is not a readable zip archive ({_cause(exc)}); the download was "
                "probably truncated or corrupted."
            ) from exc
        if bad_member is not None:
            raise ArchiveRejectedError(
                f"{archive} is corrupt: member {bad_member!r} fails its CRC check."
            )
    except ArchiveRejectedError as rejected:
        if ours:
            _discard_archive(dest_dir)
            fate = "It has been deleted, so the next run downloads it again."
        else:
            fate = (
                "It was there before this command, so it was left alone: replace it with a "
                "good copy, or move it away and run again to download from --url."
            )
        raise DownloadError(f"{rejected} Nothing was extracted. {fate}") from None
    return layout_root, image_count


def _extract(
    archive: Path, dest_dir: Path, url: str | None, layout_root: str, image_count: int
) -> Path:
    """Unpack every member into ``dest_dir``, check the result and mark it complete.

    Members were already checked by :func:`_verify_archive`, so this only ever writes
    below ``dest_dir``. Overwriting files from an interrupted earlier try makes that
    try repairable by simply running again.
    """
    (dest_dir / _COMPLETE_MARKER).unlink(missing_ok=True)  # stale until this run succeeds
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DownloadError(
            f"Extracting {archive} into {dest_dir} failed: {_cause(exc)}. Check free disk "
            "space (about 400 MB) and permissions, then run the same command again."
        ) from exc
    root = _find_class_root(dest_dir)
    expected_root = dest_dir / layout_root
    found = count_images(root) if root is not None else 0
    if root != expected_root or found != image_count:
        raise DownloadError(
            f"After extracting {archive}, {expected_root} holds {found} PNG images where the "
            f"archive lists {image_count}; something else is writing into {dest_dir}. Pass "
            "an empty or new --dest."
        )
    marker = {
        "url": url,
        "image_count": found,
        "root": layout_root,
        "archive_sha256": sha256_of_file(archive),
    }
    (dest_dir / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return root


def _find_class_root(dest_dir: Path) -> Path | None:
    """Find the shallowest folder under ``dest_dir`` holding both class folders.

    The official archive nests them in ``cell_images/``, mirrors sometimes do not or
    add another level, so we search a few levels deep in a fixed (sorted) order.
    """
    level = [dest_dir]
    for _ in range(_MAX_SEARCH_DEPTH + 1):
        for folder in level:
            if all((folder / name).is_dir() for name in _CLASS_DIRS):
                return folder
        level = [
            child
            for folder in level
            for child in sorted(folder.iterdir())
            if child.is_dir() and not child.name.startswith((".", "__MACOSX"))
        ]
    return None


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` (and missing parents); return those created, deepest first."""
    created = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def _read_json(path: Path) -> dict[str, Any] | None:
    """Read one of our small JSON records; ``None`` if missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _relative(path: Path, dest_dir: Path) -> str:
    return path.relative_to(dest_dir).as_posix()
