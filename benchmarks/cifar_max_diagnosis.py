"""Why do the max-pooling heads of the ``cifar-cpu`` recipe get stuck at chance on some seeds?

One run of the ``cifar-cpu`` recipe (ResNet-18 at quarter width, SGD nesterov 0.9, lr 0.1
cosine to 0 over 8 epochs = 3,128 steps, wd 5e-4, batch 128, crop+flip, backbone under bfloat16
autocast, head in float32, channels-last, pooling backend ``torch``), re-implemented step for
step as ``globalpool.experiments.runner.train_and_evaluate`` does it (same seeding order, same
warm-up pass, same batch-order and augmentation generators), with ONE setting changed at a time
and per-step diagnostics:

- the training loss of every step;
- every ``--every`` steps up to ``--detail-until`` (then every ``--every-late``): the gradient
  norms of the classifier weight and bias, of the pooled features (dL/d pooled, ``N x C``), of
  the backbone's output feature map (dL/d features, ``N x C x 4 x 4``), of the last backbone
  block's parameters and of the whole backbone; the dead-channel fraction of the pooled
  features from ``gp.monitor`` (a channel is dead when its pooled value is not > 0 for any
  sample of the batch) and, computed directly, the fraction of (sample, channel) pooled values
  that are exactly 0, the mean pooled value, the std of the logits across the batch.

``--stop-after K`` stops after K steps while the lr schedule still spans the full 3,128 steps
(so the first K steps are exactly those of the full run). Test accuracy (10,000 images, eval
mode, the recipe's precision) is measured wherever the run stops. The record (JSON) goes to
``--out``.

Variants (each off its default is "one change"):

  --precision fp32          backbone in float32 instead of bfloat16 autocast
  --lr 0.05                 base learning rate
  --warmup-steps 391        linear warm-up from 0 over the first steps, then the same cosine
  --head-init zero|small    classifier weight (and bias) zero, or the default init x 0.1
  --pre-pool bn|noact       BatchNorm2d after the last ReLU / drop the last block's final ReLU
  --backend fused           the head's pool on globalpool's fused kernel instead of torch
  --head-lr-mult 0.1        the head's parameters at a fraction of the lr

Run from the repository root::

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 15 python benchmarks/cifar_max_diagnosis.py \
        --head max --seed 4 --stop-after 500 --out docs/results/cifar10-diagnosis/x.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

import globalpool as gp
from globalpool.lab.data import load_dataset
from globalpool.lab.experiments.provenance import weights_digest
from globalpool.lab.experiments.runner import (
    _warm_up,
    count_correct,
    crop_flip,
    lr_factor,
    precision_context,
    seed_everything,
    to_layout,
)
from globalpool.lab.models import build_model

DATA = "folder:/work/shared/data/cifar10-jpeg.tar.gz"


def _norm(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t.detach().float().norm())


def _group_norm(params) -> float:
    sq = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    return float(torch.stack(sq).sum().sqrt()) if sq else 0.0


def _final_block_without_relu(block: nn.Module) -> None:
    """The last BasicBlock returns ``bn2(conv2(.)) + shortcut`` (no final ReLU)."""

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return y + self.shortcut(x)

    block.forward = types.MethodType(forward, block)


def build(args, data) -> nn.Module:
    model = build_model(
        "resnet18-w16",
        args.head,
        data.num_classes,
        in_channels=data.in_channels,
        spatial_size=data.input_shape[1:],
        backend=args.backend,
    )
    # every change below draws nothing from the global generator: the batch order and the
    # augmentation have their own generators anyway, and the initial weights stay the seed's
    if args.pre_pool == "bn":
        model.backbone.append(nn.BatchNorm2d(model.feature_shape[0]))
    elif args.pre_pool == "noact":
        _final_block_without_relu(model.backbone[-1])
    fc = model.head.fc
    with torch.no_grad():
        if args.head_init == "zero":
            fc.weight.zero_()
            fc.bias.zero_()
        elif args.head_init == "small":
            fc.weight.mul_(0.1)
            fc.bias.mul_(0.1)
    return model


def _change(cfg: dict) -> str:
    """The settings of a record off the cifar-cpu defaults."""
    defaults = {"lr": 0.1, "precision": "bf16", "backend": "torch", "warmup_steps": 0,
                "head_init": "default", "pre_pool": "relu", "head_lr_mult": 1.0}
    off = [f"{k}={cfg[k]}" for k, v in defaults.items() if cfg.get(k, v) != v]
    return ", ".join(off) or "none (recipe)"


def summarize(folder: str) -> str:
    """A markdown table of every run record in ``folder``."""
    rows = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json"):
            continue
        with open(os.path.join(folder, name)) as f:
            d = json.load(f)
        recs = {r["step"]: r for r in d["records"]}
        losses = d["loss_per_step"]

        def dead(step, recs=recs):
            r = recs.get(step)
            return "" if r is None or r["dead_fraction_monitor"] is None else (
                f"{r['dead_fraction_monitor']:.2f}")

        last = d["records"][-1]
        rows.append(
            f"| {name[:-5]} | {d['head']} | {d['seed']} | {_change(d['config'])} | "
            f"{d['steps_run']} | {recs[0]['pooled_mean']:.2f} | {recs[0]['grad_fc_weight']:.1f} | "
            f"{max(losses[:20]):.1f} | {dead(50)} | {dead(100)} | {dead(400) or dead(399)} | "
            f"{last['dead_fraction_monitor']:.2f} | "
            f"{sum(losses[-100:]) / len(losses[-100:]):.3f} | {100 * d['test_accuracy']:.1f} |"
        )
    head = (
        "| run | head | seed | change from the recipe | steps run | pooled mean, step 0 | "
        "‖∇W_fc‖, step 0 | max loss, steps 0-19 | dead @50 | dead @100 | dead @399/400 | "
        "dead @last | "
        "mean loss, last 100 steps | test acc % (where it stopped) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["summarize"]:
        print(summarize(argv[1]), end="")
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--head", default="max")
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--channels-last", type=int, choices=(0, 1), default=1)
    p.add_argument("--backend", choices=("torch", "fused", "auto"), default="torch")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--head-init", choices=("default", "zero", "small"), default="default")
    p.add_argument("--pre-pool", choices=("relu", "bn", "noact"), default="relu")
    p.add_argument("--head-lr-mult", type=float, default=1.0)
    p.add_argument("--stop-after", type=int, default=None, help="stop after K steps")
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--detail-until", type=int, default=500)
    p.add_argument("--every-late", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data", default=DATA)
    p.add_argument("--name", default=None, help="run name in the record")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    t_start = time.perf_counter()
    data = load_dataset(args.data)
    x_train, y_train = data.x_train, data.y_train
    n = len(x_train)

    seed_everything(args.seed)
    model = build(args, data)
    cl = bool(args.channels_last)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    cfg = types.SimpleNamespace(precision=args.precision, channels_last=cl)
    batch = min(args.batch_size, n)
    epoch_steps = math.ceil(n / args.batch_size)
    steps = args.epochs * epoch_steps
    stop = steps if args.stop_after is None else min(args.stop_after, steps)
    with precision_context(cfg, device):
        _warm_up(model, to_layout(x_train[:batch], cfg))

    head_params = list(model.head.parameters())
    head_ids = {id(q) for q in head_params}
    body_params = [q for q in model.parameters() if id(q) not in head_ids]
    groups = [{"params": body_params, "mult": 1.0}]
    groups.append({"params": head_params, "mult": args.head_lr_mult})
    if args.head_lr_mult == 1.0:  # the runner's single group (same update order)
        groups = [{"params": [q for q in model.parameters() if q.requires_grad], "mult": 1.0}]
    optimizer = torch.optim.SGD(
        groups,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=args.momentum > 0,
        weight_decay=args.weight_decay,
    )
    order = torch.Generator().manual_seed(args.seed)
    augment = torch.Generator().manual_seed(args.seed + 1)

    def lr_at(step: int) -> float:
        f = lr_factor("cosine", step, steps)
        if args.warmup_steps and step < args.warmup_steps:
            f *= (step + 1) / args.warmup_steps
        return args.lr * f

    # gradient taps on the pooled features and the backbone's output
    taps: dict[str, torch.Tensor] = {}
    want = {"on": False}

    def tap(name):
        def hook(grad):
            taps[name] = grad.detach().float()
        return hook

    def on_pool(module, inputs, output):
        if want["on"] and output.requires_grad:
            taps["pooled"] = output.detach().float()
            output.register_hook(tap("d_pooled"))

    def on_backbone(module, inputs, output):
        if want["on"] and output.requires_grad:
            taps["features"] = output.detach().float()
            output.register_hook(tap("d_features"))

    model.head.pool.register_forward_hook(on_pool)
    model.backbone.register_forward_hook(on_backbone)
    last_block = model.backbone[-1] if args.pre_pool != "bn" else model.backbone[-2]
    fc = model.head.fc

    losses: list[float] = []
    records: list[dict] = []
    step = 0
    t0 = time.perf_counter()
    while step < stop:
        for chunk in torch.randperm(n, generator=order).split(batch):
            if step >= stop:
                break
            for g in optimizer.param_groups:
                g["lr"] = lr_at(step) * g["mult"]
            detail = (step % args.every == 0 and step <= args.detail_until) or (
                step % args.every_late == 0
            ) or step == stop - 1
            want["on"] = detail
            taps.clear()
            optimizer.zero_grad(set_to_none=True)
            xb = x_train[chunk]
            xb = crop_flip(xb, augment)
            if detail:
                mon = gp.monitor(model.head)
                mon.__enter__()
            with precision_context(cfg, device):
                logits = model(to_layout(xb, cfg))
            if detail:
                mon.__exit__(None, None, None)
            loss = F.cross_entropy(logits.float(), y_train[chunk])
            loss.backward()
            if detail:
                pool_stats = mon["pool"]
                pooled = taps.get("pooled")
                feats = taps.get("features")
                rec = {
                    "step": step,
                    "lr": lr_at(step),
                    "loss": float(loss.detach()),
                    "grad_fc_weight": _norm(fc.weight.grad),
                    "grad_fc_bias": _norm(fc.bias.grad),
                    "grad_pooled": _norm(taps.get("d_pooled")),
                    "grad_features": _norm(taps.get("d_features")),
                    "grad_last_block": _group_norm(last_block.parameters()),
                    "grad_backbone": _group_norm(model.backbone.parameters()),
                    "dead_fraction_monitor": pool_stats["dead_fraction"],
                    "pooled_mean": pool_stats["mean"],
                    "pooled_max": pool_stats["max"],
                    "pooled_zero_fraction": None
                    if pooled is None
                    else float((pooled <= 0).float().mean()),
                    "features_zero_fraction": None
                    if feats is None
                    else float((feats <= 0).float().mean()),
                    "logit_std_over_batch": float(logits.detach().float().std(0).mean()),
                    "fc_weight_norm": float(fc.weight.detach().norm()),
                    "fc_bias_norm": float(fc.bias.detach().norm()),
                    "last_bn2_weight_mean": float(last_block.bn2.weight.detach().mean()),
                    "last_bn2_bias_mean": float(last_block.bn2.bias.detach().mean()),
                }
                if args.head == "catavgmax" and pooled is not None:
                    c = pooled.shape[1] // 2
                    rec["dead_fraction_max_half"] = float(
                        ((pooled[:, c:] > 0).sum(0) == 0).float().mean()
                    )
                records.append(rec)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 100 == 0 or step == stop:
                el = time.perf_counter() - t0
                print(
                    f"step {step}/{stop} loss {losses[-1]:.4f} "
                    f"mean100 {sum(losses[-100:]) / len(losses[-100:]):.4f} "
                    f"dead {records[-1]['dead_fraction_monitor']} {el:.0f}s",
                    flush=True,
                )
    train_time = time.perf_counter() - t0
    want["on"] = False

    model.eval()
    correct = count_correct(model, data.x_test, data.y_test, device, 1000, cfg)
    acc = correct / len(data.x_test)
    tail = losses[int(0.9 * steps):] if stop == steps else []
    record = {
        "name": args.name,
        "config": {
            k: v for k, v in vars(args).items() if k not in ("out", "name")
        },
        "recipe": "cifar-cpu (resnet18-w16, 8 epochs, SGD nesterov 0.9, lr cosine, wd 5e-4, "
        "batch 128, crop-flip, channels-last)",
        "seed": args.seed,
        "head": args.head,
        "steps_total_schedule": steps,
        "steps_run": step,
        "full_run": stop == steps,
        "test_accuracy": acc,
        "test_accuracy_at": "end of the full run" if stop == steps else f"after {step} steps",
        "final_train_loss": sum(tail) / len(tail) if tail else None,
        "weights_digest": weights_digest(model),
        "loss_per_step": [round(v, 5) for v in losses],
        "records": records,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - t_start,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(record, f, indent=1)
    print(f"test accuracy {acc:.4f} after {step} steps; wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
