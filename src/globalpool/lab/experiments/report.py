"""Summaries of finished runs: a Markdown report, a JSON file and PNG plots (:mod:`.plots`).

Per (head, training-set size): test accuracy as mean +- 95% Student-t CI over seeds (and the same
for every extra test set, e.g. digits-shifted's moved digits), parameters (total and head),
training wall time, peak memory and throughput, each averaged over seeds; with ``avg`` among the
heads, each other head's test accuracy minus ``avg``'s, paired by seed (:mod:`.paired`). Below
the table: which heads are better or worse than ``avg`` by that paired CI (without ``avg``:
which head, if any, is clearly best, :mod:`.ranking`), what every column means, and one line
per run saying how it was made and whether this call trained it or reused it from the cache.

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

from globalpool import HEADS, LEARNED_POOLS
from globalpool.lab.experiments.labels import labels_of, ordered
from globalpool.lab.experiments.monitor_plot import monitor_markdown, plot_monitor
from globalpool.lab.experiments.paired import BASELINE, format_difference, paired_difference
from globalpool.lab.experiments.paired import verdict_lines as paired_verdicts
from globalpool.lab.experiments.plots import CLIP_NOTE, plot_accuracy, plot_sweep
from globalpool.lab.experiments.ranking import winner
from globalpool.lab.experiments.results import atomic_write
from globalpool.lab.experiments.stats import mean_ci

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


#: the evaluation set whose accuracy minus the test accuracy is the "train - test gap" column
TRAIN_SET = "train-subset"


def _gap(rec: dict[str, Any]) -> float | None:
    train, test = rec.get("accuracies", {}).get(TRAIN_SET), rec.get("accuracy")
    return None if train is None or test is None else train - test


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
    order = {h: i for i, h in enumerate((*HEADS, *LEARNED_POOLS))}
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
                "gap": _acc([_gap(r) for r in recs]),
                "params_total": recs[0]["params_total"],
                "params_head": recs[0]["params_head"],
                "train_time_s": _mean([r["train_time_s"] for r in recs]),
                "train_cpu_time_s": _mean([r.get("train_cpu_time_s") for r in recs]),
                "peak_memory_bytes": _mean([r["peak_memory_bytes"] for r in recs]),
                "train_throughput": _mean([r["train_throughput"] for r in recs]),
                "eval_throughput": _mean([r["eval_throughput"] for r in recs]),
            }
        )
    for row in rows:  # each head against avg of the same size, paired by seed
        base = groups.get((row["train_size"], BASELINE))
        mine = groups[(row["train_size"], row["head"])]
        row["vs_avg"] = None
        if base is not None and row["head"] != BASELINE:
            row["vs_avg"] = paired_difference(
                {r["spec"]["seed"]: r["accuracy"] for r in mine},
                {r["spec"]["seed"]: r["accuracy"] for r in base},
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


COLUMNS = [
    ("params total", "trainable parameters of the whole model"),
    ("params head", "trainable parameters of the head alone (pooling and classifier)"),
    ("train time s", "wall time of the training loop, mean over seeds"),
    (
        "train CPU s",
        "CPU time of the training process meanwhile (all its threads), mean over seeds; a "
        "busy shared machine inflates it less than wall time",
    ),
    ("peak mem MiB", None),  # described by the run's memory method
    ("train samples/s", "training samples (all ranks) per second of training"),
    ("eval samples/s", "samples of the first test set column per second of evaluation"),
]


GAP_COLUMN = "train − test gap pp"
PAIRED_COLUMN = f"Δ vs `{BASELINE}` pp (paired)"


def _paired_cell(row: dict[str, Any]) -> str:
    diff = row.get("vs_avg")
    if row["head"] == BASELINE:
        return "baseline"
    if diff is None:
        return "n/a"
    cell = format_difference(diff)
    if diff["verdict"] == "better":
        return f"**{cell}** better"
    return f"{cell} worse" if diff["verdict"] == "worse" else cell


def markdown_table(
    rows: Sequence[dict[str, Any]],
    labels: dict[str, str] | None = None,
    tuned: dict[str, str] | None = None,
) -> str:
    """The results table, then, per training-set size, which heads (if any) are bold and why.

    Where the table has ``avg`` (rows from :func:`summarize`, which hold ``vs_avg``), each
    other head's test accuracy minus ``avg``'s, paired by seed, is a column (mean ± 95% CI,
    :mod:`.paired`), and a head is bold when it is better than ``avg`` by that paired CI (it
    lies above 0); worse and inconclusive heads are named below the table. Without ``avg``, a
    head's test accuracy is bold only when it is the best mean and its 95% CI does not overlap
    the next-best head's. ``labels`` renames test sets (``{name: label}``). ``tuned``
    (``compare --tune``) adds a column of each head's chosen settings (``{head: text}``).
    """
    labels = labels or {}
    names = ordered(rows[0]["accuracies"], labels) if rows else ["test"]
    header = ["head", "train n", "seeds"] + (["tuned"] if tuned else [])
    header += [f"{labels.get(n, n)} acc %" for n in names]
    sizes = sorted({row["train_size"] for row in rows})
    by_size = {n: [r for r in rows if r["train_size"] == n] for n in sizes}
    # The paired rule where avg and the paired differences are there, the CI-overlap rule else.
    paired = {n: any(r.get("vs_avg") is not None for r in rs) for n, rs in by_size.items()}
    header += [PAIRED_COLUMN] if any(paired.values()) else []
    gaps = any(row.get("gap") for row in rows)
    header += [GAP_COLUMN] if gaps else []
    header += [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    test = labels.get("test", "test")
    verdicts: dict[int, tuple[set[str], list[str]]] = {}
    for size, size_rows in by_size.items():
        where = f"train n={size}" if len(sizes) > 1 else "this table"
        if paired[size]:
            verdicts[size] = paired_verdicts(size_rows, where, test)
            continue
        best, why = winner(size_rows)
        if best is None:
            line = f"No head is bold in {where} ({test} accuracy): {why}.  "
        else:
            line = f"Bold in {where}: `{best['head']}`, the best {test} accuracy; {why}.  "
        verdicts[size] = (set() if best is None else {best["head"]}, [line])
    for row in rows:
        cells = [f"`{row['head']}`", str(row["train_size"]), str(row["seeds"])]
        if tuned:
            cells.append(tuned.get(row["head"], "n/a"))
        for name in names:
            acc = row["accuracy"] if name == "test" else row["accuracies"].get(name)
            cell = _fmt_acc(acc)
            if name == "test" and row["head"] in verdicts[row["train_size"]][0]:
                cell = f"**{cell}**"
            cells.append(cell)
        if any(paired.values()):
            cells.append(_paired_cell(row) if paired[row["train_size"]] else "n/a")
        if gaps:
            cells.append(_fmt_acc(row.get("gap")))
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
    lines.append("")
    for _, size_lines in verdicts.values():
        lines += size_lines
    return "\n".join(lines).rstrip() + "\n"


def _legend(
    names: Sequence[str], meta: dict[str, Any], rows: Sequence[dict[str, Any]] = ()
) -> list[str]:
    sets = {s["name"]: s for s in meta.get("test_sets", [])}
    out = [
        "Columns:",
        "",
        "- **head**: the pooling head on the shared backbone.",
        "- **train n**: training-set size (below the full set, a stratified subset drawn with "
        "each seed).",
        "- **seeds**: runs averaged, seeds 0 .. N-1 (a seed sets the initial weights, the batch "
        "order and the subset).",
    ]
    for name in names:
        info = sets.get(name, {"label": name, "description": f"test set {name!r}"})
        size = f", {info['size']} samples" if "size" in info else ""
        out.append(
            f"- **{info['label']} acc %**: accuracy on {info['description']}{size}; mean ± 95% "
            "CI (Student t over seeds)."
        )
    if any(r.get("vs_avg") is not None for r in rows):
        out.append(
            f"- **{PAIRED_COLUMN}**: the head's test accuracy minus `{BASELINE}`'s, seed by "
            "seed (runs of one seed share the data order and augmentation), in percentage "
            "points; mean ± 95% CI (Student t over the paired differences). **better** / "
            "**worse**: the CI lies above / below 0; a bare value: the CI contains 0 (or one "
            "seed), so no difference is shown. With `avg` in the table, a head is bold when it "
            "is better than `avg` by this rule."
        )
    if TRAIN_SET in names:
        out.append(
            f"- **{GAP_COLUMN}**: accuracy on the unaugmented training subset minus test "
            "accuracy, in percentage points, per seed; mean ± 95% CI. How much a head "
            "overfits, measured."
        )
    memory = MEMORY_NOTES.get(meta.get("memory_method"), "not measured.")
    for name, text in COLUMNS:
        out.append(f"- **{name}**: {(text + '.') if text else memory}")
    if meta.get("tuning"):
        out.append(
            "- **tuned**: the settings the head's runs trained at, chosen on the validation "
            "split (see Tuning)."
        )
    out.append("- **n/a**: not measured; for an accuracy, the head cannot take that input size.")
    return out


def _env_of(rec: dict[str, Any]) -> dict[str, Any]:
    env = rec.get("spec", {}).get("env") or {}
    return {
        "threads": env.get("threads", rec.get("threads")),
        "world_size": env.get("world_size", rec.get("world_size")),
        "device": rec.get("device", env.get("device")),
        "hardware": env.get("hardware", rec.get("hardware")),
        "torch": env.get("torch", rec.get("torch")),
        "globalpool": env.get("globalpool", rec.get("globalpool")),
    }


def _runs_table(records: Sequence[dict[str, Any]], test_label: str) -> list[str]:
    header = [
        "run",
        f"{test_label} acc %",
        "final train loss",
        "this call",
        "threads",
        "processes",
        "device",
        "torch",
        "globalpool",
        "finished (UTC)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for rec in records:
        env = _env_of(rec)
        loss = rec.get("final_train_loss")
        device = f"{env['device']} ({env['hardware']})" if env["hardware"] else env["device"]
        cells = [
            f"`{rec.get('label', rec['spec'].get('head'))}`",
            _fmt(None if rec["accuracy"] is None else 100 * rec["accuracy"], ".2f"),
            _fmt(loss, ".4f"),
            "reused (cached)" if rec.get("reused") else "trained",
            str(env["threads"]),
            str(env["world_size"]),
            str(device),
            str(env["torch"]),
            str(env["globalpool"]),
            str(rec.get("finished_at", "n/a")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sizes_line(meta: dict[str, Any]) -> str:
    sets = meta.get("test_sets") or []
    if len(sets) <= 1:
        return f"Test set: {meta.get('test_size')} samples, the same for every run."
    parts = ", ".join(f"{s['label']} {s['size']}" for s in sets)
    return f"Test sets (samples each, the same for every run): {parts}."


def _pct(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{100 * value:.1f}"


def tuned_settings(meta: dict[str, Any]) -> dict[str, str] | None:
    """``{head: "lr 0.01"}`` (and the warm-up when tuned) of a ``--tune`` call, else ``None``."""
    tuning = meta.get("tuning")
    if not tuning:
        return None
    warm = "warmup" in tuning["params"]
    out = {}
    for head in tuning["heads"]:
        chosen = head["chosen"]
        text = f"lr {chosen['lr']:g}" + (f", warm-up {chosen['warmup']}" if warm else "")
        out[head["head"]] = text + (" (recipe; all diverged)" if head["all_diverged"] else "")
    return out


def tuning_markdown(tuning: dict[str, Any]) -> list[str]:
    """The "Tuning" section of ``results.md`` from ``meta["tuning"]`` (:mod:`.tune`)."""
    grid, val = tuning["grid"], tuning["validation"]
    warm = "warmup" in tuning["params"]
    heads = tuning["heads"]
    points = heads[0]["points"] if heads else []

    def name(p: dict[str, Any]) -> str:
        return f"lr {p['lr']:g}" + (f", warm-up {p['warmup']}" if warm else "")

    header = ["head", *(f"{name(p)} val acc %" for p in points), "chosen"]
    lines = [
        "## Tuning",
        "",
        f"`--tune {','.join(tuning['params'])}`: each head's "
        f"{' and '.join('learning rate' if p == 'lr' else 'warm-up' for p in tuning['params'])} "
        "picked on a validation split, then its seeds trained at that point on the full "
        "training set (the table above). The test set played no part in the choice.",
        "",
        f"- **Grid**: lr {', '.join(f'{v:g}' for v in grid['lr'])} (recipe "
        f"{tuning['recipe']['lr']:g})"
        + (f"; warm-up {', '.join(str(v) for v in grid['warmup'])} optimiser steps (linear)"
           if warm else "")
        + ".",
        f"- **Validation split**: {val['size']} of the {val['of']} training samples "
        f"({100 * val['fraction']:g}%, class-stratified, split seed {val['seed']}); the tuning "
        f"runs train on {tuning['train_size']} of the others and never on these. Chance "
        f"(majority class): {100 * val['chance']:.1f}%.",
        f"- **Budget**: {tuning['epochs']} epoch(s) per tuning run ({tuning['steps']} optimiser "
        f"steps, {tuning['budget']:g} of the runs' epochs), tuning seed(s) "
        f"{', '.join(str(s) for s in tuning['seeds'])}; {tuning['runs']} tuning runs "
        f"({tuning['runs_this_call']} trained by this call, {tuning['runs_reused']} reused), "
        f"cached under `{tuning['dir']}/` beside this file.",
        f"- **Rule**: {tuning['rule']}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    notes: list[str] = []
    for head in heads:
        cells = [f"`{head['head']}`"]
        for p in head["points"]:
            runs = [r["val_accuracy"] for r in p["runs"]]
            cell = _pct(p["val_accuracy"])
            if len(runs) > 1:
                cell += " (" + ", ".join(_pct(v) for v in runs) + ")"
            if p["diverged"]:
                cell += " diverged"
            if p.get("chosen"):
                cell += " ✓"
            cells.append(cell)
        chosen = head["chosen"]
        text = f"lr {chosen['lr']:g}" + (f", warm-up {chosen['warmup']}" if warm else "")
        if head["all_diverged"]:
            text += " (recipe: every grid point diverged)"
            notes.append(
                f"`{head['head']}`: every grid point diverged; its runs used the recipe's "
                "settings."
            )
        cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cells: mean validation accuracy over the tuning seeds (each seed's in brackets when "
        "there are several); `diverged`: a run of that point diverged (see the rule), so the "
        "point was not eligible; ✓: the chosen point.",
    ]
    edges = [h for h in heads if h.get("lr_at_edge")]
    if edges:
        named = ", ".join(f"`{h['head']}` ({h['lr_at_edge']})" for h in edges)
        notes.append(
            f"At an end of the lr grid: {named}. The best lr may lie beyond it; a wider "
            "`--tune-grid` would tell (and a reduced-budget tuning run may prefer another lr "
            "than a full run would)."
        )
    if notes:
        lines += ["", *notes]
    return [*lines, ""]


def _warmup_text(cfg: dict[str, Any]) -> str:
    return f", linear warm-up {cfg['warmup']} steps" if cfg.get("warmup") else ""


def _smoothing_text(cfg: dict[str, Any]) -> str:
    smoothing = cfg.get("label_smoothing")
    return f", label smoothing {smoothing}" if smoothing else ""


def _augment_text(cfg: dict[str, Any]) -> str:
    augment = cfg.get("augment", "none")
    if augment == "crop-flip" and cfg.get("crop_padding", 4) != 4:
        return f"{augment} (shifts up to {cfg['crop_padding']} px)"
    return augment


def markdown_report(
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    records: Sequence[dict[str, Any]] = (),
    plots: dict[str, bool] | None = None,
) -> str:
    """Title, settings, the table, the column legend, the plots and one line per run."""
    cfg = meta.get("config", {})
    labels = labels_of(meta)
    names = ordered(rows[0]["accuracies"], labels) if rows else ["test"]
    envs = list(dict.fromkeys(tuple(_env_of(r).items()) for r in records))
    if len(envs) == 1:
        env = dict(envs[0])
        made = (
            f"every run on {env['device']} ({env['hardware']}), {env['world_size']} "
            f"process(es) per run, {env['threads']} torch thread(s) for the math, torch "
            f"{env['torch']}, globalpool {env['globalpool']}"
        )
        if meta.get("env", {}).get("data"):
            made += f", dataset digest {meta['env']['data']}"
    else:
        made = "runs were made differently; see each run below"
    reused = sum(1 for r in records if r.get("reused"))
    lines = [
        f"# globalpool compare: {meta.get('dataset')} / {meta.get('model')}",
        "",
        _sizes_line(meta) + "  ",
        f"Training (every run): seeds {meta.get('seeds')}; epochs {cfg.get('epochs')} "
        f"({meta.get('steps')} optimiser steps of batch {cfg.get('batch_size')}); "
        f"{cfg.get('optimizer')} "
        + (
            f"lr tuned per head (recipe lr {cfg.get('lr')}; see Tuning) "
            if meta.get("tuning")
            else f"lr {cfg.get('lr')} "
        )
        + f"({cfg.get('schedule')}{_warmup_text(cfg)}), "
        f"weight decay {cfg.get('weight_decay')}{_smoothing_text(cfg)}; augmentation "
        f"{_augment_text(cfg)}; precision {cfg.get('precision', 'fp32')}"
        f"{', channels-last' if cfg.get('channels_last') else ''}"
        f"{'; flip test-time augmentation' if cfg.get('flip_tta') else ''}.  ",
        f"How the runs were made (part of the cache key): {made}.  ",
        f"This call: {len(records) - reused} run(s) trained with {meta.get('workers')} worker "
        f"process(es), {reused} reused from the cache (marked `reused (cached)` below).",
        "",
        markdown_table(rows, labels, tuned_settings(meta)),
        *_legend(names, meta, rows),
        "",
    ]
    for kind, clipped in (plots or {}).items():
        name = "accuracy.png" if kind == "plot" else "accuracy_vs_train_size.png"
        note = f" Red triangles: {CLIP_NOTE} (the metric's range)." if clipped else ""
        lines += [f"![{kind}]({name})", "", f"`{name}`: mean ± 95% CI; dots: seeds.{note}", ""]
    if meta.get("monitor_plot"):
        lines += monitor_markdown(records)
    if meta.get("tuning"):
        lines += tuning_markdown(meta["tuning"])
    if records:
        lines += ["## Runs", "", *_runs_table(records, labels.get("test", "test")), ""]
    return "\n".join(lines)


def write_report(
    out: Path, records: Sequence[dict[str, Any]], meta: dict[str, Any]
) -> dict[str, Path]:
    """Write ``results.json``, ``results.md``, ``accuracy.png``, for a training-set-size
    sweep ``accuracy_vs_train_size.png``, and for runs made with ``--monitor`` ``monitor.png``
    into ``out``; return their paths by kind."""
    rows = summarize(records)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    clipped: dict[str, bool] = {}
    if rows:
        paths["plot"] = out / "accuracy.png"
        clipped["plot"] = plot_accuracy(rows, meta, paths["plot"])
        if len({r["train_size"] for r in rows}) > 1:
            paths["sweep_plot"] = out / "accuracy_vs_train_size.png"
            clipped["sweep_plot"] = plot_sweep(rows, meta, paths["sweep_plot"])
    meta = {**meta, "plots_clipped": clipped}
    if any(r.get("monitor") for r in records):
        monitored = plot_monitor(records, meta, out / "monitor.png")
        if monitored:
            paths["monitor_plot"] = out / "monitor.png"
        meta["monitor_plot"] = monitored
    payload = {"meta": meta, "rows": rows, "runs": list(records)}
    atomic_write(paths["json"], json.dumps(payload, indent=2, sort_keys=True) + "\n")
    atomic_write(paths["markdown"], markdown_report(rows, meta, records, clipped))
    return paths
