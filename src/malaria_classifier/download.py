"""Download the official NIH malaria cell archive, verify it and unpack it safely.

Nothing here runs unless a user asks for it: the package never reaches the network on
import or during training. The work is split so that each failure mode gets its own,
actionable :class:`DownloadError`:

1. **Fetch** with :func:`pooch.retrieve`. Pooch streams into a temporary file next to
   the target and renames it only after the download finished and (when a SHA-256 was
   given) the hash matched, so an interrupted or tampered download never leaves a
   ``.zip`` that a later run would mistake for a good one.
2. **Verify** the archive: ``testzip()`` reads every member and checks its CRC, which
   catches truncated or bit-flipped archives when no hash is known; member names that
   are absolute or contain ``..`` are refused (zip-slip), before anything is written.
3. **Extract** into ``dest`` only, then find the folder holding ``Parasitized/`` and
   ``Uninfected/`` and count the PNGs, so a mirror serving a partial copy is caught
   here rather than as a silently smaller training set.

Re-running is cheap: when the data is already extracted and complete, the function
returns at once without touching the network; when only the archive is present, it
is re-used instead of downloaded again.
"""

from __future__ import annotations

import json
import re
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pooch
import requests

OFFICIAL_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
EXPECTED_IMAGE_COUNT = 27558  # 13,779 Parasitized + 13,779 Uninfected in the official zip.

_CLASS_DIRS: tuple[str, str] = ("Parasitized", "Uninfected")
_DEFAULT_ZIP_NAME = "cell_images.zip"
_COMPLETE_MARKER = ".download-complete.json"
_MAX_SEARCH_DEPTH = 3
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class DownloadError(RuntimeError):
    """Getting or unpacking the data set failed; the message says what to do next."""


def download_dataset(
    dest: str | Path,
    url: str = OFFICIAL_URL,
    sha256: str | None = None,
    progress: bool = True,
    expected_image_count: int | None = EXPECTED_IMAGE_COUNT,
) -> Path:
    """Download, verify and extract the malaria cell archive into ``dest``.

    Safe to call again: complete data already in ``dest`` is returned without a
    download, and an archive already in ``dest`` is re-used. Nothing is written
    outside ``dest``.

    Args:
        dest: Folder to hold the archive and the extracted images; created if missing.
        url: Where to fetch the zip from. Defaults to the official NIH/NLM address;
            pass a mirror when that host is unreachable.
        sha256: Expected SHA-256 hex digest of the zip (an optional ``sha256:`` prefix
            is accepted). When given, a download whose hash differs is rejected and
            not kept. When ``None``, integrity rests on the zip's own CRC checks.
        progress: Show a progress bar while downloading (needs ``tqdm``).
        expected_image_count: Number of ``*.png`` files expected under
            ``Parasitized/`` and ``Uninfected/`` together. ``None`` skips the check,
            e.g. for a mirror that serves a subset on purpose.

    Returns:
        The folder that directly holds ``Parasitized/`` and ``Uninfected/``
        (``dest/cell_images`` for the official archive).

    Raises:
        DownloadError: The download failed, the hash did not match, the archive is
            corrupt or unsafe, the expected folders are missing, or the image count
            differs from ``expected_image_count``.
    """
    dest_dir = Path(dest).expanduser().resolve()
    known_hash = _known_hash(sha256)
    existing = _complete_data_root(dest_dir, expected_image_count)
    if existing is not None:
        return existing

    if dest_dir.exists() and not dest_dir.is_dir():
        raise DownloadError(
            f"--dest {dest_dir} is a file; the data set needs a folder. Give a folder name "
            f"(it is created if needed)."
        )
    created = not dest_dir.exists()
    dest_dir.mkdir(parents=True, exist_ok=True)
    (dest_dir / _COMPLETE_MARKER).unlink(missing_ok=True)  # stale until this run succeeds
    try:
        archive = _fetch(url, dest_dir, known_hash, progress)
    except DownloadError:
        if created and not any(dest_dir.iterdir()):
            dest_dir.rmdir()  # made by this call and still empty: leave no trace
        raise
    _verify_archive(archive, dest_dir)
    _extract(archive, dest_dir)
    root = _find_class_root(dest_dir)
    if root is None:
        raise DownloadError(
            f"The archive from {url} was extracted into {dest_dir}, but no folder there "
            f"holds both {_CLASS_DIRS[0]}/ and {_CLASS_DIRS[1]}/. Check that the URL "
            "points at the NIH malaria cell_images.zip (or a faithful mirror)."
        )
    found = count_images(root)
    if expected_image_count is not None and found != expected_image_count:
        raise DownloadError(
            f"Found {found} PNG images under {root} but expected {expected_image_count}. "
            f"The archive from {url} looks incomplete or is not the official one. Delete "
            f"{archive} and {root} and run again, or pass --url for another mirror; if the "
            "mirror serves a different number on purpose, disable the count check "
            "(expected_image_count=None)."
        )
    _write_marker(dest_dir, url, found)
    return root


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


def _known_hash(sha256: str | None) -> str | None:
    """Turn the user's digest into pooch's ``sha256:<hex>`` form, rejecting typos early.

    Checking the format before downloading saves a 350 MB download that would only
    end in a confusing hash mismatch.
    """
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
    return f"sha256:{digest.lower()}"


