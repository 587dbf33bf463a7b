"""Download the official NIH malaria cell archive, verify it and unpack it safely.

Nothing here runs unless a user asks for it: the package never reaches the network on
import or during training. Each failure mode gets its own, actionable
:class:`DownloadError`:

1. **Look** at ``dest`` first (:mod:`download_dest`). Complete data from an earlier
   run is returned at once; a folder holding anything this module did not write
   (images of another layout, a partial copy made by hand) is refused before anything
   is fetched, so the download is never mixed into someone's own files.
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
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import pooch
import requests

from malaria_classifier.archives import (
    OFFICIAL_IMAGE_COUNT,
    ArchiveRejectedError,
    check_member_names,
    check_sizes,
    find_layout,
)
from malaria_classifier.download_dest import (
    ARCHIVE_NAME,
    COMPLETE_MARKER,
    SOURCE_RECORD,
    DownloadError,
    count_images,
    find_class_root,
    find_ready_data,
    has_extracted_files,
    read_json,
    refuse_unknown_files,
)
from malaria_classifier.images import sha256_of_file
from malaria_classifier.outputs import missing_folders, remove_empty_folders

OFFICIAL_URL = "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
EXPECTED_IMAGE_COUNT = OFFICIAL_IMAGE_COUNT  # 13,779 Parasitized + 13,779 Uninfected
_URL_SCHEMES = ("http", "https", "ftp")
_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")


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
        ready = find_ready_data(dest_dir, url, known_hash, expected_image_count, say)
        if ready is not None:
            return ready
        refuse_unknown_files(dest_dir)
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
    source = read_json(dest_dir / SOURCE_RECORD)
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
    marker = read_json(dest_dir / COMPLETE_MARKER) or {}
    origin = (source or {}).get("url") or marker.get("url")
    kept = archive.is_file() and origin == url
    if kept and (known_hash is None or sha256_of_file(archive) == known_hash):
        return archive, True
    if (kept or origin not in (None, url)) and has_extracted_files(dest_dir):
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
    (dest_dir / SOURCE_RECORD).write_text(json.dumps({"url": url}) + "\n", encoding="utf-8")
    try:
        fetched = _fetch(url, dest_dir, known_hash, progress)
    except BaseException:
        _discard_archive(dest_dir)
        raise
    _make_readable(fetched)
    return fetched, True


def _discard_archive(dest_dir: Path) -> None:
    """Delete our archive and its source record (both written by this module)."""
    (dest_dir / ARCHIVE_NAME).unlink(missing_ok=True)
    (dest_dir / SOURCE_RECORD).unlink(missing_ok=True)


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
    (dest_dir / COMPLETE_MARKER).unlink(missing_ok=True)  # stale until this run succeeds
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest_dir)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DownloadError(
            f"Extracting {archive} into {dest_dir} failed: {_cause(exc)}. Check free disk "
            "space (about 400 MB) and permissions, then run the same command again."
        ) from exc
    root = find_class_root(dest_dir)
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
    (dest_dir / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
    return root


def _make_folder(folder: Path) -> list[Path]:
    """Create ``folder`` (and missing parents); return those created, deepest first."""
    created = missing_folders(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return created
