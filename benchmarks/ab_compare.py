"""Compare the fused kernels of two builds from alternating ``globalpool bench`` runs.

    python benchmarks/ab_compare.py OUT_DIR --old A1 A2 ... --new B1 B2 ...

Each A/B is the output folder of one ``globalpool bench`` run of that build, run in turn (A1,
B1, A2, B2, ...) on the same machine with the same options. For every (dtype, layout, shape,
kind) the median over the runs of each build's ratio to the same-run ceiling (forward: ``x.sum()``;
backward: the gradient-sized write) is compared; one run against one run on a shared VM moves
by ±10% or more, the median of several alternating runs much less. Writes ``ab.json`` and
``ab.md`` to OUT_DIR.

>>> sorted(_ratios.__annotations__)
['folder', 'return']
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def _ratios(folder: Path) -> dict[tuple, dict[str, float]]:
    """(dtype, layout, shape, kind) -> {"forward": ratio, "backward": ratio} of the fused kernel."""
    data = json.loads((folder / "bench.json").read_text())
    out = {}
    for case in data["cases"]:
        for method in case["methods"]:
            if method["family"] == "fused" and method["status"] == "ok":
                key = (case["dtype"], case["layout"], case["shape_name"], method["kind"])
                out[key] = {d: method[d]["ratio"] for d in ("forward", "backward")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--old", type=Path, nargs="+", required=True)
    parser.add_argument("--new", type=Path, nargs="+", required=True)
    args = parser.parse_args()
    old = [_ratios(f) for f in args.old]
    new = [_ratios(f) for f in args.new]
    keys = sorted(set.intersection(*(set(r) for r in old + new)))
    rows = []
    for key in keys:
        row = {"cell": list(key)}
        for d in ("forward", "backward"):
            o = [r[key][d] for r in old]
            n = [r[key][d] for r in new]
            row[d] = {"old": o, "new": n, "change": statistics.median(n) / statistics.median(o)}
        rows.append(row)
    summary = {
        d: {
            "geomean_change": statistics.geometric_mean([r[d]["change"] for r in rows]),
            "min": min(r[d]["change"] for r in rows),
            "max": max(r[d]["change"] for r in rows),
        }
        for d in ("forward", "backward")
    }
    first = json.loads((args.old[0] / "bench.json").read_text())
    machine, settings = first["machine"]["name"], first["settings"]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine, "settings": settings, "summary": summary, "rows": rows,
              "runs": {"old": [str(f) for f in args.old], "new": [str(f) for f in args.new]}}
    (args.out / "ab.json").write_text(json.dumps(result, indent=1))
    lines = [
        "# Fused kernels, new build against old: median ratio to the same-run ceiling",
        "",
        f"{len(args.old)} runs of each build, alternating. Change = median(new) / median(old)"
        " (above 1: the new build is faster relative to the ceiling).",
        "",
        f"Machine: {machine}. Settings: {json.dumps(settings)}.",
        "",
        "| dtype | layout | shape | kind | forward change | backward change |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {' | '.join(r['cell'])} | {r['forward']['change']:.2f} | "
        f"{r['backward']['change']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        *(
            f"Geometric mean of the change, {d}: {s['geomean_change']:.3f} "
            f"(cells {s['min']:.2f}–{s['max']:.2f})."
            for d, s in summary.items()
        ),
    ]
    (args.out / "ab.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
