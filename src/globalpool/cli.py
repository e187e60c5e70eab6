"""The ``globalpool`` command line: ``compare``, ``bench``, ``bench-memory``, ``warmup``.

Each subcommand lives in its own module; this file only registers them.

>>> from typer.testing import CliRunner
>>> "compare" in CliRunner().invoke(app, ["--help"]).output
True
"""

from __future__ import annotations

import typer

from globalpool.bench.command import bench, bench_memory
from globalpool.experiments.command import compare
from globalpool.kernels.warmup import warmup

app = typer.Typer(
    name="globalpool",
    help="Global pooling: measure which head wins (compare) and how fast each kind runs (bench).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("compare")(compare)
app.command("bench")(bench)
app.command("bench-memory")(bench_memory)
app.command("warmup")(warmup)

if __name__ == "__main__":
    app()
