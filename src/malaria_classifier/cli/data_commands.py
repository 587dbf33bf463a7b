"""``malaria data check`` and ``malaria data download``: look at data before training on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from malaria_classifier.cli._common import _on_interrupt, _user_errors

if TYPE_CHECKING:
    from malaria_classifier.data import DatasetReport


@_user_errors
def data_check(
    directory: Annotated[Path, typer.Argument(help="NIH-layout folder (or a parent of it).")],
    json_output: Annotated[
        Path | None, typer.Option("--json", help="Also write the report as JSON here.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit with status 1 when a file is unreadable, a picture is stored under "
            "both labels or images lie outside the class folders (for scripts and CI).",
        ),
    ] = False,
) -> None:
    """Count images per class and patient; find unreadable files and duplicates."""
    from malaria_classifier.data import check_dataset
    from malaria_classifier.outputs import check_output_path, open_output

    if json_output:
        check_output_path(json_output, "--json", inputs=[directory])
    report = check_dataset(directory, progress=sys.stderr.isatty())
    summary = report.to_dict()
    _echo_overview(report, summary)
    conflicts = report.label_conflicts
    outside = report.outside_class_folders
    _echo_problems(report, conflicts, outside, json_output)
    if json_output:
        with open_output(json_output) as handle:
            handle.write(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"Report written to {json_output}")
    if strict and (report.unreadable or conflicts or outside):
        typer.secho(
            "--strict: the data have problems listed above (unreadable files, pictures under "
            "both labels or unlabelled images); fix them or leave --strict out.",
            err=True,
            fg=typer.colors.RED,
        )
        raise typer.Exit(code=1)


data_check.__doc__ = (data_check.__doc__ or "") + (
    "\n\nPatient ids come from NIH file names: C<slide>...P<n> gives patient P<n>, "
    "C<slide> alone (healthy donors) gives C<slide>; other names fall back to their "
    "source field image (the name before _cell_<n>)."
)


def _echo_overview(report: DatasetReport, summary: dict) -> None:
    """Print what the data hold: counts per class, patients and image sizes.

    The folder and the sizes come from ``summary`` (``report.to_dict()``), whose folder
    name is printable even when it is not valid UTF-8.
    """
    typer.echo(f"Data folder: {summary['root']}")  # printable even for non-UTF-8 names
    for label, count in sorted(report.counts.items()):
        typer.echo(f"  {label:<12} {count:>7,} images")
    patients = report.patients
    typer.echo(
        f"  Patients:    {patients['total']} ({patients['with_parasitized_cells']} with "
        f"parasitized cells, {patients['with_only_uninfected_cells']} with only uninfected "
        f"cells; patient rule: `malaria data check --help`)"
    )
    for axis in ("height", "width"):
        stats = summary["image_size"].get(axis)
        if stats:
            typer.echo(
                f"  Image {axis:<6} min {stats['min']} / median {stats['median']:g} / "
                f"p95 {stats['p95']:.0f} / max {stats['max']} px"
            )


def _echo_problems(
    report: DatasetReport,
    conflicts: list[list[str]],
    outside: list[str],
    json_output: Path | None,
) -> None:
    """Print what would spoil training, each list shortened so the counts stay readable.

    Args:
        report: The data check's report.
        conflicts: Pictures stored under both labels (``report.label_conflicts``).
        outside: Images outside the class folders (``report.outside_class_folders``).
        json_output: Where the full lists go, if anywhere (named in "... and N more").
    """
    typer.echo(f"  Unreadable:  {len(report.unreadable)}")
    for _path, error in report.unreadable[:20]:
        typer.echo(f"    {error}")
    _echo_more(len(report.unreadable), 20, json_output)
    typer.echo(f"  Duplicate contents (same SHA-256): {len(report.duplicates)} group(s)")
    for group in report.duplicates[:10]:
        typer.echo(f"    {' = '.join(group)}")
    _echo_more(len(report.duplicates), 10, json_output)
    if conflicts:
        typer.secho(
            f"  Label conflicts: {len(conflicts)} picture(s) stored as both Parasitized and "
            f"Uninfected; keep one copy with the right label:",
            fg=typer.colors.YELLOW,
        )
        for group in conflicts[:10]:
            typer.echo(f"    {' = '.join(group)}")
        _echo_more(len(conflicts), 10, json_output)
    if report.skipped_files:
        typer.echo(f"  Skipped non-image files: {len(report.skipped_files)}")
        for path in report.skipped_files[:5]:
            typer.echo(f"    {path}")
        _echo_more(len(report.skipped_files), 5, json_output)
    if outside:
        typer.secho(
            f"  Images outside Parasitized/ and Uninfected/ (no label, not used): {len(outside)}",
            fg=typer.colors.YELLOW,
        )
        for path in outside[:5]:
            typer.echo(f"    {path}")
        _echo_more(len(outside), 5, json_output)


def _echo_more(total: int, shown: int, json_output: Path | None) -> None:
    """Say how many entries a shortened list left out, and where the full list is."""
    if total > shown:
        where = f"all in {json_output}" if json_output else "all with --json FILE"
        typer.echo(f"    ... and {total - shown} more ({where})")


@_user_errors
def data_download(
    dest: Annotated[
        Path, typer.Option(help="Folder to download and extract into: empty, new, or ours.")
    ] = Path("data"),
    url: Annotated[
        str | None, typer.Option(help="Mirror URL of cell_images.zip (http, https or ftp).")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected SHA-256 of the zip.")] = None,
    expected_images: Annotated[
        int | None,
        typer.Option(
            "--expected-images",
            min=0,
            help="PNG images the zip must hold (default 27,558, the official count); "
            "0 skips the check, e.g. for a mirror serving a subset.",
        ),
    ] = None,
) -> None:
    """Download the official NIH cell_images.zip, verify it and extract it.

    A zip already at DEST/cell_images.zip is verified and extracted without downloading.
    """
    from malaria_classifier.download import EXPECTED_IMAGE_COUNT, OFFICIAL_URL, download_dataset

    source = url or OFFICIAL_URL
    expected = EXPECTED_IMAGE_COUNT if expected_images is None else expected_images or None
    typer.echo(f"Downloading {source} into {dest} (skipped if already there)", err=True)
    with _on_interrupt(
        "Run the same command again to continue: a finished download is kept and "
        "re-used, an unfinished one starts over."
    ):
        folder = download_dataset(
            dest,
            url=source,
            sha256=sha256,
            progress=True,
            expected_image_count=expected,
            notify=lambda note: typer.echo(f"Note: {note}", err=True),
        )
    typer.echo(f"Data ready in {folder}. Next: malaria data check {folder}")
