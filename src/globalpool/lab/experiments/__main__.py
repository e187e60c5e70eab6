"""``python -m globalpool.lab.experiments [OPTIONS]``: ``compare`` without the rest of the CLI.

Handy under ``torchrun --nproc_per_node=K -m globalpool.lab.experiments ...``. Same help and error
style as ``globalpool compare`` (:mod:`globalpool.lab.cli_group`).
"""

import typer

from globalpool.lab.cli_group import GlobalpoolCommand
from globalpool.lab.experiments.command import compare

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
app.command(cls=GlobalpoolCommand)(compare)

if __name__ == "__main__":
    app()
