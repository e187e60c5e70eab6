"""How parallel kernels are built and launched: a body per kernel, one shared parallel loop.

A kernel's ``prange`` loops become phases, launched one after the other on numba's pool through
one parallel loop that every kernel shares; its body (a C function reading the arguments
through a pointer) runs one slice of one phase serially. These tests hold that
transformation to the kernel's plain meaning (any number of slices, serial or parallel,
``continue`` of the parallel loop and of inner loops, branches around a loop, values from before
the loop), and check that each piece is compiled once and the caller's arrays are borrowed.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from numba import prange

from globalpool.kernels import launch


def _toy(x, out, mode, scale):  # pragma: no cover - compiled by numba
    n = x.shape[0]
    offset = 10.0 * scale
    for i in prange(n):
        if x[i] < 0:
            out[i] = -1.0
            continue  # the parallel loop's own: ends this iteration of the slice
        s = 0.0
        for j in range(x.shape[0]):
            if j == i:
                continue  # an inner loop's: stays
            s += x[j]
        out[i] = s + offset if mode == 1 else s - offset
    if mode == 1:
        for i in prange(n):  # a second phase, after the first has finished everywhere
            out[i] *= 2.0


def _expected(x: np.ndarray, mode: int, scale: float) -> np.ndarray:
    out = np.empty_like(x)
    for i, v in enumerate(x):
        if v < 0:
            out[i] = -1.0
            continue
        s = x.sum() - v
        out[i] = s + 10.0 * scale if mode == 1 else s - 10.0 * scale
    return out * 2.0 if mode == 1 else out


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("parts", [1, 2, 3, 16])
@pytest.mark.parametrize("serial", [False, True])
@pytest.mark.parametrize("noalias", [False, True])
def test_kernel_equals_its_meaning(mode, parts, serial, noalias, monkeypatch):
    monkeypatch.setitem(launch._state, "serial", serial)
    monkeypatch.setitem(launch._state, "parts", 1 if serial else parts)
    kernel = launch.parallel_kernel(("mode",), noalias=noalias)(_toy)
    x = np.array([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0])
    out = np.zeros_like(x)
    kernel(x, out, mode, 0.5)
    np.testing.assert_allclose(out, _expected(x, mode, 0.5))


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("parts", [1, 2, 5, 9])
def test_generated_body_means_the_kernel(mode, parts):
    """Run in plain Python as the launcher runs it: every slice of each phase, phase by phase;
    the slices cover a loop's range once (9 parts for 7 iterations: some empty); the pinned
    mode wins over the argument, and a loop its branch excludes is no phase."""
    name = f"toy__{mode}__body"
    namespace = {**_toy.__globals__, "_gp_unpack": lambda address, argtypes: address, "_gp_args": 0}
    code, phases = launch._generate(_toy, name, {"mode": mode}, "body")
    exec(code, namespace)
    assert phases == (2 if mode == 1 else 1)
    x = np.array([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0])
    out = np.zeros_like(x)
    for phase in range(phases):
        for part in range(parts):
            namespace[name]((x, out, 0.5), phase, part, parts)
    np.testing.assert_allclose(out, _expected(x, mode, 0.5))


def test_prange_loops_of_other_forms_are_refused():
    def pair(x):  # pragma: no cover - never compiled
        for i, j in prange(3):
            x[i] = j

    def start_stop(x):  # pragma: no cover
        for i in prange(1, 3):
            x[i] = 0

    def nested(x):  # pragma: no cover
        for i in prange(3):
            for j in prange(3):
                x[i] = j

    def serial_only(x):  # pragma: no cover
        for i in range(3):
            x[i] = 0

    for fn, message in [
        (pair, "one index name"), (start_stop, "one argument"), (nested, "inside a prange"),
        (serial_only, "needs a prange loop"),
    ]:
        with pytest.raises(TypeError, match=message):
            launch._generate(fn, "f__", {}, "body")


@pytest.mark.parametrize("noalias", [False, True])
def test_one_body_per_argument_types_and_arrays_are_borrowed(noalias):
    kernel = launch.parallel_kernel(("mode",), noalias=noalias)(_toy)
    x = np.array([1.0, 2.0, 3.0])
    before = sys.getrefcount(x)
    for scale in (0.5, 2, np.int64(2)):  # 2 and np.int64(2): two Python types, one numba type
        out = np.zeros(3)
        kernel(x, out, 1, scale)
        np.testing.assert_allclose(out, _expected(x, 1, scale))
    kernel(x.astype(np.float32), np.zeros(3, np.float32), 1, 0.5)
    kernel(x, np.zeros(3), 0, 0.5)
    assert len(kernel._bodies) == 5 and len(kernel._by_name) == 4  # one body per numba types
    assert sys.getrefcount(x) == before  # nothing kept, nothing released twice


_COUNT_COMPILES = """
import sys, torch
import globalpool as gp
from globalpool.kernels import cpu_kernels as K, launch
kind, layout = sys.argv[1], sys.argv[2]
shape = (2, 64, 300, 300) if layout == "channels_first" else (2, 300, 300, 64)
for dtype in (torch.float32, torch.float32, torch.bfloat16):
    x = torch.rand(shape, dtype=dtype, requires_grad=True)
    gp.pool(x, kind, layout=layout, backend="fused").sum().backward()
