"""``globalpool compare``: train one backbone per head and seed, report which head wins.

Registered by ``globalpool.lab.cli`` as ``app.command("compare")(compare)``. Bad input ends with one
``Error:`` line on stderr before any training (:mod:`globalpool.lab.cli_errors`): exit 2 for a bad
option value (unknown head, model or dataset, ``--seeds 0``), exit 1 for what running found
(missing or corrupt data, no CUDA, an unwritable ``--out``, a failed run); results already in
``--out`` are never touched except by adding finished runs. Set ``GLOBALPOOL_DEBUG=1`` to see
tracebacks instead.

Ctrl-C (SIGINT) or SIGTERM stops at once (:mod:`.interrupt`): runs in flight are killed, every
finished run is already saved, one ``interrupted`` line says how many, and the exit code is
130 (SIGINT) or 143 (SIGTERM); a second signal exits without any clean-up.
"""

from __future__ import annotations

import dataclasses
import datetime
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from globalpool.lab.cli_errors import debug
from globalpool.lab.experiments.spec import DEFAULTS, RECIPES, RunSpec, TrainConfig, dataset_base
from globalpool.lab.experiments.tune import chosen_config as tuning_config


class CompareError(ValueError):
    """Bad arguments or environment for ``compare``; the message is one line.

    ``option`` names the option whose value is bad (a usage error, exit 2), and prefixes the
    message; without it the error is one of running (exit 1).

    >>> str(CompareError("must be a positive int, got 0", "--seeds"))
    '--seeds: must be a positive int, got 0'
    """

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option


class Interrupted(KeyboardInterrupt):
    """A signal stopped the training; the message says what was kept."""


def parse_heads(text: str) -> list[str]:
    """``"all"`` or a comma list of head names, validated and de-duplicated.

    ``all`` is :data:`globalpool.HEADS`; the learned attention pools (``map``, ``simpool``,
    ``clip``: :data:`~globalpool.lab.models.base.LAB_HEADS`) run only when named.

    >>> parse_heads("avg, gem,avg")
    ['avg', 'gem']
    >>> parse_heads("avg,map,simpool,clip")
    ['avg', 'map', 'simpool', 'clip']
    """
    from globalpool import HEADS
    from globalpool.lab.models.base import LAB_HEADS

    expected = f"expected 'all' or some of: {', '.join(LAB_HEADS)}"
    if text.strip().lower() == "all":
        return list(HEADS)
    heads: list[str] = []
    for item in text.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in LAB_HEADS:
            raise CompareError(f"unknown head {name!r}; {expected}", "--heads")
        if name not in heads:
            heads.append(name)
    if not heads:
        raise CompareError(f"empty; {expected}", "--heads")
    return heads


def parse_train_sizes(text: str | None) -> list[int | None]:
    """Comma list of positive ints or ``full``; ``None`` means the full training set only.

    >>> parse_train_sizes("1000, 500,full")
    [500, 1000, None]
    """
    if text is None or not text.strip():
        return [None]
    sizes: list[int | None] = []
    for item in text.split(","):
        word = item.strip().lower()
        if not word:
            continue
        if word == "full":
            value: int | None = None
        else:
            try:
                value = int(word)
            except ValueError:
                value = 0
            if value < 1:
                raise CompareError(
                    f"must be positive integers or 'full', got {item.strip()!r}", "--train-sizes"
                )
        if value not in sizes:
            sizes.append(value)
    if not sizes:
        raise CompareError("empty; give positive integers or 'full'", "--train-sizes")
    return sorted(sizes, key=lambda s: float("inf") if s is None else s)


def check_dataset_name(dataset: str) -> str:
    """The dataset spec, stripped, if its name is known; else :class:`CompareError`.

    A ``folder:PATH`` comes back with ``PATH`` absolute: the runs record it, so ``cam`` reads
    the same images from any working directory."""
    from globalpool.lab.data.registry import absolute_spec

    base = dataset_base(dataset)
    if base not in DEFAULTS or (base == "folder") != (":" in dataset):
        names = "mnist1d, digits-shifted, cifar10, folder:PATH"
        raise CompareError(f"unknown dataset {dataset!r}; expected one of: {names}", "--dataset")
    return absolute_spec(dataset.strip())


