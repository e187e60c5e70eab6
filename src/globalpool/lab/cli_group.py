"""The ``globalpool`` command group: one error style and plain help for every subcommand.

:class:`GlobalpoolGroup` is the ``cls`` of a multi-command typer app, :class:`GlobalpoolCommand`
that of a single command (``python -m globalpool.lab.experiments``).

* Errors: every click error (bad type, unknown option, out-of-range value) and every exception a
  command raises ends as one ``Error: ...`` line on stderr, exit 2 for usage and 1 for runtime
  errors (see :mod:`globalpool.lab.cli_errors`), no traceback unless ``GLOBALPOOL_DEBUG=1``.
* Help: options that take a value show it as their upper-case name (``--kinds KINDS``), flags
  show none; use it with ``rich_markup_mode=None`` for click's plain help (no boxes).

>>> import typer
>>> from typer.testing import CliRunner
>>> app = typer.Typer(cls=GlobalpoolGroup, rich_markup_mode=None)
>>> @app.command()
... def run(repeats: int = 1, quick: bool = False) -> None:
...     "Run."
>>> @app.command()
... def other() -> None:
...     "Other."
>>> result = CliRunner().invoke(app, ["run", "--repeats", "many"])
>>> result.exit_code, result.output.splitlines()[0].startswith("Error: --repeats: ")
(2, True)
>>> "--repeats REPEATS" in CliRunner().invoke(app, ["run", "--help"]).output
True
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from globalpool.lab.cli_errors import CLIError, click_exceptions, debug, from_click, from_exception

_PASS_THROUGH = tuple(
    {
        typer.Exit,
        typer.Abort,
        getattr(click_exceptions, "Exit", typer.Exit),  # typer's own in newer typer versions
        getattr(click_exceptions, "Abort", typer.Abort),
        # "globalpool" alone prints the help (click >= 8.2 raises this to do so)
        getattr(click_exceptions, "NoArgsIsHelpError", typer.Exit),
    }
)


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turn any error raised inside into a :class:`~globalpool.lab.cli_errors.CLIError`."""
    try:
        yield
    except (CLIError, *_PASS_THROUGH):
        raise
    except click_exceptions.ClickException as exc:
        raise from_click(exc) from None
    except Exception as exc:
        if debug():
            raise
        raise from_exception(exc) from None


def plain_metavars(command: Any) -> Any:
    """Give every value-taking option of ``command`` its upper-case name as metavar."""
    for param in command.params:
        takes_value = isinstance(param, TyperOption) and not (param.is_flag or param.count)
        if takes_value and param.metavar is None and param.name:
            param.metavar = param.name.upper()
    return command


class _Conventions:
    """``make_context`` (parsing, ``--help``) and ``invoke`` (running) under the conventions."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: typer.Context | None = None,
        **extra: Any,
    ) -> typer.Context:
        plain_metavars(self)
        with one_line_errors():
            return super().make_context(info_name, args, parent, **extra)  # type: ignore[misc]

    def invoke(self, ctx: typer.Context) -> Any:
        with one_line_errors():
            return super().invoke(ctx)  # type: ignore[misc]


class GlobalpoolGroup(_Conventions, TyperGroup):
    """A typer group whose subcommands follow the conventions above."""

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any | None:
        command = super().get_command(ctx, cmd_name)
        return None if command is None else plain_metavars(command)


class GlobalpoolCommand(_Conventions, TyperCommand):
    """A single typer command following the same conventions (for one-command apps)."""
