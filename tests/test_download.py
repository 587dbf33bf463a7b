"""Tests for ``malaria_classifier.download`` against a local HTTP server.

Nothing here reaches outside the machine: a ``ThreadingHTTPServer`` on 127.0.0.1 serves
tiny zips built in ``tmp_path`` with synthetic PNGs, and counts the requests it gets so
that "no second download" can be checked.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import re
import shutil
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from malaria_classifier import archives, download
from malaria_classifier.cli import app
from malaria_classifier.download import EXPECTED_IMAGE_COUNT, OFFICIAL_URL, download_dataset
from malaria_classifier.download_dest import DownloadError, count_images

N_PARASITIZED = 3
N_UNINFECTED = 2
N_IMAGES = N_PARASITIZED + N_UNINFECTED


@dataclass
class LocalServer:
    """A running local HTTP server and the paths it was asked for."""

    root: Path
    base_url: str
    requests: list[str] = field(default_factory=list)

    def url(self, name: str) -> str:
        """Return the URL under which ``root/name`` is served."""
        return f"{self.base_url}/{name}"

    def publish(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``name`` and return its URL."""
        (self.root / name).write_bytes(data)
        return self.url(name)


def _png_bytes(seed: int) -> bytes:
    """Make a tiny, distinct PNG so that each image has its own content."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed * 40 % 256, 80, 160)).save(buf, format="PNG")
    return buf.getvalue()


def _zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """Build a zip in memory from ``{member name: content}``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buf.getvalue()