def _fail(message: str, code: int = 1, usage: bool = False) -> Exception:
    """The one-line error to raise (:mod:`globalpool.lab.cli_errors`); silent on ranks > 0."""
    from globalpool.lab.cli_errors import CLIError, CLIUsageError
    from globalpool.lab.experiments import distributed

    error = CLIUsageError(message) if usage else CLIError(message, exit_code=code)
    if not distributed.is_main_process():
        return typer.Exit(error.exit_code)
    return error


def _message(err: BaseException) -> str:
    from globalpool.lab.data import DatasetError
    from globalpool.lab.experiments.execute import RunError
    from globalpool.lab.experiments.results import OutputError

    if isinstance(err, (CompareError, DatasetError, OutputError, RunError)):
        return str(err)
    if isinstance(err, MemoryError):
        return "out of memory; try a smaller --batch-size or fewer workers"
    return f"{type(err).__name__}: {err}"


def compare(
    dataset: Annotated[
        str,
        typer.Option(
            help="mnist1d, digits-shifted, cifar10 or folder:PATH (an image folder or a tar "
            "archive of one)."
        ),
    ] = "mnist1d",
    heads: Annotated[
        str,
        typer.Option(
            help="Comma list of heads (fc, avg, max, ..., nin) or 'all'; the learned attention "
            "pools map, simpool and clip run only when named."
        ),
    ] = "all",
    seeds: Annotated[int, typer.Option(help="Seeds per head (seeds 0 .. N-1).")] = 3,
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the full training set (default: per dataset)."),
    ] = None,
    train_sizes: Annotated[
        str | None,
        typer.Option(help="Comma list of training-set sizes for a sweep, e.g. 500,1000,full."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where dataset files live (CIFAR-10: DATA_DIR/cifar-10-batches-py/) or are cached "
            "(default: the cache dir, see --download)."
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(
            "--download",
            help="Allow downloading CIFAR-10 when its files are missing (the python-format "
            "archive, 163 MiB, md5-checked) into --data-dir, or without it into the cache dir: "
            "$GLOBALPOOL_CACHE_DIR, else $XDG_CACHE_HOME/globalpool, else ~/.cache/globalpool.",
        ),
    ] = False,
    out: Annotated[
        Path, typer.Option(help="Results directory (runs, results.md/.json, plots).")
    ] = Path("globalpool-results"),
    batch_size: Annotated[
        int | None, typer.Option(help="Global batch size (default: per dataset).")
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate (default: per dataset).")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="cnn1d, cnn2d, resnet18, resnet18-w16, multiscale or fastnet (default: per "
            "dataset or --recipe)."
        ),
    ] = None,
    recipe: Annotated[
        str | None,
        typer.Option(
            help="Named model and training settings instead of the dataset's defaults: "
            "cifar-cpu (quarter-width ResNet-18, 8 epochs, SGD, crop+flip, bfloat16; 8-10 min "
            "a run on one CPU core), cifar-resnet18 (full ResNet-18, 30 epochs; a GPU recipe) "
            "or cifar-gpu (FastNet, 12 epochs of batch 1024, label smoothing, flip TTA; a fast "
            "GPU recipe). "
            "--model, --epochs, --batch-size and --lr still override it."
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Parallel run processes (default: CPU cores / --threads; 1 on CUDA). "
            "Does not change any run's result."
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads each run trains on (default 1, so results do not depend on the "
            "worker count). Part of the cache key: runs on other thread counts are kept apart."
        ),
    ] = None,
    backend: Annotated[
        str, typer.Option(help="Pooling backend of the heads: torch, auto or fused.")
    ] = "torch",
    save_models: Annotated[
        bool,
        typer.Option(
            "--save-models/--no-save-models",
            help="Keep each run's trained weights (state_dict) beside its JSON record as .pt.",
        ),
    ] = True,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Train nothing: rewrite results.md/.json and the plots from the runs already "
            "in --out (the same options as the call that trained them); stop with an error, "
            "before any training, if any run (or tuning run) is missing.",
        ),
    ] = False,
    monitor: Annotated[
        bool,
        typer.Option(
            "--monitor",
            help="Record the head's pooled-feature statistics (gp.monitor: dead channels, std, "
            "GeM p, attention entropy) on a fixed test batch at the end of every epoch, in "
            "results.json and monitor.png. Part of the cache key.",
        ),
    ] = False,
    tune: Annotated[
        str | None,
        typer.Option(
            help="Tune each head's settings before training its seeds: 'lr' or 'lr,warmup'. "
            "Each grid point trains at --tune-budget of the epochs on 90% of the training set "
            "and is scored on the other 10% (never the test set); the head's seeds then train "
            "on the full training set at its best point. Tuning runs are cached under "
            "OUT/tuning/. See docs/compare.md."
        ),
    ] = None,
    tune_grid: Annotated[
        str | None,
        typer.Option(
            help="Grid for --tune, e.g. 'lr=0.005,0.01,0.02' or 'lr=x0.25,x1,x4;warmup=0,200' "
            "(xF: F times the recipe's lr; warmup in optimiser steps). Default: the recipe's "
            "lr times 1/8, 1/4, 1/2, 1, 2; warmup 0 and one epoch."
        ),
    ] = None,
    tune_budget: Annotated[
        float,
        typer.Option(help="Fraction of --epochs each tuning run trains (at least one epoch)."),
    ] = 0.25,
    tune_seeds: Annotated[
        int, typer.Option(help="Tuning runs per grid point and head (seeds 10000 ..).")
    ] = 1,
) -> None:
    """Train the same backbone once per head and seed; report accuracy (mean ± 95% CI),
    parameters, training time, peak memory and throughput as Markdown, JSON and PNG.
    Finished runs are cached in --out and reused by a later call made the same way. Ctrl-C
    stops at once and keeps every finished run (exit code 130; a second Ctrl-C skips any
    clean-up); run the same command again to train the rest. With --tune, each head's
    learning rate (and warm-up) is first picked on a validation split of the training set
    (Tuning in results.md)."""
    from globalpool.lab.experiments import interrupt

    try:
        with interrupt.stop_on_signals():
            try:
                _compare(
                    dataset=dataset,
                    heads=heads,
                    seeds=seeds,
                    epochs=epochs,
                    train_sizes=train_sizes,
                    device=device,
                    data_dir=data_dir,
                    download=download,
                    out=out,
                    batch_size=batch_size,
                    lr=lr,
                    model=model,
                    recipe=recipe,
                    workers=workers,
                    threads=threads,
                    backend=backend,
                    save_models=save_models,
                    report_only=report_only,
                    monitor=monitor,
                    tune=tune,
                    tune_grid=tune_grid,
                    tune_budget=tune_budget,
                    tune_seeds=tune_seeds,
                )
            except KeyboardInterrupt as err:  # still inside: a second signal exits at once
                raise _interrupted(err, interrupt.received(), out) from None
    except typer.Exit:
        raise
    except Exception as err:
        if debug():
            raise
        raise _fail(_message(err), usage=getattr(err, "option", None) is not None) from None


