"""Summaries of finished runs: a Markdown table, a JSON file and PNG plots (matplotlib, Agg).

Per (head, training-set size): test accuracy as mean +- 95% Student-t CI over seeds (and the same
for every extra test set, e.g. digits-shifted's moved digits), parameters (total and head),
training wall time, peak memory and throughput, each averaged over seeds.

>>> rec = {"spec": {"head": "avg", "seed": 0}, "train_size": 100, "accuracy": 0.9,
...        "accuracies": {"test": 0.9}, "params_total": 10, "params_head": 2,
...        "train_time_s": 1.0, "peak_memory_bytes": 2**20, "train_throughput": 5.0,
...        "eval_throughput": 50.0}
>>> rows = summarize([rec, {**rec, "accuracy": 0.8, "accuracies": {"test": 0.8}}])
>>> rows[0]["head"], rows[0]["seeds"], round(rows[0]["accuracy"]["mean"], 3)
('avg', 2, 0.85)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from globalpool.experiments.results import atomic_write
from globalpool.experiments.stats import mean_ci
from globalpool.heads import HEADS

MEMORY_NOTES = {
    "tensor-peak-cpu": "peak bytes of live tensors in a training step (parameters, optimiser "
    "state, batch, activations, gradients, temporaries), by tensor accounting on CPU.",
    "cuda-max-allocated": "peak CUDA memory allocated during training (torch.cuda."
    "max_memory_allocated) above what was allocated before the model was built.",
}


def _mean(values: Sequence[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None]
    return math.fsum(xs) / len(xs) if xs and len(xs) == len(values) else None


def _acc(values: Sequence[float | None]) -> dict[str, Any] | None:
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    mean, half = mean_ci(xs)
    return {"mean": mean, "ci95": half, "n": len(xs), "values": xs}


def test_set_names(records: Sequence[dict[str, Any]]) -> list[str]:
    """Test-set names over all records, ``"test"`` first, then in order of appearance."""
    names: list[str] = ["test"]
    for rec in records:
        for name in rec.get("accuracies", {}):
            if name not in names:
                names.append(name)
    return names


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (training-set size, head), sizes ascending, heads in ``HEADS`` order."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault((int(rec["train_size"]), rec["spec"]["head"]), []).append(rec)
    order = {h: i for i, h in enumerate(HEADS)}
    names = test_set_names(records)
    rows = []
    for (size, head), recs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], 99), kv[0][1])
    ):
        recs = sorted(recs, key=lambda r: r["spec"]["seed"])
        rows.append(
            {
                "head": head,
                "train_size": size,
                "seeds": len(recs),
                "seed_list": [r["spec"]["seed"] for r in recs],
                "accuracy": _acc([r["accuracy"] for r in recs]),
                "accuracies": {
                    name: _acc([r.get("accuracies", {}).get(name) for r in recs]) for name in names
                },
                "params_total": recs[0]["params_total"],
                "params_head": recs[0]["params_head"],
                "train_time_s": _mean([r["train_time_s"] for r in recs]),
                "train_cpu_time_s": _mean([r.get("train_cpu_time_s") for r in recs]),
                "peak_memory_bytes": _mean([r["peak_memory_bytes"] for r in recs]),
                "train_throughput": _mean([r["train_throughput"] for r in recs]),
                "eval_throughput": _mean([r["eval_throughput"] for r in recs]),
            }
        )
    return rows


def _fmt_acc(acc: dict[str, Any] | None) -> str:
    if acc is None:
        return "n/a"
    if acc["ci95"] is None:
        return f"{100 * acc['mean']:.1f}"
    return f"{100 * acc['mean']:.1f} ± {100 * acc['ci95']:.1f}"


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results table; the best mean test accuracy per training-set size is bold."""
    names = [n for n in (rows[0]["accuracies"] if rows else {"test": None}) if n != "test"]
    header = ["head", "train n", "seeds", "test acc %"] + [f"{n} acc %" for n in names]
    header += [
        "params total",
        "params head",
        "train time s",
        "train CPU s",
        "peak mem MiB",
        "train samples/s",
        "eval samples/s",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    best: dict[int, float] = {}
    for row in rows:
        if row["accuracy"] is not None:
            size, mean = row["train_size"], row["accuracy"]["mean"]
            best[size] = max(best.get(size, -1.0), mean)
    for row in rows:
        acc = _fmt_acc(row["accuracy"])
        if row["accuracy"] is not None and row["accuracy"]["mean"] == best[row["train_size"]]:
            acc = f"**{acc}**"
        cells = [f"`{row['head']}`", str(row["train_size"]), str(row["seeds"]), acc]
        cells += [_fmt_acc(row["accuracies"].get(n)) for n in names]
        cells += [
            f"{row['params_total']:,}",
            f"{row['params_head']:,}",
            _fmt(row["train_time_s"], ".1f"),
            _fmt(row["train_cpu_time_s"], ".1f"),
            _fmt(row["peak_memory_bytes"], ".2f", 2**20),
            _fmt(row["train_throughput"], ",.0f"),
            _fmt(row["eval_throughput"], ",.0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """Title, settings, the table and notes on how each column was measured."""
    cfg = meta.get("config", {})
    lines = [
        f"# globalpool compare: {meta.get('dataset')} / {meta.get('model')}",
        "",
        f"Seeds: {meta.get('seeds')}; epochs: {cfg.get('epochs')} "
        f"({meta.get('steps')} optimiser steps of batch {cfg.get('batch_size')}); "
        f"{cfg.get('optimizer')} lr {cfg.get('lr')} ({cfg.get('schedule')}), "
        f"weight decay {cfg.get('weight_decay')}; device {meta.get('device')}, "
        f"{meta.get('world_size')} process(es), {meta.get('workers')} worker(s) x "
        f"{meta.get('threads')} thread(s).",
        "",
        markdown_table(rows),
        "Accuracy: mean ± 95% CI (Student t over seeds). Train time: wall time of the training "
        "loop; train CPU: CPU time of the process meanwhile (all its threads), which a busy "
        "shared machine inflates less than wall time. Peak mem: "
        + MEMORY_NOTES.get(meta.get("memory_method"), "not measured.")
        + " Throughput: training samples (all ranks) per second of training; eval: test "
        "samples per second. `n/a` accuracy: a flatten-FC head cannot take that input size.",
        "",
    ]
    return "\n".join(lines)


def _save(fig: Any, path: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _plot_accuracy(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(r["train_size"] for r in rows)
    sel = [r for r in rows if r["train_size"] == size]
    names = list(sel[0]["accuracies"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(sel) + 2), 4.0), dpi=120)
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        xs, ys, es = [], [], []
        for i, row in enumerate(sel):
            acc = row["accuracies"].get(name)
            if acc is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ys.append(100 * acc["mean"])
            es.append(100 * (acc["ci95"] or 0.0))
            seeds = [100 * v for v in acc["values"]]
            ax.scatter([xs[-1] + 0.12 * width] * len(seeds), seeds, s=8, c="gray", alpha=0.6)
        ax.errorbar(xs, ys, yerr=es, fmt="o", capsize=4, label=name)
    ax.set_xticks(range(len(sel)), [r["head"] for r in sel])
    ax.set_ylabel("accuracy % (mean ± 95% CI; dots: seeds)")
    ax.set_title(
        f"{meta.get('dataset')} / {meta.get('model')}: {sel[0]['seeds']} seeds, train n={size}"
    )
    ax.grid(axis="y", alpha=0.3)
    if len(names) > 1:
        ax.legend(title="test set", fontsize="small")
    fig.tight_layout()
    _save(fig, path)


def _plot_sweep(rows: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5), dpi=120)
    heads = list(dict.fromkeys(r["head"] for r in rows))
    for k, head in enumerate(heads):
        sel = [r for r in rows if r["head"] == head and r["accuracy"] is not None]
        nudge = 1.0 + 0.012 * (k - (len(heads) - 1) / 2)  # keep error bars apart (log x)
        ax.errorbar(
            [r["train_size"] * nudge for r in sel],
            [100 * r["accuracy"]["mean"] for r in sel],
            yerr=[100 * (r["accuracy"]["ci95"] or 0.0) for r in sel],
            marker="o",
            capsize=3,
            label=head,
        )
    ax.set_xscale("log")
    sizes = sorted({r["train_size"] for r in rows})
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.minorticks_off()
    ax.set_ylim(0, 100)
    ax.set_xlabel("training-set size")
    ax.set_ylabel("test accuracy % (mean ± 95% CI)")
    ax.set_title(f"{meta.get('dataset')} / {meta.get('model')}: accuracy vs training-set size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    _save(fig, path)


def write_report(
    out: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``accuracy.png`` and, for a training-set-size
    sweep, ``accuracy_vs_train_size.png`` into ``out``; return their paths by kind."""
    rows = summarize(records)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    payload = {"meta": meta, "rows": rows, "runs": list(records)}
    atomic_write(paths["json"], json.dumps(payload, indent=2, sort_keys=True) + "\n")
    atomic_write(paths["markdown"], markdown_report(rows, meta))
    if rows:
        paths["plot"] = out / "accuracy.png"
        _plot_accuracy(rows, meta, paths["plot"])
        if len({r["train_size"] for r in rows}) > 1:
            paths["sweep_plot"] = out / "accuracy_vs_train_size.png"
            _plot_sweep(rows, meta, paths["sweep_plot"])
    return paths