def _cell_members(prefix: str = "cell_images/") -> dict[str, bytes]:
    """Members of a miniature official archive, including the junk it ships."""
    members = {
        f"{prefix}Parasitized/C1_P1_cell_{i}.png": _png_bytes(i) for i in range(N_PARASITIZED)
    }
    members |= {
        f"{prefix}Uninfected/C2_cell_{i}.png": _png_bytes(10 + i) for i in range(N_UNINFECTED)
    }
    members[f"{prefix}Parasitized/Thumbs.db"] = b"not an image"
    return members


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """Serve ``tmp_path/served`` over HTTP on a free local port, then shut down."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    root = tmp_path / "served"
    root.mkdir()
    seen: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - name fixed by http.server
            seen.append(self.path)
            super().do_GET()

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            """Keep test output quiet."""

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=root))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        host, port = httpd.server_address[:2]
        yield LocalServer(root=root, base_url=f"http://{host}:{port}", requests=seen)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def good_zip(server: LocalServer) -> tuple[str, bytes]:
    """Publish a well-formed miniature archive; return its URL and bytes."""
    data = _zip_bytes(_cell_members())
    return server.publish("cell_images.zip", data), data


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_constants_describe_official_archive() -> None:
    assert OFFICIAL_URL == "https://data.lhncbc.nlm.nih.gov/public/Malaria/cell_images.zip"
    assert EXPECTED_IMAGE_COUNT == 2 * 13_779


def test_download_extracts_both_classes(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, _ = good_zip
    dest = tmp_path / "dest"

    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    assert root == (dest / "cell_images").resolve()
    assert len(list((root / "Parasitized").glob("*.png"))) == N_PARASITIZED
    assert len(list((root / "Uninfected").glob("*.png"))) == N_UNINFECTED
    assert count_images(root) == N_IMAGES  # Thumbs.db is not counted
    png = root / "Parasitized" / "C1_P1_cell_0.png"
    with Image.open(png) as img:
        assert img.size == (4, 4)
    assert server.requests == ["/cell_images.zip"]


def test_finds_class_folders_at_top_level(tmp_path: Path, server: LocalServer) -> None:
    url = server.publish("flat.zip", _zip_bytes(_cell_members(prefix="")))
    dest = tmp_path / "dest"

    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    assert root == dest.resolve()


@pytest.mark.parametrize("form", ["plain", "prefixed", "upper"])
def test_correct_sha256_passes(tmp_path: Path, good_zip: tuple[str, bytes], form: str) -> None:
    url, data = good_zip
    digest = hashlib.sha256(data).hexdigest()
    given = {"plain": digest, "prefixed": f"sha256:{digest}", "upper": digest.upper()}[form]

    root = download_dataset(
        tmp_path / "dest", url=url, sha256=given, progress=False, expected_image_count=N_IMAGES
    )

    assert count_images(root) == N_IMAGES


def test_wrong_sha256_raises_and_keeps_no_zip(tmp_path: Path, good_zip: tuple[str, bytes]) -> None:
    url, _ = good_zip
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(
            dest, url=url, sha256="0" * 64, progress=False, expected_image_count=N_IMAGES
        )

    message = str(excinfo.value)
    assert url in message
    assert "hash" in message.lower() and "sha256" in message.lower()
    assert _files_under(dest) == []  # no zip, no pooch temp file, nothing extracted


def test_wrong_sha256_replaces_stale_zip_on_disk(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    """A kept download that does not match the hash is not trusted: fetched again, not kept."""
    url, _ = good_zip
    dest = tmp_path / "dest"
    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    shutil.rmtree(root)  # only the kept zip is left, as if extraction never started

    with pytest.raises(DownloadError, match="hash"):
        download_dataset(dest, url=url, sha256="f" * 64, progress=False, expected_image_count=None)

    assert not (dest / "cell_images.zip").exists()
    assert len(server.requests) == 2


def test_malformed_sha256_is_rejected_before_download(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, _ = good_zip

    with pytest.raises(DownloadError, match="64 hexadecimal"):
        download_dataset(tmp_path / "dest", url=url, sha256="abc123", progress=False)

    assert server.requests == []


def test_missing_url_raises_naming_url(tmp_path: Path, server: LocalServer) -> None:
    url = server.url("does-not-exist.zip")
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(dest, url=url, progress=False)

    message = str(excinfo.value)
    assert url in message
    assert "404" in message
    assert "--url" in message
    assert not dest.exists()  # made for this download, removed again when it failed


def test_a_failed_download_keeps_a_folder_that_was_there(
    tmp_path: Path, server: LocalServer
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DownloadError, match="404"):
        download_dataset(dest, url=server.url("does-not-exist.zip"), progress=False)
    assert dest.is_dir() and _files_under(dest) == []


def test_a_dest_that_is_a_file_is_refused(tmp_path: Path, server: LocalServer) -> None:
    dest = tmp_path / "notes.txt"
    dest.write_text("keep", encoding="utf-8")
    with pytest.raises(DownloadError, match="is a file; the data set needs a folder"):
        download_dataset(dest, url=server.url("cell_images.zip"), progress=False)
    assert dest.read_text(encoding="utf-8") == "keep" and server.requests == []


def test_unreachable_host_raises(tmp_path: Path, server: LocalServer) -> None:
    # Bind and release a port so nothing listens on it: connection refused, instantly.
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/cell_images.zip"

    with pytest.raises(
        DownloadError,
        match=f"^Could not download {re.escape(url)}: .*\\. Check your network connection",
    ):
        download_dataset(tmp_path / "dest", url=url, progress=False)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _bit_flipped(data: bytes) -> bytes:
    """Change one stored member's content so only its CRC check can tell."""
    marker = b"A" * 64
    assert data.count(marker) == 1
    return data.replace(marker, b"B" * 64)


