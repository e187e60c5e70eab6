"""Train and evaluate one run: seeded, timed, memory-measured, data-parallel under ``torchrun``.

>>> import torch
>>> from globalpool.lab.data import Dataset
>>> from globalpool.lab.experiments.spec import RunSpec, TrainConfig
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(64, 1, 40, generator=g); y = (x.mean((1, 2)) > 0).long()
>>> data = Dataset("toy", x, y, x, y, num_classes=2, spatial_rank=1)
>>> spec = RunSpec("toy", "cnn1d", "avg", 0, None, TrainConfig(1, 32, 0.01))
>>> record = train_and_evaluate(spec, data, device=torch.device("cpu"))
>>> record["steps"], record["params_head"], 0.0 <= record["accuracy"] <= 1.0
(2, 52, True)
"""

from __future__ import annotations

import datetime
import math
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from globalpool import __version__ as globalpool_version
from globalpool.lab.data import Dataset
from globalpool.lab.experiments.distributed import (
    DistContext,
    all_sum,
    shard,
    sync_buffers,
    wrap_model,
)
from globalpool.lab.experiments.measure import CudaPeak, TensorPeak, memory_method, state_bytes
from globalpool.lab.experiments.provenance import hardware_name, weights_digest
from globalpool.lab.experiments.spec import RunSpec, TrainConfig
from globalpool.lab.models import build_model, count_parameters

