"""Worker processes for ``compare``: each loads the dataset once, then trains runs it is sent.

A worker is a spawned process with its own pipe to the parent. It ignores SIGINT (a Ctrl-C
reaches the whole process group; the parent decides what to stop), dies with the parent (Linux
``PR_SET_PDEATHSIG``), and writes each finished run to the :class:`ResultStore` itself before
reporting it, so a run that has finished is on disk whatever happens to either process next.
Stopping a worker is a SIGKILL: it holds nothing that needs a clean-up, and a run in flight is
worth nothing half done.

Messages from a worker: ``("ready",)``, ``("progress", label, done, steps)``,
``("done", label, record)``, ``("error", label, message)`` and ``("fatal", message)`` (it could
not start). To a worker: a :class:`RunSpec`, or ``None`` to exit.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import signal
import sys
from multiprocessing.connection import Connection
from typing import Any

from globalpool.lab.experiments import interrupt
from globalpool.lab.experiments.runner import run_one

_JOIN_S = 2.0  # how long a worker told to exit may take before it is killed


def one_line(err: BaseException) -> str:
    """``"TypeName: message"`` on one line."""
    return " ".join(f"{type(err).__name__}: {err}".split())


def _die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux), even if killed."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


#: What the pipe raises once the parent has closed its end (it stopped, or it is exiting).
PARENT_GONE = (EOFError, BrokenPipeError, ConnectionResetError)


def _worker_main(conn: Connection, parent: int, source: Any, store: Any, device: str) -> None:
    """Entry point of a worker process (see the module docstring).

    A parent that stops (a signal, the end of the plan) may close its end of the pipe before
    it tells or kills this worker: the worker then just ends, with no traceback of its own over
    the parent's one-line message (finished runs are already on disk).
    """
    interrupt.ignore_in_child()
    _die_with_parent(parent)
    with contextlib.suppress(*PARENT_GONE):
        _serve(conn, source, store, device)


def _serve(conn: Connection, source: Any, store: Any, device: str) -> None:
    """Load the data, then train and save each run the parent sends until it sends ``None``."""
    import torch

    torch.set_num_threads(1)  # each run sets its own count (its RunEnv's) while it trains
    try:
        data = source.load()
    except Exception as err:
        conn.send(("fatal", one_line(err)))
        return
    conn.send(("ready",))
    while True:
        spec = conn.recv()
        if spec is None:
            return

        def report(done: int, steps: int, label: str = spec.label) -> None:
            conn.send(("progress", label, done, steps))

        kept: list[Any] = []
        keep = kept.append if store.save_models else None
        try:
            record = run_one(
                spec, data, device=torch.device(device), progress=report, on_model=keep
            )
            store.save(spec, record, model=kept[0] if kept else None)
        except Exception as err:
            conn.send(("error", spec.label, one_line(err)))
            continue
        conn.send(("done", spec.label, record))


class Worker:
    """One worker process and the parent's end of its pipe."""

    def __init__(self, context: Any, source: Any, store: Any, device: str) -> None:
        self.conn, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_worker_main,
            args=(child, os.getpid(), source, store, device),
            daemon=True,
        )
        # Should the parent be interrupted mid-start all the same (SIGTERM taken by another
        # thread), the unregistered child ends itself with the parent (_die_with_parent).
        with interrupt.starting_child():
            self.process.start()
            interrupt.register_child(self.process.pid)
        child.close()  # so the parent sees EOF when the worker dies
        self.ready = False
        self.task: Any = None  # the RunSpec in flight, if any

    def send(self, spec: Any) -> bool:
        """Start ``spec`` on this worker; False if the worker is gone (nothing was started)."""
        try:
            self.conn.send(spec)
        except (OSError, ValueError):
            self.ready = False
            return False
        self.task = spec
        return True

    def receive(self) -> tuple[Any, ...] | None:
        """The next message, or ``None`` if the worker has died (its pipe is closed)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def exitcode(self) -> int | None:
        """The process's exit code once it has ended (waits briefly for a dead one)."""
        self.process.join(0.5)
        return self.process.exitcode

    def stop(self, *, gracefully: bool) -> None:
        """End the process: ask it to exit (``gracefully``) or SIGKILL it; then reap it."""
        if gracefully and self.process.is_alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(None)
            self.process.join(_JOIN_S)
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        interrupt.unregister_child(self.process.pid)
        self.conn.close()


def start_workers(count: int, source: Any, store: Any, device: str) -> list[Worker]:
    """Spawn ``count`` workers (they load the data in the background)."""
    context = mp.get_context("spawn")
    workers: list[Worker] = []
    try:
        for _ in range(count):
            workers.append(Worker(context, source, store, device))
        tracker = _tracker_pid()
        if tracker is not None:
            interrupt.register_child(tracker)
    except BaseException:
        stop_workers(workers, gracefully=False)
        raise
    return workers


def stop_workers(workers: list[Worker], *, gracefully: bool) -> None:
    """Stop every worker: all are killed first (no waiting one by one), then reaped; then the
    helper process that ``spawn`` starts (multiprocessing's resource tracker) is ended too, so
    nothing this pool started outlives it. A graceful stop cut short by a signal kills the
    workers it had not stopped yet, then lets the signal's exception go on."""
    if not gracefully:
        running = [w for w in workers if w.process.pid is not None and w.process.exitcode is None]
        interrupt.kill_now(w.process.pid for w in running)  # never a reaped pid, perhaps reused
    stopped = 0
    try:
        for worker in workers:
            worker.stop(gracefully=gracefully)
            stopped += 1
    except BaseException:
        # A signal (KeyboardInterrupt) in the middle of a graceful stop: the workers not yet
        # stopped must not be left to find the pipe closed as the parent exits; kill them now.
        if gracefully:
            stop_workers(workers[stopped:], gracefully=False)
        raise
    _stop_resource_tracker()


def _tracker() -> Any:
    from multiprocessing import resource_tracker

    return getattr(resource_tracker, "_resource_tracker", None)


def _tracker_pid() -> int | None:
    """The pid of multiprocessing's resource tracker, if it runs (``spawn`` starts it)."""
    pid = getattr(_tracker(), "_pid", None)
    return pid if isinstance(pid, int) else None


def _stop_resource_tracker() -> None:
    """End multiprocessing's resource tracker (it restarts on demand); a no-op where the
    private hook is missing."""
    pid = _tracker_pid()
    stop = getattr(_tracker(), "_stop", None)
    if stop is not None:
        with contextlib.suppress(Exception):
            stop()
    if pid is not None:
        interrupt.unregister_child(pid)
