"""Writing result files safely: never over an input, never half a file, never a lost device.

Every text file the tool writes for a user (predictions, verdict summaries, reports,
metrics) goes through :func:`open_output`, and every output path a user names is checked
by :func:`check_output_path` before any work starts, so a typo costs a message, not an
hour of predictions or an input image.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from malaria_classifier.constants import IMAGE_SUFFIXES

# Names for one of this process's streams, whatever they are redirected to (a regular
# file too): /dev/stdout, /dev/fd/3, /proc/self/fd/1. Other paths under /dev (e.g. the
# tmpfs /dev/shm) are ordinary files unless they are devices or pipes.
_STREAM_NAME = re.compile(r"^/(dev/(stdout|stderr|fd/\d+)|proc/(self|thread-self|\d+)/fd/\d+)$")


def check_output_path(
    output: Path, option: str, inputs: Iterable[Path] = (), others: Iterable[Path] = ()
) -> None:
    """Refuse an output path that cannot be written or would destroy something.

    Args:
        output: The path the user gave.
        option: How the user named it (``--output``), for the message.
        inputs: Files and folders being read: the output must not be one of them.
        others: Other outputs of the same command: each needs a path of its own.

    Raises:
        ValueError: Saying what is wrong with the path and what to pass instead.
    """
    # A link is followed when the file is written, so its target must pass as well.
    for name in (output, Path(os.path.realpath(output))):
        if name.suffix.lower() in IMAGE_SUFFIXES:
            shown = output if name == output else f"{output} (a link to {name})"
            raise ValueError(
                f"{option} {shown}: a results file cannot have an image's name "
                f"({name.suffix}); it would be taken for (or replace) a cell image. "
                f"Name it .csv or .json."
            )
    if _is_folder(output):
        raise ValueError(f"{option} {output} is a folder; give a file name inside it.")
    for item in inputs:
        if _same_file(output, item):
            raise ValueError(
                f"{option} {output} is one of the inputs; writing there would replace "
                f"it. Choose another file."
            )
    for other in others:
        if other is not None and (
            _same_file(output, other) or os.path.realpath(output) == os.path.realpath(other)
        ):
            raise ValueError(f"{option} {output} is also another output; give each its own file.")
    if is_stream(output):
        return  # a device or a pipe: written in place (e.g. /dev/stdout)
    folder = output.resolve().parent
    if not folder.is_dir():
        raise ValueError(
            f"{option} {output}: the folder {folder} does not exist. Create it or choose "
            f"another file."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"{option} {output}: the folder {folder} is not writable. Choose a folder you "
            f"can write to."
        )


def check_output_folder(output_dir: Path, data_dir: Path, writes: str) -> None:
    """Refuse an output folder that is a file, or that is the data folder or lies in it.

    Inside the data, what the command writes (figures are PNG files) would be read as
    cells next time, and the data would no longer be only read.

    Args:
        output_dir: The folder the user named with ``--output``.
        data_dir: The ``--data`` folder.
        writes: What the command writes there, for the message ("a run folder").

    Raises:
        ValueError: Saying what to pass instead.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(
            f"--output {output_dir} is a file; this command writes {writes}. Give a "
            f"folder name (it is created if needed)."
        )
    resolved, data = output_dir.resolve(), data_dir.resolve()
    if resolved == data or data in resolved.parents:
        raise ValueError(
            f"--output {output_dir} is inside the data folder {data_dir}: {writes} there "
            f"would mix results with the cells (its figures would be read as cell images "
            f"next time). Choose a folder outside it."
        )


@contextlib.contextmanager
def open_output(path: Path, newline: str | None = "") -> Iterator[TextIO]:
    """A text file to write ``path`` through: all of it appears, or none of it.

    A regular file (or a new one) is written under a temporary name beside it and renamed
    over ``path`` only when the block ends without error; on an error or Ctrl+C the
    temporary file is removed and an existing ``path`` is untouched. A symbolic link is
    followed, so the file it points to is replaced, not the link. A device or a pipe
    (``/dev/stdout``, ``>(command)``) is written directly, since renaming over it would
    replace it with a plain file. File names that are not valid UTF-8 (possible on
    Linux) are written back byte for byte rather than stopping the whole file.
    """
    options = {"encoding": "utf-8", "errors": "surrogateescape", "newline": newline}
    if is_stream(path):
        # Opened by the name given (a pipe's resolved name is no path at all) and
        # appended to, after what this process already printed: `--summary /dev/stdout
        # > all.txt` must add to all.txt, not truncate or replace it.
        sys.stdout.flush()
        with open(path, "a", **options) as handle:
            yield handle
        return
    with written_in_full(path) as temporary, open(temporary, "w", **options) as handle:
        yield handle


@contextlib.contextmanager
def written_in_full(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (a figure's
    PNG or HTML); renamed over ``path`` when the block ends without error, removed on an
    error or Ctrl+C, so ``path`` is never half written. A link is followed."""
    target = Path(os.path.realpath(path))
    temporary = target.with_name(f".{target.name}.partial")
    try:
        yield temporary
        temporary.replace(target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _is_folder(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def is_stream(path: Path) -> bool:
    """A device, a pipe, or a name for one of this process's streams (``/dev/stdout``,
    ``/dev/fd/3``, ``/proc/self/fd/1``), whatever it is redirected to."""
    name = os.path.abspath(path)
    return _is_special(Path(name)) or _STREAM_NAME.match(name) is not None


def _is_special(path: Path) -> bool:
    """An existing path that is neither a regular file nor a folder (device, pipe, socket)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its parents that do not exist yet, deepest first.

    Taken before a command creates its output folder, so that a refused or failed
    start can remove exactly what it made (:func:`remove_empty_folders`).
    """
    missing: list[Path] = []
    while not folder.exists() and not folder.is_symlink() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def remove_empty_folders(folders: Iterable[Path]) -> None:
    """Remove these folders, deepest first, while they are empty (never their files)."""
    for folder in folders:
        try:
            folder.rmdir()  # refuses a folder that holds anything
        except OSError:
            return
