"""Run a plan of :class:`RunSpec` s: skip finished ones, save each as it ends, show progress.

Runs are independent, so on a multi-core CPU they go to a pool of single-threaded worker
processes (``workers``), each loading the dataset once; small models train far faster that
way than with one process using several threads per tiny operation. Under ``torchrun`` (or with
``workers=1``) runs go one after another in this process, data-parallel across the ranks.
Every finished run is written at once, so an error or Ctrl-C loses at most the runs in flight.
"""

from __future__ import annotations

import ctypes
import dataclasses
import multiprocessing as mp
import os
import queue as queue_module
import signal
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

from globalpool.data import Dataset, load_dataset
from globalpool.experiments.distributed import DistContext
from globalpool.experiments.results import ResultStore
from globalpool.experiments.runner import train_and_evaluate
from globalpool.experiments.spec import RunSpec


class RunError(RuntimeError):
    """A training run raised; the message names the run and the cause on one line."""


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class DataSource:
    """How to (re)load the dataset in another process."""

    spec: str
    data_dir: str | None = None

    def load(self) -> Dataset:
        return load_dataset(self.spec, data_dir=self.data_dir, download=self.data_dir is None)


class ProgressSink:
    """What a plan reports to; :class:`globalpool.experiments.command` shows it with rich."""

    def start(self, label: str, steps: int) -> None: ...
    def update(self, label: str, done: int, steps: int) -> None: ...
    def finish(self, label: str, record: dict[str, Any]) -> None: ...


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


def run_sequential(
    pending: Sequence[RunSpec],
    data: Dataset,
    *,
    store: ResultStore,
    device: torch.device,
    ctx: DistContext,
    sink: ProgressSink,
) -> None:
    """Run ``pending`` in this process (all ranks together under ``torchrun``)."""
    for spec in pending:
        sink.start(spec.label, 0)

        def report(done: int, steps: int, label: str = spec.label) -> None:
            sink.update(label, done, steps)

        try:
            record = train_and_evaluate(spec, data, device=device, ctx=ctx, progress=report)
        except Exception as err:
            raise RunError(f"run {spec.label} failed: {_one_line(err)}") from err
        if ctx.is_main:
            store.save(spec, record)
        sink.finish(spec.label, record)


# --- worker processes -------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _die_with_parent() -> None:
    """On Linux, have the kernel end this worker when the parent ``compare`` dies (even killed),
    so no orphaned training process keeps the cores busy."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _init_worker(source: DataSource, threads: int, events: Any) -> None:
    _die_with_parent()
    torch.set_num_threads(threads)
    _WORKER["data"] = source.load()
    _WORKER["events"] = events


def _run_in_worker(spec: RunSpec, device: str) -> dict[str, Any]:
    events = _WORKER["events"]
    events.put((spec.label, 0, 0))

    def report(done: int, steps: int) -> None:
        events.put((spec.label, done, steps))

    return train_and_evaluate(spec, _WORKER["data"], device=torch.device(device), progress=report)


def run_parallel(
    pending: Sequence[RunSpec],
    source: DataSource,
    *,
    store: ResultStore,
    device: torch.device,
    workers: int,
    threads: int,
    sink: ProgressSink,
    poll: Callable[[], None] | None = None,
) -> None:
    """Run ``pending`` on ``workers`` spawned processes with ``threads`` torch threads each.

    On a failure, runs already in flight finish and are saved; runs not yet started are dropped,
    then :class:`RunError` is raised.
    """
    context = mp.get_context("spawn")
    events = context.Queue()
    started: set[str] = set()
    failure: RunError | None = None

    def drain() -> None:
        while True:
            try:
                label, done, steps = events.get_nowait()
            except queue_module.Empty:
                return
            if label not in started:
                started.add(label)
                sink.start(label, steps)
            if steps:
                sink.update(label, done, steps)

    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(source, threads, events),
    ) as pool:
        futures: dict[Future, RunSpec] = {
            pool.submit(_run_in_worker, spec, str(device)): spec for spec in pending
        }
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=0.1, return_when=FIRST_COMPLETED)
            drain()
            if poll is not None:
                poll()
            for future in done:
                spec = futures[future]
                if future.cancelled():
                    continue
                err = future.exception()
                if err is not None:
                    if failure is None:
                        failure = RunError(f"run {spec.label} failed: {_one_line(err)}")
                        for other in remaining:
                            other.cancel()
                    continue
                record = future.result()
                store.save(spec, record)
                if spec.label not in started:
                    started.add(spec.label)
                    sink.start(spec.label, record["steps"])
                sink.finish(spec.label, record)
    events.close()
    if failure is not None:
        raise failure
