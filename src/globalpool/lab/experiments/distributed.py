"""Data parallelism under ``torchrun``: process-group set-up, sharding and the few collectives.

Launched by ``torchrun --nproc_per_node=K`` (which sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
``compare`` trains every run with :class:`~torch.nn.parallel.DistributedDataParallel`: each
global batch is split across the K processes (gloo on CPU, NCCL on CUDA) and the gradients are
averaged, so a run sees the same batches and the same number of steps as with one process. Rank 0
alone writes results. Without ``torchrun`` everything here is a no-op.

>>> ctx = DistContext()
>>> ctx.enabled, ctx.is_main, shard(list(range(5)), ctx)
(False, True, [0, 1, 2, 3, 4])
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job; the default is a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files and prints results."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment describes a multi-process job (``WORLD_SIZE`` > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def is_main_process() -> bool:
    """True unless ``torchrun`` started this process as a rank above 0; readable before the
    process group exists (errors and interruptions are reported by rank 0 alone)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_distributed(device_type: str) -> DistContext:
    """Join the process group if launched by ``torchrun``; else return the single-process context.

    The backend is NCCL for ``device_type == "cuda"`` and gloo otherwise.
    """
    if not launched_by_torchrun():
        return DistContext()
    import torch.distributed as dist

    backend = "nccl" if device_type == "cuda" else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, backend)


def shutdown(ctx: DistContext) -> None:
    """Leave the process group (if any)."""
    if ctx.enabled:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def shard(items: Any, ctx: DistContext) -> Any:
    """This rank's share of ``items`` (every ``world_size``-th element from ``rank``)."""
    return items[ctx.rank :: ctx.world_size] if ctx.enabled else items


def barrier(ctx: DistContext) -> None:
    """Wait for every rank."""
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank (picklable objects only)."""
    if not ctx.enabled:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(message: str | None, ctx: DistContext) -> str | None:
    """The first non-``None`` message over all ranks (rank order), on every rank."""
    if not ctx.enabled:
        return message
    import torch.distributed as dist

    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, message)
    return next((m for m in gathered if m is not None), None)


def all_sum(values: list[float], ctx: DistContext, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all ranks."""
    if not ctx.enabled:
        return list(values)
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device) -> nn.Module:
    """``model`` wrapped in DDP when distributed, else unchanged."""
    if not ctx.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def sync_buffers(model: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (batch-norm statistics) to every rank before evaluation."""
    if not ctx.enabled:
        return
    import torch.distributed as dist

    for buf in model.buffers():
        dist.broadcast(buf, src=0)
