"""``python -m globalpool.experiments [OPTIONS]``: ``compare`` without the rest of the CLI.

Handy under ``torchrun --nproc_per_node=K -m globalpool.experiments ...``.
"""

import typer

from globalpool.experiments.command import compare

app = typer.Typer(add_completion=False)
app.command()(compare)

if __name__ == "__main__":
    app()