def _interrupted(err: KeyboardInterrupt, signum: int | None, out: Path) -> typer.Exit:
    from globalpool.lab.experiments import distributed
    from globalpool.lab.experiments.interrupt import exit_code, signal_name

    kept = str(err) if isinstance(err, Interrupted) else f"finished runs are kept under {out}"
    if distributed.is_main_process():
        print(f"\ninterrupted ({signal_name(signum)}): {kept}", file=sys.stderr, flush=True)
    return typer.Exit(exit_code(signum))


def _config(defaults: dict[str, Any], **options: Any) -> TrainConfig:
    config = defaults["config"]
    changes: dict[str, Any] = {}
    for name, value in options.items():
        if value is not None:
            changes[name] = value
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as err:  # "epochs must be a positive int, got 0"
        name, _, rest = str(err).partition(" ")
        raise CompareError(rest, f"--{name.replace('_', '-')}") from None


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """``--tune``, ``--tune-grid``, ``--tune-budget`` and ``--tune-seeds``, checked."""

    params: tuple[str, ...]
    grid: str | None
    budget: float
    seeds: int


def _tune_options(
    tune: str | None, grid: str | None, budget: float, seeds: int, config: TrainConfig
) -> TuneOptions | None:
    """The checked tuning options, or ``None`` without ``--tune`` (then the others are refused
    when set off their defaults)."""
    from globalpool.lab.experiments.tune import parse_grid, parse_tune

    if tune is None:
        for name, value, default in (
            ("--tune-grid", grid, None), ("--tune-budget", budget, 0.25),
            ("--tune-seeds", seeds, 1),
        ):
            if value != default:
                raise CompareError("needs --tune lr (or --tune lr,warmup)", name)
        return None
    params = parse_tune(tune)
    parse_grid(grid, params, recipe_lr=config.lr, epoch=1)  # refuse a bad grid before training
    if isinstance(budget, bool) or not (0 < budget <= 1):
        raise CompareError(f"must be a fraction in (0, 1], got {budget!r}", "--tune-budget")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"must be a positive int, got {seeds!r}", "--tune-seeds")
    return TuneOptions(params, grid, float(budget), seeds)


