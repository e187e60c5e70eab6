"""The ``globalpool`` command and ``python -m globalpool``: the lab's command line where the
``lab`` extra is installed, else one line saying how to get it.

The commands (``compare``, ``bench``, ``cam``, ``warmup``, ...) live in :mod:`globalpool.lab`,
which needs packages the library does not (:data:`LAB_MODULES`). Without them :func:`main`
prints, on stderr, the one line ``globalpool compare needs the lab extra (typer is missing):
pip install "globalpool[lab]"`` and exits with status 2.

>>> missing_lab_modules(["json", "no_such_module_here"])
['no_such_module_here']
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence

#: The modules the lab imports beyond the library's own dependencies: the ``lab`` extra's
#: typer, rich, matplotlib, mnist1d, scikit-learn and pillow.
LAB_MODULES = ("typer", "rich", "matplotlib", "mnist1d", "sklearn", "PIL")
INSTALL = 'pip install "globalpool[lab]"'


def missing_lab_modules(modules: Sequence[str] | None = None) -> list[str]:
    """The names among ``modules`` that cannot be imported here (looked up, not imported).

    Args:
        modules: top-level module names (default :data:`LAB_MODULES`).

    Returns:
        Those without an importable module, in the order given.
    """
    missing = []
    for name in LAB_MODULES if modules is None else modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _needs_lab(args: Sequence[str], missing: Sequence[str]) -> str:
    command = " ".join(["globalpool", *args[:1]]) if args and not args[0].startswith("-") else ""
    what = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"
    return f"{command or 'globalpool'} needs the lab extra ({what}): {INSTALL}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); exits when done.

    Args:
        argv: the arguments after ``globalpool``.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    missing = missing_lab_modules()
    if not missing:
        try:
            from globalpool.lab.cli import app  # the optional part: only with the lab extra
        except ImportError as exc:  # found but not importable (a broken install)
            top = (exc.name or "").partition(".")[0]
            if top not in LAB_MODULES:
                raise
            missing = [top]
    if missing:
        print(_needs_lab(args, missing), file=sys.stderr)
        raise SystemExit(2)
    app(args=args, prog_name="globalpool")