#: ``progress(steps_done, steps_total)``
ProgressFn = Callable[[int, int], None]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` (CUDA when present, else CPU), ``"cpu"`` or ``"cuda"``; ``ValueError`` otherwise.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    choice = str(name).strip().lower()
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA device is available")
        return torch.device("cuda")
    raise ValueError(f"--device must be one of cpu, cuda, auto; got {name!r}")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def total_steps(config: TrainConfig, full_train_size: int) -> int:
    """Optimiser steps of every run: ``epochs`` passes over the full training set.

    >>> total_steps(TrainConfig(epochs=3, batch_size=100, lr=0.1), 4000)
    120
    """
    return config.epochs * math.ceil(full_train_size / config.batch_size)


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum (Nesterov), with ``config``'s learning rate and weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.momentum > 0,
            weight_decay=config.weight_decay,
        )
    # The fused (single-kernel) Adam update is the same algorithm with far less per-tensor
    # overhead, which matters for small models; it needs floating-point CPU or CUDA parameters.
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(
        params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None
    )


def lr_factor(schedule: str, step: int, steps: int, warmup: int = 0) -> float:
    """Multiplier of the base learning rate at ``step`` of ``steps`` (cosine and linear decay
    to 0), times a linear warm-up ``(step + 1) / warmup`` over the first ``warmup`` steps
    (with ``"linear"``, a triangle).

    >>> lr_factor("cosine", 0, 10), lr_factor("cosine", 10, 10), lr_factor("constant", 5, 10)
    (1.0, 0.0, 1.0)
    >>> lr_factor("linear", 5, 10), lr_factor("linear", 1, 10, warmup=4)
    (0.5, 0.45)
    >>> lr_factor("constant", 0, 10, warmup=4), lr_factor("constant", 3, 10, warmup=4)
    (0.25, 1.0)
    """
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        return ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / max(steps, 1)))
    if schedule == "linear":
        return ramp * (1.0 - min(step, steps) / max(steps, 1))
    return ramp


def training_loss(logits: torch.Tensor, labels: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Cross-entropy of ``logits`` (in float32) with ``config.label_smoothing``.

    >>> cfg = TrainConfig(1, 1, 0.1, label_smoothing=0.2)
    >>> round(float(training_loss(torch.zeros(1, 4), torch.tensor([0]), cfg)), 4)  # ln 4
    1.3863
    """
    return F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translation (zero padding) and left-right flip of ``(N, C, H, W)``.

    >>> x = torch.arange(16.0).reshape(1, 1, 4, 4)
    >>> crop_flip(x, torch.Generator().manual_seed(0)).shape
    torch.Size([1, 1, 4, 4])
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = dx + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = (dy + torch.arange(h)).to(x.device)
    cols = cols.to(x.device)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_context(config: TrainConfig, device: torch.device) -> Any:
    """The autocast context of ``config.precision`` on ``device`` (a no-op for ``"fp32"``).

    >>> with precision_context(TrainConfig(1, 1, 0.1, precision="bf16"), torch.device("cpu")):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    """
    enabled = config.precision == "bf16"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def to_layout(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """``x`` channels-last when ``config.channels_last`` and ``x`` is a batch of 2d images."""
    if config.channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


@torch.no_grad()
def count_correct(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    batch_size: int,
    config: TrainConfig | None = None,
) -> int:
    """Number of samples of ``(x, y)`` that ``model`` classifies right (``model`` in eval mode),
    at ``config``'s precision and memory layout when given, with its flip test-time
    augmentation when ``config.flip_tta``."""
    correct = 0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size].to(device, non_blocking=True)
        yb = y[start : start + batch_size].to(device, non_blocking=True)
        if config is None:
            logits = model(xb)
        else:
            with precision_context(config, device):
                logits = model(to_layout(xb, config))
                if config.flip_tta:  # the image's and its mirror image's logits, summed
                    logits = logits.float() + model(to_layout(xb.flip(-1), config)).float()
        correct += int((logits.argmax(1) == yb).sum())
    return correct


def _warm_up(model: nn.Module, x: torch.Tensor) -> None:
    """One forward/backward in eval mode, so one-off library set-up is not billed to the run.

    Eval mode leaves batch-norm statistics alone, ``fork_rng`` leaves the generators alone and
    the gradients are dropped again: the run starts from exactly the state it would otherwise.
    """
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
        model.train()


def train_and_evaluate(
    spec: RunSpec,
    data: Dataset,
    *,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: ProgressFn | None = None,
    eval_batch_size: int = 1000,
    on_model: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Train ``spec.model`` with ``spec.head`` on ``data`` and return the run's record.

    The training subset (``spec.train_size``) is a stratified subset drawn with ``spec.seed``;
    the same seed sets the initial weights and the batch order. Under ``torchrun`` each global
    batch is split across the ranks. The record holds the accuracies on every test set (``None``
    where a fixed-size head cannot take that input size), the parameter counts, training wall
    time, peak memory and throughput, and what rebuilding the model needs (``num_classes``,
    ``in_channels``, ``input_shape``). ``on_model`` is called with the trained model (in eval
    mode) before the record is returned, e.g. to save its weights. With ``config.monitor`` the
    record also holds ``monitor``: the head's pooled-feature statistics at the end of every
    epoch (:mod:`globalpool.lab.experiments.monitoring`), whose time is not in ``train_time_s``.
    """
    ctx = ctx or DistContext()
    cfg = spec.config
    if cfg.augment == "crop-flip" and data.spatial_rank != 2:
        raise ValueError(f"augment='crop-flip' needs 2d images, got {data.spatial_rank}d data")
    if cfg.flip_tta and data.spatial_rank != 2:
        raise ValueError(f"flip_tta=True needs 2d images, got {data.spatial_rank}d data")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    full_size = data.train_size
    train = data if spec.train_size is None else data.subsample_train(spec.train_size, spec.seed)
    x_train = train.x_train.to(device)
    y_train = train.y_train.to(device)
    n = len(x_train)

    cuda_peak = CudaPeak(device) if device.type == "cuda" else None
    if cuda_peak is not None:
        cuda_peak.start()  # the dataset is already on the device and is not counted
    seed_everything(spec.seed)
    model = build_model(
        spec.model,
        spec.head,
        data.num_classes,
        in_channels=data.in_channels,
        spatial_size=data.input_shape[1:],
        backend=cfg.backend,
    ).to(device)
    fit_to_data = getattr(model, "fit_to_data", None)
    if fit_to_data is not None:  # data-dependent set-up before training (FastNet's whitening)
        fit_to_data(x_train)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    params_total = count_parameters(model)
    params_head = count_parameters(model.head)
    batch = min(cfg.batch_size, n)
    steps = total_steps(cfg, full_size)
    with precision_context(cfg, device):
        _warm_up(model, to_layout(x_train[: max(1, batch // ctx.world_size)], cfg))

    net = wrap_model(model, ctx, device)
    optimizer = make_optimizer(net, cfg)
    order = torch.Generator().manual_seed(spec.seed)
    every = max(1, steps // 100)
    probe = 1 if steps > 1 else 0  # the step whose tensors are accounted (CPU)
    peak: int | None = None
    loss_tail, tail_count, samples, step = torch.zeros((), device=device), 0, 0, 0

    augment = torch.Generator().manual_seed(spec.seed + 1)
    epoch_steps = math.ceil(full_size / cfg.batch_size)  # what --epochs counts
    watch = None
    if cfg.monitor:
        from globalpool.lab.experiments.monitoring import EpochMonitor

        watch = EpochMonitor(model, data.x_test, device)
    watch_time = watch_cpu = 0.0

    def train_step(idx: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        xb = x_train[idx]
        if cfg.augment == "crop-flip":
            xb = crop_flip(xb, augment, pad=cfg.crop_padding)
        with precision_context(cfg, device):
            logits = net(to_layout(xb, cfg))
        loss = training_loss(logits, y_train[idx], cfg)
        loss.backward()
        optimizer.step()
        return loss

    threads = torch.get_num_threads()  # the count the math below runs on
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    while step < steps:
        for chunk in torch.randperm(n, generator=order).split(batch):
            if step >= steps:
                break
            if len(chunk) < ctx.world_size:
                continue
            idx = chunk.tensor_split(ctx.world_size)[ctx.rank] if ctx.enabled else chunk
            idx = idx.to(device)
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.schedule, step, steps, cfg.warmup)
            if step == probe and cuda_peak is None:
                optimizer.zero_grad(set_to_none=True)
                persistent = state_bytes(model, optimizer)
                with TensorPeak() as tensors:
                    loss = train_step(idx)
                peak = persistent + tensors.peak
            else:
                loss = train_step(idx)
            samples += len(chunk)
            step += 1
            if watch is not None and step % epoch_steps == 0:
                _sync(device)
                w0, wc0 = time.perf_counter(), time.process_time()
                watch.record(step // epoch_steps, step)
                _sync(device)
                watch_time += time.perf_counter() - w0
                watch_cpu += time.process_time() - wc0
            if step > 0.9 * steps:
                loss_tail += loss.detach()
                tail_count += 1
            if progress is not None and (step % every == 0 or step == steps):
                progress(step, steps)
    _sync(device)
    train_time = time.perf_counter() - t0 - watch_time
    train_cpu = time.process_time() - c0 - watch_cpu
    if cuda_peak is not None:
        peak = cuda_peak.stop()

    model.eval()
    sync_buffers(model, ctx)
    expected = tuple(data.input_shape[1:])
    fixed = bool(getattr(model, "fixed_input_size", False))
    accuracies: dict[str, float | None] = {}
    eval_time = 0.0
    for name, (x, y) in data.test_sets().items():
        if fixed and tuple(x.shape[2:]) != expected:
            accuracies[name] = None  # a flatten-FC head only takes its training size
            continue
        xs, ys = shard(x, ctx), shard(y, ctx)
        _sync(device)
        t1 = time.perf_counter()
        correct = count_correct(model, xs, ys, device, eval_batch_size, cfg)
        _sync(device)
        if name == "test":
            eval_time = time.perf_counter() - t1
        correct, count = all_sum([float(correct), float(len(xs))], ctx, device)
        accuracies[name] = correct / count
    if on_model is not None:
        on_model(model)

    extra = {} if watch is None else {"monitor": watch.result()}
    return {
        **extra,
        "label": spec.label,
        "spec": spec.to_dict(),
        "fingerprint": spec.fingerprint,
        "accuracy": accuracies["test"],
        "accuracies": accuracies,
        "params_total": params_total,
        "params_head": params_head,
        "num_classes": data.num_classes,
        "in_channels": data.in_channels,
        "input_shape": list(data.input_shape[1:]),
        "train_size": n,
        "steps": step,
        "samples_seen": samples,
        "final_train_loss": float(loss_tail) / tail_count if tail_count else None,
        "weights_digest": weights_digest(model),
        "train_time_s": train_time,
        "train_cpu_time_s": train_cpu,
        "train_throughput": samples / train_time if train_time > 0 else None,
        "eval_time_s": eval_time,
        "eval_throughput": len(data.x_test) / eval_time if eval_time > 0 else None,
        "peak_memory_bytes": peak,
        "memory_method": memory_method(device),
        "device": str(device),
        "hardware": hardware_name(device),
        "world_size": ctx.world_size,
        "threads": threads,
        "torch": torch.__version__,
        "globalpool": globalpool_version,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_one(
    spec: RunSpec,
    data: Dataset,
    *,
    device: torch.device,
    ctx: DistContext | None = None,
    progress: ProgressFn | None = None,
    on_model: Callable[[nn.Module], None] | None = None,
) -> dict[str, Any]:
    """:func:`train_and_evaluate` on ``spec.env.threads`` torch threads (restored afterwards)."""
    ctx = ctx or DistContext()
    if spec.env is not None and spec.env.world_size != ctx.world_size:
        raise ValueError(f"run made for {spec.env.world_size} processes, not {ctx.world_size}")
    before = torch.get_num_threads()
    if spec.env is not None:
        torch.set_num_threads(spec.env.threads)
    try:
        return train_and_evaluate(
            spec, data, device=device, ctx=ctx, progress=progress, on_model=on_model
        )
    finally:
        torch.set_num_threads(before)
