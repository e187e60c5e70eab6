"""The ``globalpool`` command line: ``compare``, ``cam``, ``bench``, ``bench-memory``, ``warmup``.

Each subcommand lives in its own module; this file only registers them and adds
``--version``. Errors are one ``Error: ...`` line, exit 2 for a bad option value and 1 for a
failure while running (:mod:`globalpool.lab.cli_errors`, :mod:`globalpool.lab.cli_group`).

>>> from typer.testing import CliRunner
>>> "compare" in CliRunner().invoke(app, ["--help"]).output
True
>>> CliRunner().invoke(app, ["--version"]).output.startswith("globalpool ")
True
"""

from __future__ import annotations

from importlib import metadata
from typing import Annotated

import typer

from globalpool.lab.bench.command import bench, bench_memory
from globalpool.lab.cam.command import cam
from globalpool.lab.cli_group import GlobalpoolGroup
from globalpool.lab.experiments.command import compare
from globalpool.lab.warmup import warmup


def version() -> str:
    """The installed distribution's version (the package's ``__version__`` if not installed)."""
    try:
        return metadata.version("globalpool")
    except metadata.PackageNotFoundError:
        from globalpool import __version__

        return __version__


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"globalpool {version()}")
        raise typer.Exit()


app = typer.Typer(
    name="globalpool",
    cls=GlobalpoolGroup,
    help="Global pooling: measure which head wins (compare) and how fast each kind runs (bench).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Global pooling: measure which head wins (compare) and how fast each kind runs (bench)."""


app.command("compare")(compare)
app.command("cam")(cam)
app.command("bench")(bench)
app.command("bench-memory")(bench_memory)
app.command("warmup")(warmup)

if __name__ == "__main__":
    app()
