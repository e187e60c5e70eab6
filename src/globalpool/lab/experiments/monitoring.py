"""``compare --monitor``: the head's pooled-feature statistics at the end of every epoch.

At the end of each epoch (every ``ceil(full training size / batch size)`` optimiser steps, the
unit ``--epochs`` counts) the model, in eval mode and under ``torch.no_grad``, pools one fixed
batch: the first :data:`MONITOR_SAMPLES` samples of the test set, the same inputs for every head,
seed and training-set size, so the curves of a plot compare like with like. The statistics are
those of :func:`globalpool.monitor` over the pooling modules under ``model.head`` (none for the
``fc`` head: its epochs have empty ``modules``). A fixed evaluation batch rather than the last
training batch: training batches differ per step and seed, and batch norm would use batch
statistics there. The monitoring forward uses no random numbers and changes no weight or
running statistic, so the training is the same as without it; its time is left out of
``train_time_s``.

Stored in each run's record as::

    "monitor": {"samples": 256, "source": "test", "include": "head",
                "epochs": [{"epoch": 1, "step": 40, "modules": {"head.pool": {...}}}, ...]}

>>> import torch
>>> from globalpool.lab.models import build_model
>>> net = build_model("cnn1d", "gem", 10, in_channels=1, spatial_size=(40,))
>>> mon = EpochMonitor(net, torch.randn(300, 1, 40), torch.device("cpu"))
>>> mon.record(epoch=1, step=40)
>>> entry = mon.result()["epochs"][0]
>>> list(entry["modules"]), entry["modules"]["head.pool"]["values"]
(['head.pool'], 6400)
>>> head_summary(entry["modules"])["channels"]
25
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

import globalpool as gp

#: Samples of the test set the statistics are taken on.
MONITOR_SAMPLES = 256


def _has_pools(model: nn.Module) -> bool:
    """Whether :func:`globalpool.monitor` finds a pooling module under ``model.head`` (it
    refuses a model without one; building the monitor installs no hook)."""
    model.get_submodule("head")  # a model without a head is a mistake, not "no pools"
    try:
        gp.monitor(model, include="head")
    except ValueError:
        return False
    return True


class EpochMonitor:
    """Collects one :func:`globalpool.monitor` record of ``model.head`` per :meth:`record`."""

    def __init__(self, model: nn.Module, x_test: torch.Tensor, device: torch.device) -> None:
        self.model = model
        self.x = x_test[:MONITOR_SAMPLES].to(device)
        self.has_pools = _has_pools(model)
        self.epochs: list[dict[str, Any]] = []

    @torch.no_grad()
    def record(self, epoch: int, step: int) -> None:
        """Pool the fixed batch once (eval mode) and keep the statistics of ``epoch``."""
        modules: dict[str, Any] = {}
        if self.has_pools:
            was_training = self.model.training
            self.model.eval()
            try:
                with gp.monitor(self.model, include="head") as stats:
                    self.model(self.x)
            finally:
                self.model.train(was_training)
            modules = stats.as_dict()
        self.epochs.append({"epoch": epoch, "step": step, "modules": modules})

    def result(self) -> dict[str, Any]:
        """The record's ``monitor`` entry."""
        return {
            "samples": len(self.x),
            "source": "test",
            "include": "head",
            "epochs": self.epochs,
        }


def head_summary(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One epoch's statistics of all the head's pools together: ``dead_fraction`` (dead channels
    over channels of every pool), ``std`` and ``mean`` over all their pooled values, and the
    counts; ``None`` values where nothing was recorded.

    >>> head_summary({"a": {"values": 2, "mean": 1.0, "std": 0.0, "channels": 2,
    ...                     "dead_channels": 1},
    ...               "b": {"values": 2, "mean": 3.0, "std": 0.0, "channels": 2,
    ...                     "dead_channels": 0}})
    {'values': 4, 'mean': 2.0, 'std': 1.0, 'channels': 4, 'dead_channels': 1, 'dead_fraction': 0.25}
    """
    n, mean, m2 = 0, 0.0, 0.0
    channels, dead = 0, 0
    for rec in modules.values():
        k = int(rec.get("values") or 0)
        if k and rec.get("mean") is not None:
            total = n + k
            delta = rec["mean"] - mean
            m2 += rec["std"] ** 2 * k + delta * delta * n * k / total
            mean += delta * k / total
            n = total
        if rec.get("dead_channels") is not None and rec.get("channels"):
            channels += rec["channels"]
            dead += rec["dead_channels"]
    return {
        "values": n,
        "mean": mean if n else None,
        "std": math.sqrt(m2 / n) if n else None,
        "channels": channels,
        "dead_channels": dead,
        "dead_fraction": dead / channels if channels else None,
    }