def _complete_data_root(dest_dir: Path, expected_image_count: int | None) -> Path | None:
    """Return the class-folder root if ``dest_dir`` already holds complete data.

    With a known count, the count decides (so data unpacked by hand is accepted).
    Without one, only a marker written after a fully successful run counts, so a
    half-finished extraction is never mistaken for the full data set.
    """
    if not dest_dir.is_dir():
        return None
    root = _find_class_root(dest_dir)
    if root is None:
        return None
    if expected_image_count is not None:
        return root if count_images(root) == expected_image_count else None
    return root if (dest_dir / _COMPLETE_MARKER).is_file() else None


def _archive_name(url: str) -> str:
    """Name the local zip after the URL's last path part, never a path of its own."""
    name = PurePosixPath(urlparse(url).path).name
    if name in ("", ".", "..") or not name.lower().endswith(".zip"):
        return _DEFAULT_ZIP_NAME
    return name


def _fetch(url: str, dest_dir: Path, known_hash: str | None, progress: bool) -> Path:
    """Download ``url`` into ``dest_dir`` with pooch and return the archive's path.

    Pooch re-uses an existing file whose hash matches (or any existing file when no
    hash is known) and otherwise downloads into a temporary file that is renamed only
    on success. On failure we also delete a stale file left at the target, which pooch
    has just judged not good, so a later run cannot pick it up.
    """
    target = dest_dir / _archive_name(url)
    # Pooch's own INFO lines duplicate what the CLI prints; its handler is also bound
    # to the stderr of the moment it was imported, which test runners replace.
    pooch.get_logger().setLevel("WARNING")
    try:
        fetched = pooch.retrieve(
            url,
            known_hash=known_hash,
            fname=target.name,
            path=dest_dir,
            progressbar=progress,
        )
    except requests.HTTPError as exc:
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"Could not download {url}: the server answered {_cause(exc)}. Check the URL, "
            "or pass --url with a mirror of cell_images.zip."
        ) from exc
    except requests.RequestException as exc:
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"Could not download {url}: {_cause(exc)}. Check your network connection (and proxy "
            "settings), or pass --url with a mirror of cell_images.zip."
        ) from exc
    except ValueError as exc:  # pooch: hash mismatch or unsupported URL scheme
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"Download from {url} was rejected: {_cause(exc)}. No archive was kept. If you gave "
            "--sha256, check the digest; otherwise the server sent something other than "
            "the expected archive, so try again later or pass --url with a mirror."
        ) from exc
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise DownloadError(
            f"Could not save the download from {url} into {dest_dir}: {_cause(exc)}. Check that "
            "the folder is writable and the disk has space (about 700 MB)."
        ) from exc
    return Path(fetched)


def _cause(exc: BaseException) -> str:
    """Render an underlying error without a trailing period, to splice into a sentence."""
    return str(exc).strip().rstrip(".") or type(exc).__name__


def _verify_archive(archive: Path, dest_dir: Path) -> None:
    """Refuse a corrupt, truncated or path-escaping archive before extracting anything.

    A bad archive is deleted so that the next run downloads a fresh copy instead of
    failing on the same file forever.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            _check_member_names(zf, dest_dir)
            bad_member = zf.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive} is not a readable zip archive ({_cause(exc)}); the download was probably "
            "truncated or corrupted. It has been deleted: run again to re-download, or "
            "pass --url with a mirror."
        ) from exc
    except DownloadError:
        archive.unlink(missing_ok=True)
        raise
    if bad_member is not None:
        archive.unlink(missing_ok=True)
        raise DownloadError(
            f"{archive} is corrupt: member {bad_member!r} fails its CRC check. It has "
            "been deleted: run again to re-download, or pass --url with a mirror."
        )


def _check_member_names(zf: zipfile.ZipFile, dest_dir: Path) -> None:
    """Raise if any member would land outside ``dest_dir`` (zip-slip).

    Names are checked both syntactically (absolute, drive letter, ``..``) and by
    resolving the final path, which also catches escapes through symlinks that
    already exist inside ``dest_dir``.
    """
    for name in zf.namelist():
        normalized = name.replace("\\", "/")
        parts = PurePosixPath(normalized).parts
        unsafe = (
            normalized.startswith("/")
            or _WINDOWS_DRIVE.match(normalized) is not None
            or ".." in parts
            or not (dest_dir / normalized).resolve().is_relative_to(dest_dir)
        )
        if unsafe:
            raise DownloadError(
                f"Refusing to extract the archive: member {name!r} would be written "
                f"outside {dest_dir} (absolute path or '..'). The archive is not the "
                "official one or has been tampered with; nothing was extracted and it "
                "has been deleted. Pass --url with a trusted mirror."
            )


def _extract(archive: Path, dest_dir: Path) -> None:
    """Unpack every member into ``dest_dir``, overwriting files from an earlier try.

    Member names were already checked by :func:`_verify_archive`, so this only ever
    writes below ``dest_dir``. Overwriting makes an interrupted extraction repairable
    by simply running again.
    """
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DownloadError(
            f"Extracting {archive} into {dest_dir} failed: {_cause(exc)}. Check free disk space "
            f"and permissions, then run again (delete {archive} if the error persists)."
        ) from exc


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


def _write_marker(dest_dir: Path, url: str, image_count: int) -> None:
    """Record a finished run so a re-run without a count check can skip all work."""
    marker = {"url": url, "image_count": image_count}
    (dest_dir / _COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