@pytest.mark.parametrize(
    ("corrupt", "problem"),
    [
        (
            _truncated,
            r"is not a readable zip archive \(.+\); the download was probably truncated or "
            r"corrupted\.",
        ),
        (
            _bit_flipped,
            r"is corrupt: member 'cell_images/Uninfected/zz_payload\.png' fails its CRC check\.",
        ),
    ],
    ids=["truncated", "crc"],
)
def test_corrupt_zip_raises_and_is_deleted(
    tmp_path: Path, server: LocalServer, corrupt, problem: str
) -> None:
    members = _cell_members()
    members["cell_images/Uninfected/zz_payload.png"] = b"A" * 64
    data = corrupt(_zip_bytes(members, compression=zipfile.ZIP_STORED))
    url = server.publish("cell_images.zip", data)
    dest = tmp_path / "dest"

    deleted = r" Nothing was extracted\. It has been deleted, so the next run downloads it again\.$"
    with pytest.raises(
        DownloadError, match=f"^{re.escape(str(dest / 'cell_images.zip'))} {problem}{deleted}"
    ):
        download_dataset(dest, url=url, progress=False, expected_image_count=None)

    assert not dest.exists()  # bad zip removed, nothing extracted, our empty folder gone

    # With a good archive published, the next run downloads again and succeeds.
    server.publish("cell_images.zip", _zip_bytes(_cell_members()))
    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    assert count_images(root) == N_IMAGES
    assert len(server.requests) == 2


@pytest.mark.parametrize(
    "evil_name",
    ["../evil.png", "cell_images/../../evil.png", "/tmp/evil.png", "C:/evil.png"],
)
def test_zip_slip_member_is_refused(tmp_path: Path, server: LocalServer, evil_name: str) -> None:
    members = _cell_members()
    members[evil_name] = _png_bytes(99)
    url = server.publish("cell_images.zip", _zip_bytes(members))
    outer = tmp_path / "outer"
    dest = outer / "dest"
    outer.mkdir()

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(dest, url=url, progress=False, expected_image_count=None)

    assert evil_name in str(excinfo.value)
    assert "outside" in str(excinfo.value)
    assert not (tmp_path / "evil.png").exists()
    assert _files_under(outer) == []  # nothing extracted, refused zip deleted
    assert not dest.exists()  # and the folder made for it removed again


def test_count_mismatch_raises_with_numbers(tmp_path: Path, good_zip: tuple[str, bytes]) -> None:
    url, _ = good_zip

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(tmp_path / "dest", url=url, progress=False, expected_image_count=999)

    message = str(excinfo.value)
    assert f"Found {N_IMAGES}" in message
    assert "expected 999" in message


