"""How a run is produced, beyond its settings: everything here can change its numbers.

A run's result depends on more than its seed and training settings: the number of torch threads
doing the math (a parallel reduction sums in another order), the number of data-parallel
processes (``torchrun``: each rank's batch-norm statistics see only its share of the batch), the
device and its kernels (CPU vector width, GPU model), the torch and globalpool versions and the
exact dataset. :class:`RunEnv` holds all of these; it is part of the run's cache key, so runs
made differently are kept apart instead of being reused for each other.

>>> env = RunEnv(threads=1, world_size=1, device="cpu", hardware="AVX2", torch="2.4",
...              globalpool="0.1.0", data="0123456789ab")
>>> env.describe()
'cpu (AVX2), 1 process, 1 torch thread, torch 2.4, globalpool 0.1.0, data 0123456789ab'
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: the CLI's start-up does not pay for it
    import torch


@dataclasses.dataclass(frozen=True)
class RunEnv:
    """Threads, processes, device, versions and dataset digest of a run (see module docstring)."""

    threads: int
    world_size: int
    device: str
    hardware: str
    torch: str
    globalpool: str
    data: str

    def describe(self) -> str:
        """One human-readable line."""
        procs = "process" if self.world_size == 1 else "processes"
        threads = "thread" if self.threads == 1 else "threads"
        return (
            f"{self.device} ({self.hardware}), {self.world_size} {procs}, {self.threads} torch "
            f"{threads}, torch {self.torch}, globalpool {self.globalpool}, data {self.data}"
        )


def hardware_name(device: torch.device) -> str:
    """The GPU's name on CUDA; on CPU the vector instruction set torch's kernels use.

    >>> import torch
    >>> isinstance(hardware_name(torch.device("cpu")), str)
    True
    """
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - old torch
        return "unknown"


def data_digest(data: Any) -> str:
    """Short hash of every tensor of a :class:`~globalpool.lab.data.Dataset` (shapes and bytes).

    >>> import torch
    >>> from globalpool.lab.data import Dataset
    >>> x = torch.zeros(4, 1, 8); y = torch.tensor([0, 1, 0, 1])
    >>> a = Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
    >>> b = Dataset("toy", x + 1, y, x, y, num_classes=2, spatial_rank=1)
    >>> len(data_digest(a)), data_digest(a) == data_digest(b)
    (12, False)
    """
    h = hashlib.sha256()
    sets = {"train": (data.x_train, data.y_train), **data.test_sets()}
    for name, (x, y) in sets.items():
        for t in (x, y):
            _feed(h, name, t)
    return h.hexdigest()[:12]


def weights_digest(model: Any) -> str:
    """Short hash of a model's trained state (every parameter and buffer, by name, bit for bit):
    two runs reproduce each other exactly iff their digests match.

    >>> from torch import nn
    >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    >>> b.load_state_dict(a.state_dict())
    <All keys matched successfully>
    >>> weights_digest(a) == weights_digest(b)
    True
    """
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        _feed(h, name, t)
    return h.hexdigest()[:16]


def _feed(h: Any, name: str, t: Any) -> None:
    """Add a tensor's name, dtype, shape and raw bytes to hash ``h``."""
    import torch

    t = t.detach().cpu().contiguous()
    h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
    h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def current_env(device: torch.device, threads: int, world_size: int, data: Any) -> RunEnv:
    """The :class:`RunEnv` of runs made here with ``threads`` threads and ``world_size`` ranks."""
    import torch

    from globalpool import __version__

    return RunEnv(
        threads=int(threads),
        world_size=int(world_size),
        device=device.type,
        hardware=hardware_name(device),
        torch=torch.__version__,
        globalpool=__version__,
        data=data_digest(data),
    )
