"""The ``malaria`` command: parses arguments and calls library functions, nothing more.

User errors (bad paths, bad layouts, bad settings) are printed as one clear line and
exit with status 2; no traceback is shown for them.

One module per group of commands (``data_commands``: data check, data download;
``training_commands``: train, cv, tune; ``evaluation_commands``: evaluate, calibrate;
``predict_command``: predict; ``deploy_commands``: dashboard, export), helpers they share
in ``_common``. The commands are registered here, in the order ``malaria --help`` lists
them.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # hide TensorFlow's start-up chatter

import typer  # noqa: E402

from malaria_classifier.cli._common import _import_tensorflow_quietly  # noqa: E402
from malaria_classifier.cli.data_commands import data_check, data_download  # noqa: E402
from malaria_classifier.cli.deploy_commands import dashboard, export  # noqa: E402
from malaria_classifier.cli.evaluation_commands import calibrate, evaluate  # noqa: E402
from malaria_classifier.cli.predict_command import predict  # noqa: E402
from malaria_classifier.cli.training_commands import (  # noqa: E402
    cross_validation,
    train,
    tune_command,
)

__all__ = ["app"]

app = typer.Typer(
    help="Tell Parasitized from Uninfected red-blood-cell images (NIH/NLM malaria cells).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Check or download cell-image data.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _show_version(value: bool) -> None:
    """Print the version for ``--version`` and stop before any command runs."""
    if value:
        from malaria_classifier import __version__

        typer.echo(f"malaria-classifier {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    context: typer.Context,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Tell Parasitized from Uninfected red-blood-cell images (NIH/NLM malaria cells)."""
    # predict imports TensorFlow only if it must, data commands and --help never do (a
    # help text took 4 s); the rest import it here, with its start-up log hidden.
    if context.invoked_subcommand not in ("predict", "data") and "--help" not in sys.argv:
        _import_tensorflow_quietly()


data_app.command("check")(data_check)
data_app.command("download")(data_download)
app.command()(train)
app.command("cv")(cross_validation)
app.command("tune")(tune_command)
app.command()(evaluate)
app.command()(predict)
app.command()(dashboard)
app.command()(calibrate)
app.command("export")(export)
