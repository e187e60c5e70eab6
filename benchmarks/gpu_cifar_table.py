"""The CIFAR-10 head table of the ``cifar-gpu`` recipe on one GPU, in one call under 10 minutes.

Runs ``globalpool compare --recipe cifar-gpu`` for 6 heads x 5 seeds, one seed at a time (a
"round" trains that seed for every head; each round's call reuses the runs of the rounds before
it and rewrites ``results.md``/``results.json`` with every finished seed). A time guard stops
cleanly: no round starts that the previous one says would not end in time, and a round still
running at the limit is stopped (its finished runs are kept in the cache, and the report of the
last whole round stands). Everything comes from the repository copy: nothing is installed; the
``python`` running this script must hold torch with CUDA (and numpy, scipy, matplotlib, Pillow,
typer, rich), else it stops at once, saying what is missing.

Usage (from the repository root)::

    python benchmarks/gpu_cifar_table.py --data PATH/cifar10-jpeg.tar.gz --out RESULTS_DIR

``--data`` defaults to ``$CIFAR10_ARCHIVE``, else the first of ``shared/data/``,
``../shared/data/`` and ``.gpu-data/`` that holds ``cifar10-jpeg.tar.gz``. ``--out`` (default
``gpu-cifar-results``) receives, flat: ``environment.json``, ``log.txt``,
``results.md``, ``results.json`` (every run's record), ``accuracy.png`` and ``summary.txt``. The
runs' cache (records and the decoded-image cache) lives in ``--work`` (default
``/tmp/gpu-cifar-work``), outside ``--out``. Exit code 0 when every round finished, 3 when the
time guard stopped early (the results cover the whole rounds before it), 2 when the machine or
the data is not fit to run at all, 1 when a round failed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADS = "avg,max,catavgmax,gem,attention,fc"
NEEDED = ("numpy", "scipy", "matplotlib", "PIL", "typer", "rich")
ARCHIVE = "cifar10-jpeg.tar.gz"
DISTRIBUTIONS = {"PIL": "pillow"}  # import name -> distribution name, where they differ


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", help=f"the CIFAR-10 JPEG archive ({ARCHIVE})")
    parser.add_argument("--out", default="gpu-cifar-results", help="where the results go")
    parser.add_argument(
        "--work", default="/tmp/gpu-cifar-work", help="the runs' cache and the decoded images"
    )
    parser.add_argument("--heads", default=HEADS, help=f"comma list (default {HEADS})")
    parser.add_argument("--seeds", type=int, default=5, help="seeds per head (default 5)")
    parser.add_argument(
        "--time-limit", type=float, default=540.0, help="seconds for everything (default 540)"
    )
    parser.add_argument("--epochs", type=int, help="override the recipe's (smoke tests)")
    parser.add_argument("--model", help="override the recipe's model (smoke tests)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run without CUDA (smoke tests only)"
    )
    return parser.parse_args(argv)


def environment() -> dict[str, object]:
    """Python, the packages the lab needs, torch's CUDA view and the GPU (``nvidia-smi``)."""
    env: dict[str, object] = {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    packages: dict[str, str | None] = {}
    for name in ("torch", *NEEDED):
        try:
            module = importlib.import_module(name)
        except Exception as err:  # any import failure counts as missing
            packages[name] = None
            env.setdefault("import_errors", {})[name] = f"{type(err).__name__}: {err}"  # type: ignore[index]
            continue
        try:
            packages[name] = metadata.version(DISTRIBUTIONS.get(name, name))
        except metadata.PackageNotFoundError:
            packages[name] = str(getattr(module, "__version__", "unknown"))
    env["packages"] = packages
    if packages["torch"] is not None:
        import torch

        env["cuda_available"] = torch.cuda.is_available()
        env["torch_cuda"] = torch.version.cuda
        cudnn = torch.backends.cudnn
        env["cudnn"] = cudnn.version() if cudnn.is_available() else None
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            memory = torch.cuda.get_device_properties(0).total_memory
            env["gpu_memory_gib"] = round(memory / 2**30, 1)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        env["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.SubprocessError) as err:
        env["nvidia_smi"] = f"not available ({type(err).__name__})"
    return env


def find_data(explicit: str | None) -> Path | None:
    candidates = [explicit] if explicit else []
    if not explicit and os.environ.get("CIFAR10_ARCHIVE"):
        candidates.append(os.environ["CIFAR10_ARCHIVE"])
    if not candidates:
        places = ("shared/data", "../shared/data", ".gpu-data")
        candidates = [str(ROOT / place / ARCHIVE) for place in places]
    for path in candidates:
        if Path(path).is_file():
            return Path(path).resolve()
    return None


def compare_command(args: argparse.Namespace, data: Path, seeds: int, device: str) -> list[str]:
    cmd = [
        sys.executable, "-m", "globalpool", "compare", "--dataset", f"folder:{data}",
        "--recipe", "cifar-gpu", "--heads", args.heads, "--seeds", str(seeds),
        "--device", device, "--no-save-models", "--workers", "1",
        "--out", str(Path(args.work) / "results"),
    ]  # fmt: skip
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.model is not None:
        cmd += ["--model", args.model]
    return cmd


def run_round(cmd: list[str], timeout: float, log: Path, env: dict[str, str]) -> str:
    """Run one ``compare`` call: ``"done"``, ``"failed"`` or ``"stopped"`` (at the time limit:
    SIGTERM, which keeps every finished run)."""
    with log.open("a") as sink:
        sink.write(f"\n$ {' '.join(cmd)}\n")
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            return "done" if proc.wait(timeout=max(1.0, timeout)) == 0 else "failed"
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return "stopped"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out / "environment.json").write_text(json.dumps(env, indent=2) + "\n")
    print(json.dumps(env, indent=2), flush=True)

    missing = [name for name, version in env["packages"].items() if version is None]  # type: ignore[union-attr]
    if missing:
        print(f"error: this python ({sys.executable}) lacks {', '.join(missing)}; nothing run")
        return 2
    if not env.get("cuda_available") and not args.allow_cpu:
        print(
            f"error: torch {env['packages']['torch']} in {sys.executable} sees no CUDA device "  # type: ignore[index]
            f"(torch.version.cuda = {env.get('torch_cuda')}); this script needs a GPU; nothing run"
        )
        return 2
    data = find_data(args.data)
    if data is None:
        print(
            f"error: no {ARCHIVE}: give --data PATH or set CIFAR10_ARCHIVE (looked in "
            f"shared/data/, ../shared/data/ and .gpu-data/ under {ROOT}); nothing run"
        )
        return 2

    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), child_env.get("PYTHONPATH")) if p
    )
    child_env["GLOBALPOOL_CACHE_DIR"] = str(Path(args.work) / "cache")
    child_env["PYTHONUNBUFFERED"] = "1"
    device = "cuda" if env.get("cuda_available") else "cpu"
    log = out / "log.txt"
    finished, note, code = 0, "", 0
    last_round = 0.0
    for seeds in range(1, args.seeds + 1):
        left = args.time_limit - (time.monotonic() - started) - 15.0  # 15 s to copy and write
        if seeds > 1 and left < 1.2 * last_round:
            note = (
                f"stopped before seed {seeds - 1}: {left:.0f} s left, the last round took "
                f"{last_round:.0f} s"
            )
            code = 3
            break
        t0 = time.monotonic()
        status = run_round(compare_command(args, data, seeds, device), left, log, child_env)
        last_round = time.monotonic() - t0
        print(f"round {seeds} (seed {seeds - 1}): {status} in {last_round:.0f} s", flush=True)
        if status != "done":
            note = f"round {seeds} (seed {seeds - 1}) {status} after {last_round:.0f} s"
            code = 3 if status == "stopped" else 1
            break
        finished = seeds
    results = Path(args.work) / "results"
    for name in ("results.md", "results.json", "accuracy.png"):
        if (results / name).is_file():
            shutil.copy2(results / name, out / name)
    total = time.monotonic() - started
    summary = (
        f"seeds finished for every head: {finished} of {args.seeds} "
        f"(heads {args.heads}); total {total:.0f} s of a {args.time_limit:.0f} s limit"
        + (f"; {note}" if note else "")
        + f"; data {data}; device {env.get('gpu', device)}\n"
    )
    (out / "summary.txt").write_text(summary)
    print(summary, end="")
    if (out / "results.md").is_file():
        print((out / "results.md").read_text().split("Columns:")[0])
    return code


if __name__ == "__main__":
    sys.exit(main())