for k in vars(K).values():
    if isinstance(k, launch.ParallelKernel) and k._bodies:
        print(k.__name__, len(k._by_name))
print("run", len(launch._runner(K.CACHE)[0].overloads))
"""


@pytest.mark.parametrize("kind,layout", [("max", "channels_first"), ("avg", "channels_last")])
def test_each_piece_of_a_real_kernel_compiles_once(kind, layout, tmp_path):
    """Per kernel used, one body per dtype; the launcher typed once per kernel and dtype (the
    tied-rows kernel too, where bfloat16's rounding made ties). (In a fresh process with an empty cache, so that the kernels are
    compiled, not loaded.)"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_COMPILES, kind, layout],
        env=env, capture_output=True, text=True, check=True,
    )
    counts = {k: int(v) for k, v in (line.split() for line in proc.stdout.splitlines())}
    run = counts.pop("run")
    main = {k: v for k, v in counts.items() if k != "bwd_tied"}  # bwd_tied: where ties occur
    assert len(main) == 2 and set(main.values()) == {2}, counts  # forward and backward
    assert run == sum(counts.values()), proc.stdout + proc.stderr


def test_kernels_are_cached_under_their_helpers_digest(monkeypatch):
    """numba keys a cached kernel on its own file only: a kernel naming ``helpers`` has their
    digest in the names it is cached under, so that an edited helper module gives new names
    (a fresh compile) instead of loading code built against the old helpers."""
    helpers = (sys.modules[__name__],)  # any module: its digest is stood in for below
    x = np.array([1.0, 2.0, 3.0])
    names = []
    for digest in ("before", "after"):
        monkeypatch.setattr(launch, "_digest", lambda helpers, d=digest: d if helpers else "")
        kernel = launch.parallel_kernel(("mode",), helpers=helpers)(_toy)
        out = np.zeros(3)
        kernel(x, out, 0, 0.5)
        np.testing.assert_allclose(out, _expected(x, 0, 0.5))
        names.append(set(kernel._by_name))
    assert names[0].isdisjoint(names[1])


def test_every_cpu_kernel_names_the_shared_helpers():
    """Each kernel of the grid and packed families inlines cpu_simd's helpers, so each names it
    (see above); the serial kernels too, in the name numba caches them under."""
    from globalpool.kernels import cpu_kernels, cpu_packed, cpu_simd

    parallel = serial = 0
    for module in (cpu_kernels, cpu_packed):
        for obj in vars(module).values():
            if isinstance(obj, launch.ParallelKernel):
                assert obj._helpers == (cpu_simd,), obj.__name__
                parallel += 1
            elif hasattr(obj, "py_func") and obj.py_func.__module__ == module.__name__:
                if obj.targetoptions.get("inline") == "always":
                    continue  # a helper, inlined into a kernel (its code is in the kernel's)
                assert obj.py_func.__qualname__.endswith(
                    f"__{launch._digest((cpu_simd,))}"
                ) or not module.CACHE, obj.py_func.__qualname__
                serial += 1
    assert parallel >= 13 and serial >= 1
    assert cpu_simd.CACHE == cpu_kernels.CACHE == cpu_packed.CACHE  # one directory, one verdict
