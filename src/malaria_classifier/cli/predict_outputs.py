"""What ``malaria predict`` writes: the predictions, then the verdict summary.

The two files are written so that an interruption never leaves new predictions beside an
earlier run's summary, which a user would take for the verdicts of these predictions.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from malaria_classifier.prediction import PredictionRow
    from malaria_classifier.verdict import GroupSummary, VerdictRule


def write_predictions(
    rows: Iterator[PredictionRow], output: Path | None, output_format: str, summary: Path | None
) -> dict[str, int]:
    """Write the rows to ``--output`` (whole or not at all) or to standard output.

    Just before the new predictions replace the old file, an earlier run's ``--summary``
    is removed: a kill between the two files' renames would otherwise leave new
    predictions beside an old summary, which a user would take for their verdicts. Any
    interruption thus leaves both old files, new predictions and no summary, or both
    new files (and, in the gap between removal and rename, old predictions alone).

    Args:
        rows: The predictions, streamed as they come.
        output: ``--output``; standard output when None.
        output_format: csv or json.
        summary: ``--summary``, whose earlier file is removed; None without one.

    Returns:
        Counts of images ``predicted`` and ``failed``.
    """
    from malaria_classifier.outputs import open_output
    from malaria_classifier.prediction import write_rows

    if output is not None and sys.stderr.isatty():
        from tqdm import tqdm

        rows = tqdm(rows, desc="Predicting", unit="img", file=sys.stderr)
    if output is None:
        # Standard output may be redirected to a file: it is written as rows come, so
        # the earlier summary goes first.
        if summary is not None:
            _remove_earlier_summary(summary)
        return write_rows(rows, sys.stdout, output_format)
    with open_output(output) as handle:
        counts = write_rows(rows, handle, output_format)
        if summary is not None:
            _remove_earlier_summary(summary)
    return counts


def _remove_earlier_summary(summary: Path) -> None:
    """Delete the summary file an earlier run left, following a link as writing does.

    A device or pipe (``/dev/stdout``) is written in place and keeps nothing stale, so
    it is left alone.
    """
    from malaria_classifier.outputs import is_stream

    if not is_stream(summary):
        Path(os.path.realpath(summary)).unlink(missing_ok=True)


def write_verdicts(
    rows: list[PredictionRow], rule: VerdictRule, group_by: str, summary: Path
) -> None:
    """Write one verdict per group to ``--summary``, each picture counted once.

    Args:
        rows: Every prediction row of the run (repeated pictures are dropped here).
        rule: The model's verdict rule (fitted by ``malaria calibrate``).
        group_by: patient, slide, folder or all.
        summary: The file to write (JSON for a .json name, else CSV).
    """
    from malaria_classifier.outputs import open_output
    from malaria_classifier.verdict import drop_repeated_pictures, summarize_rows, write_summary

    distinct, repeated = drop_repeated_pictures(rows)
    groups = summarize_rows(distinct, rule, group_by)
    with open_output(summary) as handle:
        summary_format = "json" if summary.suffix.lower() == ".json" else "csv"
        write_summary(groups, handle, summary_format)
    typer.echo(f"{len(groups)} {group_by} verdict(s) written to {summary}", err=True)
    if repeated:
        typer.secho(
            f"Note: {repeated} file(s) repeat the picture of another file (the same "
            f"bytes); each picture counts once in the verdicts (the predictions keep "
            f"one row per file).",
            err=True,
            fg=typer.colors.YELLOW,
        )
    _warn_about_groups_without_a_patient(groups, group_by)


def _warn_about_groups_without_a_patient(groups: list[GroupSummary], group_by: str) -> None:
    """Say when file names outside the NIH rule made one "patient" per file or field."""
    from malaria_classifier.verdict import groups_without_a_patient

    unnamed = groups_without_a_patient(groups)
    if group_by not in ("patient", "slide") or not unnamed:
        return
    examples = ", ".join(unnamed[:3]) + (", ..." if len(unnamed) > 3 else "")
    typer.secho(
        f"Warning: {len(unnamed)} of {len(groups)} groups are not {group_by}s but single "
        f"fields or files ({examples}): their names do not follow the NIH rule "
        f"(C<slide>P<patient>..._cell_<n>), so each is judged on its own cells only. "
        f"Put each {group_by}'s cells in one folder and use --group-by folder.",
        err=True,
        fg=typer.colors.YELLOW,
    )