def _refuse_training(pending: list[RunSpec], planned: int, where: Path, what: str) -> None:
    """``--report-only``: a :class:`CompareError` naming the missing runs, if any."""
    if pending:
        raise CompareError(
            f"--report-only: {len(pending)} of {planned} {what} are not in {where} (e.g. "
            f"{pending[0].label}); nothing trained. Give the options of the call that trained "
            "them, or drop --report-only to train the missing ones"
        )


def _point_text(summary: dict[str, Any]) -> str:
    chosen = summary["chosen"]
    text = f"lr {chosen['lr']:g}" + (f" warmup {chosen['warmup']}" if chosen["warmup"] else "")
    return text + (" (every grid point diverged: recipe)" if summary["all_diverged"] else "")


def _tune(
    ctx: Any,
    tuning: TuneOptions,
    *,
    dataset: str,
    head_list: list[str],
    sizes: list[int | None],
    config: TrainConfig,
    model_name: str,
    torch_device: Any,
    data: Any,
    data_dir: Path | None,
    out: Path,
    workers: int | None,
    threads: int,
    report_only: bool = False,
) -> dict[str, Any]:
    """Run (or reuse) every tuning run and pick each head's grid point (:mod:`.tune`).

    Returns ``{"by_head": {head: summary}, "meta": results.json's ``meta.tuning``}``, the same
    on every rank.
    """
    import math

    from globalpool.lab.experiments import distributed
    from globalpool.lab.experiments import tune as T
    from globalpool.lab.experiments.execute import (
        DataSource,
        run_parallel,
        run_sequential,
        usable_cpus,
    )
    from globalpool.lab.experiments.progress import RichSink
    from globalpool.lab.experiments.provenance import current_env
    from globalpool.lab.experiments.results import ResultStore
    from globalpool.lab.experiments.runner import total_steps

    # The tuning runs see only this split: its training set is 90% of the training set and
    # its one evaluation set the other 10%; the test sets are not in it.
    split = T.carve_validation(data)
    epoch = math.ceil(data.train_size / config.batch_size)
    grid = T.parse_grid(tuning.grid, tuning.params, recipe_lr=config.lr, epoch=epoch)
    largest = None if None in sizes else max(s for s in sizes if s is not None)
    size = None if largest is None or largest >= split.train_size else largest
    env = current_env(torch_device, threads, ctx.world_size, split)
    root = Path(out).expanduser() / "tuning"
    store = ResultStore(root, save_models=False)
    plan = T.tuning_plan(
        dataset=dataset,
        model=model_name,
        heads=head_list,
        grid=grid,
        config=config,
        budget=tuning.budget,
        seeds=tuning.seeds,
        train_size=size,
        env=env,
    )
    pending = [spec for spec in plan if store.load(spec) is None] if ctx.is_main else None
    pending = distributed.broadcast_object(pending, ctx)
    if report_only:
        _refuse_training(pending, len(plan), root, "tuning runs")
    if ctx.enabled or torch_device.type == "cuda":
        n_workers = 1
    else:
        n_workers = min(workers or max(1, usable_cpus() // threads), max(1, len(pending)))
    try:
        with RichSink(
            len(plan), len(plan) - len(pending), enabled=ctx.is_main, title="tuning runs",
            metric="val acc",
        ) as sink:
            if ctx.is_main and len(pending) < len(plan):
                sink.note(
                    f"{len(plan) - len(pending)} of {len(plan)} tuning runs already in {root}; "
                    "skipped"
                )
            if n_workers > 1:
                source = T.DataSplitSource(
                    DataSource(dataset, None if data_dir is None else str(data_dir))
                )
                run_parallel(
                    pending, source, store=store, device=torch_device, workers=n_workers,
                    sink=sink,
                )
            else:
                run_sequential(
                    pending, split, store=store, device=torch_device, ctx=ctx, sink=sink
                )
    except KeyboardInterrupt:
        done = sum(store.load(spec) is not None for spec in plan) if ctx.is_main else 0
        raise Interrupted(
            f"{done} of {len(plan)} tuning runs are finished and kept under {root} "
            f"({done - (len(plan) - len(pending))} trained by this call); run the same command "
            f"again to train the other {len(plan) - done}, then the runs"
        ) from None
    distributed.barrier(ctx)

    result: dict[str, Any] | None = None
    if ctx.is_main:
        loaded = {spec: store.load(spec) for spec in plan}
        missing = [spec.label for spec, rec in loaded.items() if rec is None]
        if missing:
            raise CompareError(
                f"results of {len(missing)} tuning runs are missing, e.g. {missing[0]}"
            )
        trained = set(pending)
        chance = T.chance_level(split)
        recipe = T.Point(config.lr, config.warmup)
        heads = []
        for head in head_list:
            runs: dict[Any, list[dict[str, Any]]] = {p: [] for p in grid.points()}
            for spec, rec in loaded.items():
                if spec.head == head:
                    point = T.Point(spec.config.lr, spec.config.warmup)
                    runs[point].append({**rec, "reused": spec not in trained})
            heads.append(T.select(head, runs, recipe, chance))
        tune_config = plan[0].config
        meta = {
            "params": list(tuning.params),
            "grid": grid.to_dict(),
            "rule": T.RULE,
            "recipe": {"lr": config.lr, "warmup": config.warmup},
            "budget": tuning.budget,
            "epochs": tune_config.epochs,
            "steps": total_steps(tune_config, split.train_size),
            "seeds": [T.TUNE_SEED_BASE + k for k in range(tuning.seeds)],
            "train_size": split.train_size if size is None else size,
            "validation": {**split.info["validation"], "chance": chance},
            "dir": "tuning",  # under --out, beside results.json
            "env": dataclasses.asdict(env),
            "runs": len(plan),
            "runs_this_call": len(pending),
            "runs_reused": len(plan) - len(pending),
            "heads": heads,
        }
        result = {"meta": meta, "by_head": {h["head"]: h for h in heads}}
    return distributed.broadcast_object(result, ctx)


def _compare(
    *,
    dataset: str,
    heads: str,
    seeds: int,
    epochs: int | None,
    train_sizes: str | None,
    device: str,
    data_dir: Path | None,
    download: bool,
    out: Path,
    batch_size: int | None,
    lr: float | None,
    model: str | None,
    workers: int | None,
    threads: int | None,
    backend: str,
    save_models: bool = True,
    report_only: bool = False,
    monitor: bool = False,
    recipe: str | None = None,
    tune: str | None = None,
    tune_grid: str | None = None,
    tune_budget: float = 0.25,
    tune_seeds: int = 1,
) -> None:
    started = time.perf_counter()
    # 1. Arguments: cheap checks, identical on every rank, before anything is created.
    dataset = check_dataset_name(dataset)
    base = dataset_base(dataset)
    head_list = parse_heads(heads)
    sizes = parse_train_sizes(train_sizes)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise CompareError(f"must be a positive int, got {seeds!r}", "--seeds")
    if workers is not None and workers < 1:
        raise CompareError(f"must be a positive int, got {workers!r}", "--workers")
    if threads is not None and threads < 1:
        raise CompareError(f"must be a positive int, got {threads!r}", "--threads")
    if recipe is not None and recipe not in RECIPES:
        raise CompareError(f"must be one of {', '.join(RECIPES)}; got {recipe!r}", "--recipe")
    defaults = DEFAULTS[base] if recipe is None else RECIPES[recipe]
    config = _config(
        defaults, epochs=epochs, batch_size=batch_size, lr=lr, backend=backend,
        monitor=monitor or None,
    )
    tuning = _tune_options(tune, tune_grid, tune_budget, tune_seeds, config)

    from globalpool.lab.experiments import distributed
    from globalpool.lab.experiments.runner import resolve_device
    from globalpool.lab.models import resolve_model_name

    try:
        model_name = resolve_model_name(model if model is not None else defaults["model"])
    except ValueError as err:  # "model must be one of ..."
        raise CompareError(str(err).removeprefix("model "), "--model") from None
    if device.strip().lower() not in ("auto", "cpu", "cuda"):
        raise CompareError(f"must be one of cpu, cuda, auto; got {device!r}", "--device")
    try:
        torch_device = resolve_device(device)
    except ValueError as err:  # CUDA asked for but absent: the machine, not the value
        raise CompareError(str(err)) from None

    ctx = distributed.init_distributed(torch_device.type)
    try:
        _run(
            ctx,
            dataset=dataset,
            head_list=head_list,
            seeds=seeds,
            sizes=sizes,
            config=config,
            model_name=model_name,
            torch_device=torch_device,
            data_dir=data_dir,
            download=download,
            out=out,
            workers=workers,
            threads=threads,
            started=started,
            save_models=save_models,
            tuning=tuning,
            report_only=report_only,
        )
    finally:
        distributed.shutdown(ctx)


def _run(
    ctx: Any,
    *,
    dataset: str,
    head_list: list[str],
    seeds: int,
    sizes: list[int | None],
    config: TrainConfig,
    model_name: str,
    torch_device: Any,
    data_dir: Path | None,
    download: bool,
    out: Path,
    workers: int | None,
    threads: int | None,
    started: float,
    save_models: bool = True,
    tuning: TuneOptions | None = None,
    report_only: bool = False,
) -> None:
    import torch

    from globalpool.lab.data import load_dataset
    from globalpool.lab.experiments import distributed
    from globalpool.lab.experiments.execute import (
        DataSource,
        run_parallel,
        run_sequential,
        usable_cpus,
    )
    from globalpool.lab.experiments.labels import describe_test_sets, labels_of
    from globalpool.lab.experiments.provenance import current_env
    from globalpool.lab.experiments.report import markdown_table, summarize, write_report
    from globalpool.lab.experiments.results import ResultStore, check_writable
    from globalpool.lab.experiments.runner import total_steps
    from globalpool.lab.models import build_model

    if ctx.enabled and torch_device.type == "cuda":
        torch_device = torch.device("cuda", ctx.local_rank)

    # 2. Output and data: rank 0 proves --out writable before anything is trained; every rank
    #    loads the data; any rank's failure stops all of them with the same message.
    error: str | None = None
    data = None
    try:
        if ctx.is_main:
            check_writable(out)
        # CIFAR-10 is downloaded (into --data-dir or the cache dir) only with --download.
        data = load_dataset(dataset, data_dir=data_dir, download=download)
        for size in sizes:
            if size is not None and size > data.train_size:
                raise CompareError(
                    f"--train-sizes {size} exceeds the {data.train_size} training samples "
                    f"of {dataset}"
                )
        try:
            build_model(
                model_name,
                "avg",
                data.num_classes,
                in_channels=data.in_channels,
                spatial_size=data.input_shape[1:],
            )
        except ValueError as err:
            raise CompareError(f"model {model_name} does not fit {dataset}: {err}") from None
    except Exception as err:
        if debug():
            raise
        error = _message(err)
    error = distributed.first_error(error, ctx)
    if error is not None:
        raise CompareError(error)
    assert data is not None

    # The full size is one run whether it is asked for as "full" or by its number.
    sizes = list(dict.fromkeys(None if s == data.train_size else s for s in sizes))

    # 3. Plan: rank 0 decides what is left to run; every rank gets the same list. How a run is
    #    made (threads for the math, processes, device, versions, data) is part of its cache
    #    key; each run trains on one thread by default, so the worker count cannot change it.
    threads = threads or 1
    env = current_env(torch_device, threads, ctx.world_size, data)
    store = ResultStore(out, save_models=save_models)
    configs = {head: config for head in head_list}
    tuned: dict[str, Any] | None = None
    if tuning is not None:  # 3a. Each head's settings, on the validation split (tune.py).
        tuned = _tune(
            ctx,
            tuning,
            dataset=dataset,
            head_list=head_list,
            sizes=sizes,
            config=config,
            model_name=model_name,
            torch_device=torch_device,
            data=data,
            data_dir=data_dir,
            out=out,
            workers=workers,
            threads=threads,
            report_only=report_only,
        )
        configs = {h: tuning_config(config, s) for h, s in tuned["by_head"].items()}
    # Seed-major order: each head's runs are spread over the whole call, so a busy spell on a
    # shared machine slows every head a little rather than one head a lot.
    plan = [
        RunSpec(dataset, model_name, head, seed, size, configs[head], env)
        for size in sizes
        for seed in range(seeds)
        for head in head_list
    ]
    pending = [spec for spec in plan if store.load(spec) is None] if ctx.is_main else None
    pending = distributed.broadcast_object(pending, ctx)
    if report_only:
        _refuse_training(pending, len(plan), out, "runs")

    if ctx.enabled or torch_device.type == "cuda":
        n_workers = 1
    else:
        n_workers = min(workers or max(1, usable_cpus() // threads), max(1, len(pending)))

    # 4. Train what is pending, saving each run as it finishes.
    from globalpool.lab.experiments.progress import RichSink

    try:
        with RichSink(len(plan), len(plan) - len(pending), enabled=ctx.is_main) as sink:
            if ctx.is_main and len(pending) < len(plan):
                sink.note(
                    f"{len(plan) - len(pending)} of {len(plan)} runs already in {out}; skipped"
                )
            if n_workers > 1:
                source = DataSource(dataset, None if data_dir is None else str(data_dir))
                run_parallel(
                    pending, source, store=store, device=torch_device, workers=n_workers, sink=sink
                )
            else:
                run_sequential(pending, data, store=store, device=torch_device, ctx=ctx, sink=sink)
    except KeyboardInterrupt:
        done = sum(store.load(spec) is not None for spec in plan) if ctx.is_main else 0
        raise Interrupted(
            f"{done} of {len(plan)} runs are finished and kept under {out} "
            f"({done - (len(plan) - len(pending))} trained by this call); run the same command "
            f"again to train the other {len(plan) - done}"
        ) from None
    distributed.barrier(ctx)
    if not ctx.is_main:
        return

    # 5. Report every run of the plan (this call's and earlier ones').
    loaded = [store.load(spec) for spec in plan]
    missing = [spec.label for spec, rec in zip(plan, loaded, strict=True) if rec is None]
    if missing:
        raise CompareError(f"results of {len(missing)} runs are missing, e.g. {missing[0]}")
    trained = set(pending)
    records = [
        {**rec, "reused": spec not in trained} for spec, rec in zip(plan, loaded, strict=True)
    ]
    test_sets = describe_test_sets(dataset, {k: len(y) for k, (_, y) in data.test_sets().items()})
    meta = {
        "dataset": dataset,
        "model": model_name,
        "heads": head_list,
        "seeds": seeds,
        "train_sizes": [data.train_size if s is None else s for s in sizes],
        "config": dataclasses.asdict(config),
        "steps": total_steps(config, data.train_size),
        "device": str(torch_device),
        "world_size": ctx.world_size,
        "workers": n_workers,
        "threads": threads,
        "env": dataclasses.asdict(env),
        "test_size": len(data.y_test),
        "test_sets": test_sets,
        "memory_method": records[0].get("memory_method") if records else None,
        "runs_this_call": len(pending),
        "runs_reused": len(plan) - len(pending),
        "wall_time_s": time.perf_counter() - started,
        **({} if tuned is None else {"tuning": tuned["meta"]}),
        "generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "globalpool": env.globalpool,
    }
    paths = write_report(Path(out).expanduser(), records, meta)
    from globalpool.lab.experiments.report import tuned_settings

    print(markdown_table(summarize(records), labels_of(meta), tuned_settings(meta)), end="")
    written = ", ".join(str(p) for p in paths.values())
    if tuned is not None:
        meta_t = tuned["meta"]
        print(
            f"\ntuning: {meta_t['runs_this_call']} tuning runs trained, "
            f"{meta_t['runs_reused']} reused; chosen: "
            + ", ".join(
                f"{h['head']} {_point_text(h)}" for h in meta_t["heads"]
            )
        )
    print(f"\n{len(pending)} runs trained, {len(plan) - len(pending)} reused; wrote {written}")
