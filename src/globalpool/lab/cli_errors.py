"""One error style for every ``globalpool`` command: a single ``Error: ...`` line on stderr.

Exit codes: 2 for a usage error (a bad option value: :func:`usage_error`, or one click finds
while parsing), 1 for a runtime error (missing data, an unwritable folder, a failed run:
:func:`runtime_error`). A message that concerns one option starts with its name, as in
``Error: --kinds: must be among (...), got 'foo'``. No traceback is printed unless
``GLOBALPOOL_DEBUG=1`` (see :mod:`globalpool.lab.cli_group`).

>>> err = usage_error("--kinds", "kinds must be among ('avg', 'max'), got 'foo'")
>>> err.exit_code, err.format_message()
(2, "--kinds: must be among ('avg', 'max'), got 'foo'")
>>> runtime_error("cifar10: missing\\n test_batch in /data").format_message()
'cifar10: missing test_batch in /data'
"""

from __future__ import annotations

import importlib
import os
from typing import IO, Any

import typer

# click's exceptions as typer uses them: click itself, or the copy newer typer versions vendor.
click_exceptions = importlib.import_module(typer.BadParameter.__module__)


def debug() -> bool:
    """True when ``GLOBALPOOL_DEBUG`` is set: errors propagate with their traceback."""
    return bool(os.environ.get("GLOBALPOOL_DEBUG"))


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _without_subject(option: str, message: str) -> str:
    """``"kinds must be ..."`` -> ``"must be ..."`` when the option is ``--kinds``: the option
    already names the subject."""
    bare = option.lstrip("-")
    subjects = {option, bare, bare.replace("-", "_"), bare + "s", bare.removesuffix("s")}
    first, _, rest = message.partition(" ")
    return rest if first in subjects and rest else message


class CLIError(click_exceptions.ClickException):
    """A runtime error (exit 1), printed as one ``Error:`` line; ``option`` prefixes it."""

    exit_code = 1

    def __init__(
        self, message: str, *, option: str | None = None, exit_code: int | None = None
    ) -> None:
        self.option = option
        text = _one_line(message)
        if option:
            text = f"{option}: {_without_subject(option, text)}"
        super().__init__(text)
        if exit_code is not None:
            self.exit_code = exit_code

    def format_message(self) -> str:
        return self.message

    def show(self, file: IO[Any] | None = None) -> None:
        typer.echo(f"Error: {self.format_message()}", file=file, err=file is None)


class CLIUsageError(CLIError):
    """A bad option value (exit 2)."""

    exit_code = 2


def usage_error(option: str, message: str) -> CLIUsageError:
    """The error for a bad value of ``option`` (exit 2)."""
    return CLIUsageError(message, option=option)


def runtime_error(message: str, option: str | None = None) -> CLIError:
    """The error for a failure while running (exit 1), optionally about ``option``."""
    return CLIError(message, option=option)


def from_click(exc: Any) -> CLIError:
    """Click's own errors (bad type, unknown option, ...) in the same one-line style."""
    if isinstance(exc, CLIError):
        return exc
    if isinstance(exc, click_exceptions.BadParameter) and exc.param is not None:
        opts = getattr(exc.param, "opts", None) or [exc.param.name or "?"]
        return CLIUsageError(exc.message, option=opts[0])
    cls = CLIUsageError if isinstance(exc, click_exceptions.UsageError) else CLIError
    return cls(exc.format_message(), exit_code=exc.exit_code)


def from_exception(exc: BaseException) -> CLIError:
    """Any other exception as a runtime error: its type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return CLIError(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)
