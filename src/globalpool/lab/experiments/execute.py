"""Run a plan of :class:`RunSpec` s: skip finished ones, save each as it ends, show progress.

Runs are independent, so on a multi-core CPU they go to worker processes
(:mod:`globalpool.lab.experiments.pool`), each loading the dataset once; small models train far
faster that way than with one process using several threads per tiny operation. Under
``torchrun`` (or with ``workers=1``) runs go one after another in this process, data-parallel
across the ranks. Every run trains on the thread count of its :class:`RunEnv` whichever process
runs it, so where it runs does not change its numbers. Every finished run is written at once,
so an error or Ctrl-C loses at most the runs in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from multiprocessing.connection import wait
from typing import Any

import torch
from torch import nn

from globalpool.lab.data import Dataset, load_dataset
from globalpool.lab.experiments.distributed import DistContext
from globalpool.lab.experiments.pool import Worker, one_line, start_workers, stop_workers
from globalpool.lab.experiments.results import ResultStore
from globalpool.lab.experiments.runner import run_one
from globalpool.lab.experiments.spec import RunSpec


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
    """What a plan reports to; :class:`globalpool.lab.experiments.command` shows it with rich."""

    def start(self, label: str, steps: int) -> None: ...
    def update(self, label: str, done: int, steps: int) -> None: ...
    def finish(self, label: str, record: dict[str, Any]) -> None: ...


def on_device(data: Dataset, device: torch.device) -> Dataset:
    """``data`` with every tensor moved to ``device`` (``data`` itself on the CPU).

    >>> from globalpool.lab.data import Dataset
    >>> x = torch.zeros(2, 1, 4); y = torch.tensor([0, 1])
    >>> toy = Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
    >>> on_device(toy, torch.device("cpu")) is toy
    True
    """
    if device.type == "cpu":
        return data
    extra = {k: (x.to(device), y.to(device)) for k, (x, y) in data.extra_tests.items()}
    return dataclasses.replace(
        data,
        x_train=data.x_train.to(device),
        y_train=data.y_train.to(device),
        x_test=data.x_test.to(device),
        y_test=data.y_test.to(device),
        extra_tests=extra,
    )


def run_sequential(
    pending: Sequence[RunSpec],
    data: Dataset,
    *,
    store: ResultStore,
    device: torch.device,
    ctx: DistContext,
    sink: ProgressSink,
) -> None:
    """Run ``pending`` in this process (all ranks together under ``torchrun``). On a GPU the
    dataset is copied to it once, for every run, rather than once per run."""
    if pending:
        data = on_device(data, device)
    for spec in pending:
        sink.start(spec.label, 0)

        def report(done: int, steps: int, label: str = spec.label) -> None:
            sink.update(label, done, steps)

        kept: list[nn.Module] = []
        keep = kept.append if store.save_models and ctx.is_main else None
        try:
            record = run_one(spec, data, device=device, ctx=ctx, progress=report, on_model=keep)
        except Exception as err:
            raise RunError(f"run {spec.label} failed: {one_line(err)}") from err
        if ctx.is_main:
            store.save(spec, record, model=kept[0] if kept else None)
        sink.finish(spec.label, record)


# --- worker processes -------------------------------------------------------------------------


def run_parallel(
    pending: Sequence[RunSpec],
    source: DataSource,
    *,
    store: ResultStore,
    device: torch.device,
    workers: int,
    sink: ProgressSink,
) -> None:
    """Run ``pending`` on ``workers`` worker processes, each run saved by its worker as it ends.

    On a failure, runs already in flight finish and are saved; runs not yet started are dropped,
    then :class:`RunError` is raised. On any other exception (a Ctrl-C's
    :class:`KeyboardInterrupt`) every worker is killed at once and the runs in flight are lost.
    """
    queue = collections.deque(pending)
    failure: RunError | None = None
    pool = start_workers(workers, source, store, str(device))
    alive: list[Worker] = list(pool)
    finished = False
    try:
        while alive and (queue or any(w.task is not None for w in alive)):
            if failure is None:
                for worker in alive:
                    if worker.ready and worker.task is None and queue:
                        spec = queue.popleft()
                        if not worker.send(spec):  # died meanwhile: its EOF comes next
                            queue.appendleft(spec)
                            continue
                        sink.start(spec.label, 0)
            by_conn = {w.conn: w for w in alive}
            for conn in wait(list(by_conn), timeout=0.5):
                worker = by_conn[conn]
                message = worker.receive()
                if message is None:
                    alive.remove(worker)
                    reason = f"its worker process died (exit code {worker.exitcode()})"
                    if worker.task is not None and failure is None:
                        failure = RunError(f"run {worker.task.label} failed: {reason}")
                    continue
                err = _handle(message, worker, sink)
                failure = failure or err
            if failure is not None:
                queue.clear()
        if queue and failure is None:
            failure = RunError(f"every worker process died; {len(queue)} runs not started")
        finished = True
    finally:
        in_flight = [w.task for w in pool if w.task is not None]
        stop_workers(pool, gracefully=finished)
        for spec in in_flight:  # killed, perhaps while writing its record
            store.discard_partial(spec)
    if failure is not None:
        raise failure


def _handle(message: tuple[Any, ...], worker: Worker, sink: ProgressSink) -> RunError | None:
    """Act on one worker message; a failure comes back as the :class:`RunError` to raise."""
    kind = message[0]
    if kind == "ready":
        worker.ready = True
    elif kind == "progress":
        _, label, done, steps = message
        sink.update(label, done, steps)
    elif kind == "done":
        _, label, record = message
        worker.task = None
        sink.finish(label, record)
    elif kind == "error":
        _, label, text = message
        worker.task = None
        return RunError(f"run {label} failed: {text}")
    elif kind == "fatal":
        return RunError(f"a worker process could not start: {message[1]}")
    return None
