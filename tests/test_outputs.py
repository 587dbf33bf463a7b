"""Result files: never written over an input, never half written, devices left alone."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from malaria_classifier.outputs import check_output_path, open_output


def test_an_output_named_like_an_image_or_an_input_is_refused(tmp_path):
    cell = tmp_path / "cell.png"
    cell.write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"--output .*cell.png: a results file cannot have"):
        check_output_path(cell, "--output", inputs=[cell])
    notes = tmp_path / "notes.csv"
    notes.write_text("x")
    with pytest.raises(ValueError, match="is one of the inputs"):
        check_output_path(notes, "--output", inputs=[notes])
    with pytest.raises(ValueError, match="is also another output"):
        check_output_path(tmp_path / "a.csv", "--output", others=[tmp_path / "a.csv"])
    assert cell.read_bytes() == b"\x89PNG" and notes.read_text() == "x"


def test_an_output_in_a_missing_folder_or_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"the folder .*nowhere does not exist"):
        check_output_path(tmp_path / "nowhere" / "out.csv", "--output")
    with pytest.raises(ValueError, match="is a folder; give a file name inside it"):
        check_output_path(tmp_path, "--output")
    check_output_path(tmp_path / "fine.csv", "--output")  # no error
    check_output_path(Path(os.devnull), "--output")  # a device is fine too


def test_an_output_in_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    locked = (tmp_path / "locked").resolve()
    locked.mkdir(mode=0o555)
    if os.geteuid() == 0:  # root writes anywhere: have the folder look as it does to a user
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda path, mode: Path(path).resolve() != locked and real_access(path, mode),
        )
    output = locked / "out.csv"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"--output {output}: the folder {locked} is not writable. Choose a folder you "
            f"can write to."
        ),
    ):
        check_output_path(output, "--output")


def test_a_failed_write_leaves_the_old_file_and_no_partial_file(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old results\n")
    with pytest.raises(KeyboardInterrupt), open_output(target) as handle:
        handle.write("half of the new")
        raise KeyboardInterrupt
    assert target.read_text() == "old results\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out.csv"]
    with open_output(target) as handle:
        handle.write("new\n")
    assert target.read_text() == "new\n"


def test_a_link_is_followed_and_a_device_is_written_in_place(tmp_path):
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    with open_output(link) as handle:
        handle.write("new\n")
    assert link.is_symlink() and real.read_text() == "new\n"
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so opening for writing won't wait
    try:
        with open_output(fifo) as handle:
            handle.write("through the pipe\n")
        assert os.read(reader, 100) == b"through the pipe\n"
    finally:
        os.close(reader)
    assert fifo.is_fifo()  # still a pipe, not replaced by a plain file


def test_a_stream_redirected_to_a_file_is_added_to_not_replaced(tmp_path):
    """`malaria predict ... --summary /dev/stdout > all.txt` keeps the predictions."""
    redirected = tmp_path / "all.txt"
    with open(redirected, "w") as shell_redirect:
        shell_redirect.write("predictions\n")
        shell_redirect.flush()
        inode = os.fstat(shell_redirect.fileno()).st_ino
        stream = Path(f"/proc/self/fd/{shell_redirect.fileno()}")  # what /dev/stdout names
        check_output_path(stream, "--summary")
        with open_output(stream) as handle:
            handle.write("summary\n")
    assert redirected.read_text() == "predictions\nsummary\n"
    assert redirected.stat().st_ino == inode  # the same file, not a renamed new one


def test_names_that_are_not_utf8_are_written_back_byte_for_byte(tmp_path):
    name = os.fsdecode(b"bad\xffname.png")  # a Linux file name with a stray byte
    target = tmp_path / "out.csv"
    with open_output(target) as handle:
        handle.write(name + "\n")
    assert target.read_bytes() == b"bad\xffname.png\n"


def test_two_outputs_that_are_one_file_through_a_link_are_refused(tmp_path):
    predictions = tmp_path / "predictions.csv"  # not written yet
    link = tmp_path / "summary.csv"
    link.symlink_to(predictions)
    with pytest.raises(ValueError, match="is also another output"):
        check_output_path(link, "--summary", others=[predictions])


def test_a_link_to_an_image_is_refused_and_the_image_kept(tmp_path):
    cell = tmp_path / "cells" / "cell.png"
    cell.parent.mkdir()
    cell.write_bytes(b"\x89PNG")
    link = tmp_path / "results.csv"
    link.symlink_to(cell)
    with pytest.raises(ValueError, match=r"results.csv \(a link to .*cell.png\): a results file"):
        check_output_path(link, "--output", inputs=[cell.parent])
    assert cell.read_bytes() == b"\x89PNG"


def test_only_names_of_streams_are_written_in_place_under_dev(tmp_path):
    """/dev/shm is an ordinary folder: a file there is replaced whole, not appended to."""
    from malaria_classifier.outputs import is_stream

    assert is_stream(Path("/dev/stdout")) and is_stream(Path("/proc/self/fd/1"))
    assert is_stream(Path("/dev/fd/3")) and is_stream(Path(os.devnull))
    assert not is_stream(Path("/dev/shm/predictions.csv"))
    assert not is_stream(Path("/proc/self/fd")) and not is_stream(tmp_path / "out.csv")