def test_second_call_does_not_download_again(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, data = good_zip
    dest = tmp_path / "dest"
    sha = hashlib.sha256(data).hexdigest()

    first = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    second = download_dataset(
        dest, url=url, sha256=sha, progress=False, expected_image_count=N_IMAGES
    )

    assert first == second
    assert len(server.requests) == 1

    # Complete data is recognised by itself: the kept zip is not even needed.
    (dest / "cell_images.zip").unlink()
    third = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    assert third == first
    assert len(server.requests) == 1


def test_second_call_without_count_check_uses_completion_marker(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, _ = good_zip
    dest = tmp_path / "dest"

    download_dataset(dest, url=url, progress=False, expected_image_count=None)
    (dest / "cell_images.zip").unlink()  # a re-download or re-extract would now fail
    root = download_dataset(dest, url=url, progress=False, expected_image_count=None)

    assert count_images(root) == N_IMAGES
    assert len(server.requests) == 1


def test_incomplete_extraction_is_repaired_from_kept_zip(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, _ = good_zip
    dest = tmp_path / "dest"
    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    (root / "Uninfected" / "C2_cell_0.png").unlink()  # as if extraction was interrupted

    again = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    assert count_images(again) == N_IMAGES
    assert len(server.requests) == 1  # re-extracted from the kept zip, no new download


def _write_pngs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"own_{i}.png").write_bytes(_png_bytes(i))


@pytest.mark.parametrize(
    "layout",
    [("other", "Parasitized"), ("cell_images", "Parasitized")],
    ids=["other-layout", "partial-copy"],
)
def test_dest_holding_other_images_is_refused_before_download(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes], layout: tuple[str, str]
) -> None:
    url, _ = good_zip
    dest = tmp_path / "mine"
    _write_pngs(dest.joinpath(*layout), 3)
    (dest / "notes.txt").write_text("keep", encoding="utf-8")
    before = _files_under(dest)

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    message = str(excinfo.value)
    assert f"--dest {dest.resolve()} already holds 3 PNG images and 1 other file" in message
    assert "not from this download" in message and "empty or new --dest" in message
    assert "delete" not in message.lower()
    assert server.requests == [] and _files_under(dest) == before


def test_leftovers_of_our_own_download_are_not_foreign(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    """A killed pooch download leaves tmpXXXXXXXX; Finder leaves .DS_Store: both are fine."""
    url, _ = good_zip
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "tmpab12_xyz").write_bytes(b"half a download")
    (dest / ".DS_Store").write_bytes(b"finder")

    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    assert count_images(root) == N_IMAGES


def test_failed_count_deletes_the_archive_and_a_new_url_is_fetched(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    good_url, _ = good_zip
    members = _cell_members()
    del members["cell_images/Uninfected/C2_cell_0.png"]
    (server.root / "partial").mkdir()
    bad_url = server.publish("partial/cell_images.zip", _zip_bytes(members))
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError, match=f"Found {N_IMAGES - 1} PNG images"):
        download_dataset(dest, url=bad_url, progress=False, expected_image_count=N_IMAGES)
    assert not dest.exists()  # the archive was ours, so it went, and so did our folder

    root = download_dataset(dest, url=good_url, progress=False, expected_image_count=N_IMAGES)

    assert count_images(root) == N_IMAGES
    assert server.requests == ["/partial/cell_images.zip", "/cell_images.zip"]


def test_kept_archive_from_another_url_is_not_reused(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    old_url, _ = good_zip
    (server.root / "mirror").mkdir()
    new_url = server.publish("mirror/cell_images.zip", _zip_bytes(_cell_members(prefix="")))
    dest = tmp_path / "dest"
    root = download_dataset(dest, url=old_url, progress=False, expected_image_count=N_IMAGES)
    shutil.rmtree(root)  # the zip from old_url is kept, nothing extracted

    again = download_dataset(dest, url=new_url, progress=False, expected_image_count=N_IMAGES)

    assert again == dest.resolve()  # the mirror's flat layout, so really its archive
    assert server.requests == ["/cell_images.zip", "/mirror/cell_images.zip"]


def test_new_url_over_an_unfinished_extraction_is_refused(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    old_url, _ = good_zip
    new_url = server.publish("other.zip", _zip_bytes(_cell_members()))
    dest = tmp_path / "dest"
    root = download_dataset(dest, url=old_url, progress=False, expected_image_count=N_IMAGES)
    (root / "Uninfected" / "C2_cell_0.png").unlink()  # as if extraction was interrupted

    with pytest.raises(DownloadError, match=f"it came from {old_url}, but you asked for"):
        download_dataset(dest, url=new_url, progress=False, expected_image_count=N_IMAGES)
    assert len(server.requests) == 1 and (dest / "cell_images.zip").is_file()


def _invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


def test_cli_expected_images_option(tmp_path: Path, good_zip: tuple[str, bytes]) -> None:
    url, _ = good_zip

    refused = _invoke("data", "download", "--dest", tmp_path / "a", "--url", url)
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert f"pass --expected-images {N_IMAGES} (or 0 to skip the count check)" in refused.output
    assert "expected_image_count" not in refused.output

    for value, folder in ((N_IMAGES, "b"), (0, "c")):
        dest = tmp_path / folder
        result = _invoke(
            "data", "download", "--dest", dest, "--url", url, "--expected-images", value
        )
        assert result.exit_code == 0, result.output
        assert count_images(dest / "cell_images") == N_IMAGES


def test_sha256_is_checked_when_data_are_already_there(
    tmp_path: Path, server: LocalServer, good_zip: tuple[str, bytes]
) -> None:
    url, data = good_zip
    digest = hashlib.sha256(data).hexdigest()
    dest = tmp_path / "dest"
    download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)
    notes: list[str] = []

    def run(sha: str) -> Path:
        return download_dataset(
            dest,
            url=url,
            sha256=sha,
            progress=False,
            expected_image_count=N_IMAGES,
            notify=notes.append,
        )

    with pytest.raises(DownloadError, match=f"has SHA-256 {digest}, not {'0' * 64}"):
        run("0" * 64)
    run(digest)
    assert notes == []

    (dest / "cell_images.zip").unlink()
    with pytest.raises(DownloadError, match="since deleted"):
        run("0" * 64)
    run(digest)
    assert "the extracted files could not be re-checked" in notes[-1]

    (dest / ".download-complete.json").unlink()  # like data unpacked by hand
    run(digest)
    assert notes[-1].startswith("--sha256 could not be checked")
    assert len(server.requests) == 1


@pytest.mark.parametrize("cap", ["ratio", "total"])
def test_zip_bomb_is_refused_before_extracting(
    tmp_path: Path, server: LocalServer, monkeypatch: pytest.MonkeyPatch, cap: str
) -> None:
    members = _cell_members()
    if cap == "ratio":
        members["cell_images/Parasitized/big.png"] = bytes(4 * 1024 * 1024)
        expected = "compressed more than 100:1"
    else:
        monkeypatch.setattr(archives, "_MAX_UNPACKED_BYTES", 200)
        expected = "would unpack to 0 MB, more than the 0 MB allowed"
    url = server.publish("cell_images.zip", _zip_bytes(members))
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError, match=expected):
        download_dataset(dest, url=url, progress=False, expected_image_count=None)

    assert not dest.exists()


@pytest.mark.parametrize(
    "given", ["/data/cell_images.zip", "file:///data/cell_images.zip", "C:\\cell_images.zip"]
)
def test_local_path_as_url_gets_advice(tmp_path: Path, given: str) -> None:
    dest = tmp_path / "dest"

    with pytest.raises(DownloadError) as excinfo:
        download_dataset(dest, url=given, progress=False)

    message = str(excinfo.value)
    assert "only those can be downloaded" in message
    assert f"copy it to {dest.resolve() / 'cell_images.zip'}" in message
    assert not dest.exists()


def test_zip_copied_into_dest_is_used_without_download(tmp_path: Path, server: LocalServer) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "cell_images.zip").write_bytes(_zip_bytes(_cell_members()))
    url = server.url("cell_images.zip")  # nothing published: a fetch would 404

    root = download_dataset(dest, url=url, progress=False, expected_image_count=N_IMAGES)

    assert count_images(root) == N_IMAGES and server.requests == []


