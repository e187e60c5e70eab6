"""Stopping ``compare`` on a signal: the first SIGINT or SIGTERM stops cleanly, a second at once.

Inside :func:`stop_on_signals` the first SIGINT (Ctrl-C) or SIGTERM raises
:class:`KeyboardInterrupt` in the main thread, wherever it is (training, waiting on workers), so
the ``finally`` blocks above it kill the worker processes and the command exits with
``128 + signal`` (130 for SIGINT, 143 for SIGTERM). Finished runs are already on disk: each one
is written the moment it ends. A second signal does not wait for any clean-up: it kills the
registered worker processes (SIGKILL), restores the terminal's cursor and ends the process.

>>> before = signal.getsignal(signal.SIGINT)
>>> with stop_on_signals():
...     signal.getsignal(signal.SIGINT).__name__
'_handle'
>>> signal.getsignal(signal.SIGINT) is before
True
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator

#: The signals that stop a run.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_CHILDREN: set[int] = set()
_STATE: dict[str, int | None] = {"signal": None}


def register_child(pid: int) -> None:
    """Have a second signal SIGKILL process ``pid`` before exiting."""
    _CHILDREN.add(pid)


def unregister_child(pid: int) -> None:
    """Forget process ``pid`` (it was stopped or has exited)."""
    _CHILDREN.discard(pid)


def kill_now(pids: Iterable[int]) -> None:
    """SIGKILL each of ``pids``; processes already gone are skipped."""
    for pid in list(pids):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def received() -> int | None:
    """The signal that stopped the current :func:`stop_on_signals` block (``None``: none yet)."""
    return _STATE["signal"]


def signal_name(signum: int | None) -> str:
    """``"SIGINT"`` for 2 and for ``None`` (a plain :class:`KeyboardInterrupt`).

    >>> signal_name(15), signal_name(None)
    ('SIGTERM', 'SIGINT')
    """
    return signal.Signals(signum or signal.SIGINT).name


def exit_code(signum: int | None) -> int:
    """The shell's convention, ``128 + signal``: 130 for SIGINT, 143 for SIGTERM.

    >>> exit_code(signal.SIGINT), exit_code(signal.SIGTERM), exit_code(None)
    (130, 143, 130)
    """
    return 128 + int(signum or signal.SIGINT)


def _reap(pids: Iterable[int], within: float = 0.5) -> None:
    """Wait (at most ``within`` seconds in all) for killed children to end, so none is left
    as a zombie for init to reap."""
    import time

    deadline = time.monotonic() + within
    for pid in list(pids):
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except OSError:  # not our child, or already reaped
                break
            if done:
                break
            time.sleep(0.005)


def _exit_at_once(signum: int) -> None:
    kill_now(_CHILDREN)
    _reap(_CHILDREN)
    message = (
        f"\nstopped at once (second {signal_name(signum)}); runs in flight are lost, "
        "finished runs are kept\n"
    )
    with contextlib.suppress(OSError):
        if os.isatty(2):
            os.write(2, b"\x1b[?25h")  # the progress display hides the cursor: show it again
        os.write(2, message.encode())
    os._exit(exit_code(signum))


def _handle(signum: int, frame: object) -> None:
    if _STATE["signal"] is not None:
        _exit_at_once(signum)
    _STATE["signal"] = signum
    raise KeyboardInterrupt(signal_name(signum))


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Install the stop handlers for SIGINT and SIGTERM; restore the previous ones afterwards,
    unless a signal came: then the process is on its way out, and a further signal must still
    end it at once (not raise in the middle of the interpreter's shutdown).

    Outside the main thread (where Python cannot set handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    _STATE["signal"] = None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handle)
    try:
        yield
    finally:
        if _STATE["signal"] is None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def starting_child() -> Iterator[None]:
    """Start child processes in the body so that they ignore SIGINT from their first moment.

    A Ctrl-C reaches the whole process group, workers included; a worker must leave the stop to
    the parent rather than die with a traceback half-way through its start-up. An ignored
    disposition survives ``exec`` (and Python then installs no handler of its own), so SIGINT
    is ignored for the few milliseconds the body takes, then this process's handler is back;
    SIGTERM is held back (blocked, pending) meanwhile. A Ctrl-C in exactly that window is lost:
    press it again.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def ignore_in_child() -> None:
    """In a worker process: keep ignoring SIGINT (the parent decides when to stop it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
