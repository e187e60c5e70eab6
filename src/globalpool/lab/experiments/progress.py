"""Rich progress bars for ``compare``: one overall bar, one bar per run in flight."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from globalpool.lab.experiments.execute import ProgressSink


class RichSink(ProgressSink):
    """Shows progress on stderr (rank 0 only); finished runs leave one line with their accuracy."""

    def __init__(
        self,
        total_runs: int,
        done_runs: int,
        *,
        enabled: bool = True,
        title: str = "runs",
        metric: str = "test acc",
    ) -> None:
        self.metric = metric
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            disable=not enabled,
        )
        self.enabled = enabled
        self.overall = self.progress.add_task(title, total=total_runs, completed=done_runs)
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichSink:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def note(self, text: str) -> None:
        if self.enabled:
            self.progress.console.print(text)

    def start(self, label: str, steps: int) -> None:
        if label not in self.tasks:
            self.tasks[label] = self.progress.add_task(f"  {label}", total=steps or None)

    def update(self, label: str, done: int, steps: int) -> None:
        self.start(label, steps)
        self.progress.update(self.tasks[label], completed=done, total=steps)

    def finish(self, label: str, record: dict[str, Any]) -> None:
        task = self.tasks.pop(label, None)
        if task is not None:
            self.progress.remove_task(task)
        self.progress.advance(self.overall)
        acc, seconds = 100 * record["accuracy"], record["train_time_s"]
        self.note(f"  {label}: {self.metric} {acc:.1f}% in {seconds:.1f}s")