def test_bad_zip_copied_into_dest_is_left_alone(tmp_path: Path, server: LocalServer) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "cell_images.zip").write_bytes(_zip_bytes(_cell_members()))

    with pytest.raises(DownloadError, match="it was left alone"):
        download_dataset(
            dest,
            url=server.url("x.zip"),
            progress=False,
            expected_image_count=99,
            notify=lambda _: None,
        )
    assert (dest / "cell_images.zip").is_file() and server.requests == []


def test_failed_check_removes_only_the_empty_folders_it_made(
    tmp_path: Path, server: LocalServer
) -> None:
    url = server.publish("cell_images.zip", _truncated(_zip_bytes(_cell_members())))
    dest = tmp_path / "made" / "by" / "us"

    with pytest.raises(DownloadError, match="not a readable zip"):
        download_dataset(dest, url=url, progress=False, expected_image_count=None)

    assert list(tmp_path.iterdir()) == [server.root]


def test_kept_archive_is_readable_like_other_new_files(
    tmp_path: Path, good_zip: tuple[str, bytes]
) -> None:
    url, _ = good_zip
    old = os.umask(0o022)
    try:
        download_dataset(tmp_path / "dest", url=url, progress=False, expected_image_count=N_IMAGES)
    finally:
        os.umask(old)
    assert (tmp_path / "dest" / "cell_images.zip").stat().st_mode & 0o777 == 0o644


def test_cli_interrupt_says_how_to_continue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(download, "download_dataset", interrupted)

    result = _invoke("data", "download", "--dest", tmp_path / "dest")

    assert result.exit_code == 130
    assert "Run the same command again to continue" in result.output
