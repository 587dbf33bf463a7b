"""Helpers every ``malaria`` command shares: errors as one line, Ctrl+C hints, quiet imports.

User errors (bad paths, bad layouts, bad settings) are printed as one clear line and exit
with status 2, so a user never has to read a traceback to learn what to type instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Any

import typer

# What a shell reports for a command stopped by SIGPIPE (128 + 13), as `yes | head` does.
BROKEN_PIPE_STATUS = 141


def _user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the library's user-facing errors into a message and exit status 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from malaria_classifier.download import DownloadError
        from malaria_classifier.splits import LeakageError

        try:
            return function(*args, **kwargs)
        except (ValueError, DownloadError, LeakageError, FileExistsError) as error:
            typer.secho(f"Error: {error}", err=True, fg=typer.colors.RED)
            raise typer.Exit(code=2) from None
        except BrokenPipeError:  # `malaria predict cells/ | head`: the reader has stopped
            _silence_stdout()
            raise typer.Exit(code=BROKEN_PIPE_STATUS) from None
        except OSError as error:  # a file the user named cannot be written or read
            where = f" ({error.filename})" if error.filename else ""
            typer.secho(
                f"Error: {error.strerror or error}{where}. Check that the path exists and "
                f"that you may read or write it.",
                err=True,
                fg=typer.colors.RED,
            )
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            typer.secho("Interrupted.", err=True)
            raise typer.Exit(code=130) from None

    return wrapper


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit raises no second broken pipe."""
    try:
        descriptor = sys.stdout.fileno()
    except (OSError, ValueError):  # not a real file (e.g. captured by a test runner)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, descriptor)
    os.close(devnull)


@contextlib.contextmanager
def _on_interrupt(hint: str) -> Iterator[None]:
    """On Ctrl+C, say how to continue the long job (then exit as interrupted)."""
    try:
        yield
    except KeyboardInterrupt:
        typer.secho(f"Interrupted. {hint}", err=True)
        raise typer.Exit(code=130) from None


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder; False when it cannot even be looked at."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow and probe devices with its C++ start-up log hidden.

    TensorFlow 2.21 writes oneDNN/CUDA notices straight to file descriptor 2 before
    its logging honours TF_CPP_MIN_LOG_LEVEL; they bury our own messages. Set
    MALARIA_TF_LOGS=1 to see them.
    """
    if os.environ.get("MALARIA_TF_LOGS") == "1":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow as tf

            tf.config.list_physical_devices()
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _echo_metrics(block: dict[str, Any]) -> None:
    """Print one split's metrics with their patient-bootstrap intervals (train, evaluate).

    Args:
        block: A split's report from ``training`` or ``evaluate`` (``split``, ``cells``,
            ``patients``, ``positive_class``, ``metrics``; ``undefined`` when some are;
            ``bootstrap.unit``, ``threshold`` and evaluate's ``threshold_rule`` when given).
    """
    unit = block.get("bootstrap", {}).get("unit", "patient")  # or source field images
    groups = f"{block['patients']} {unit}{'' if block['patients'] == 1 else 's'}"
    typer.echo(
        f"{block['split']} split: {block['cells']} cells of {groups}; positive class "
        f"{block['positive_class']}; 95% CI from a bootstrap over {unit}s"
    )
    if block.get("threshold_rule"):
        typer.echo(block["threshold_rule"])
    elif block.get("threshold") is not None:
        typer.echo(f"Threshold: P({block['positive_class']}) >= {block['threshold']:.4g}.")
    for name, values in block["metrics"].items():
        low, high = values["ci95"]
        if values["value"] is None:
            reason = block.get("undefined", {}).get(name, "no value")
            typer.echo(f"  {name:<12} undefined ({reason})")
        elif low is None or high is None:
            typer.echo(f"  {name:<12} {values['value']:.4f}  [no interval]")
        else:
            typer.echo(f"  {name:<12} {values['value']:.4f}  [{low:.4f}, {high:.4f}]")
    from malaria_classifier.evaluation import interval_caveat

    caveat = interval_caveat(block)
    if caveat:
        typer.secho(f"Warning: {caveat}", err=True, fg=typer.colors.YELLOW)
