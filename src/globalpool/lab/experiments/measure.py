"""Peak memory of training, measured the same way for every head.

- CPU: tensor accounting, the tensor analogue of ``tracemalloc``. One training step (the second,
  when the optimiser state exists) runs under :class:`TensorPeak`, a dispatch mode that sees
  every tensor storage the step creates (batch, activations, gradients, optimiser temporaries)
  and when each is freed; the peak of those live bytes plus the bytes of the persistent state
  (parameters, buffers, optimiser state) is the reported peak. It is exact and free of
  allocator and page-cache noise, so a 300-parameter head and a 35k-parameter head really differ.
  Memory the framework keeps outside tensors (the allocator's cache, the Python heap) is not in
  it, and the dataset itself is not counted.
- CUDA: ``torch.cuda.max_memory_allocated`` over the whole training loop minus what was
  allocated before the model was built (the dataset), i.e. model, optimiser, activations and
  temporaries at their peak.

>>> import torch
>>> with TensorPeak() as peak:
...     y = torch.ones(1000) * 2  # two 4000-byte tensors alive at once
>>> peak.peak
8000
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary


class TensorPeak(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the ``with`` block and still alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage in self._seen:
                    continue
                nbytes = storage.nbytes()
                self._seen[storage] = nbytes
                weakref.finalize(storage, self._free, nbytes)
                self.live += nbytes
                self.peak = max(self.peak, self.live)
        return out


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> int:
    """Bytes of the distinct storages of parameters, buffers, gradients and optimiser state.

    >>> state_bytes(nn.Linear(10, 10))  # 110 float32 values
    440
    """
    storages: dict[int, int] = {}

    def add(t: Any) -> None:
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
        add(t.grad)
    if optimizer is not None:
        for state in optimizer.state.values():
            for t in state.values():
                add(t)
    return sum(storages.values())


class CudaPeak:
    """``start()`` before the model is built, ``stop() -> bytes`` after training (CUDA only)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._base = 0

    def start(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def stop(self) -> int:
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - self._base)


def memory_method(device: torch.device) -> str:
    """The name recorded with each measurement."""
    return "cuda-max-allocated" if device.type == "cuda" else "tensor-peak-cpu"
