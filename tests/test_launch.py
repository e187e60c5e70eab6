"""How parallel kernels are built: compile-time modes and outlined ``prange`` loop bodies.

A kernel's parallel build runs each ``prange`` loop over a call to its body, compiled apart (a
first call compiles in a fraction of the time). These tests hold that transformation to the
kernel's plain meaning: the same results as the serial build, ``continue`` of the parallel loop
and of inner loops kept apart, values from before the loop carried in, and each body compiled
once (a body typed two ways compiles twice, which undoes the gain).
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
            continue  # the parallel loop's own: becomes a return in the outlined body
        s = 0.0
        for j in range(x.shape[0]):
            if j == i:
                continue  # an inner loop's: stays
            s += x[j]
        out[i] = s + offset if mode == 1 else s - offset
    if mode == 1:
        for i in prange(n):
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
@pytest.mark.parametrize("serial", [False, True])
def test_outlined_kernel_equals_its_meaning(mode, serial, monkeypatch):
    monkeypatch.setitem(launch._state, "serial", serial)
    kernel = launch.parallel_kernel(("mode",), parallel=True)(_toy)
    x = np.array([1.0, -2.0, 3.0, 4.0, -5.0, 6.0, 7.0])
    out = np.zeros_like(x)
    kernel(x, out, mode, 0.5)
    np.testing.assert_allclose(out, _expected(x, mode, 0.5))


def test_parallel_build_outlines_each_prange_loop():
    code, bodies = launch._specialised(_toy, "toy__1", {"mode": 1}, outline=True)
    assert bodies == ["toy__1__loop0", "toy__1__loop1"]
    namespace = {"prange": range, launch._INDEX: int}
    exec(code, namespace)
    x = np.array([1.0, -2.0, 3.0])
    out = np.zeros_like(x)
    namespace["toy__1"](x, out, 0, 0.5)  # the pinned mode wins over the argument
    np.testing.assert_allclose(out, _expected(x, 1, 0.5))


def test_serial_build_is_not_outlined():
    _, bodies = launch._specialised(_toy, "toy__0_serial", {"mode": 0}, outline=False)
    assert bodies == []


def test_a_prange_loop_needs_one_index_name():
    def bad(x):  # pragma: no cover - never compiled
        for i, j in prange(3):
            x[i] = j

    with pytest.raises(TypeError, match="one index name"):
        launch._specialised(bad, "bad__", {}, outline=True)


_COUNT_BODIES = """
import sys, torch
import globalpool as gp
from globalpool.kernels import cpu_kernels as K, launch
kind, layout = sys.argv[1], sys.argv[2]
shape = (2, 64, 300, 300) if layout == "channels_first" else (2, 300, 300, 64)
x = torch.rand(shape, requires_grad=True)
gp.pool(x, kind, layout=layout, backend="fused").sum().backward()
for k in vars(K).values():
    if isinstance(k, launch.ParallelKernel):
        for disp in k._entries.values():
            ns = disp.py_func.__globals__
            for name, body in ns.items():
                if name.startswith(disp.py_func.__name__ + "__loop"):
                    print(name, len(body.overloads))
"""


@pytest.mark.parametrize("kind,layout", [("max", "channels_first"), ("avg", "channels_last")])
def test_each_loop_body_of_a_real_kernel_compiles_once(kind, layout, tmp_path):
    """The body is typed by the kernel (constants as literals, the index as int64) and again
    inside numba's parallel loop (plain ints, a uint64 index): one signature for both. (In a
    fresh process with an empty cache, so that the kernels are compiled, not loaded.)"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", _COUNT_BODIES, kind, layout],
        env=env, capture_output=True, text=True, check=True,
    )
    counts = dict(line.split() for line in proc.stdout.splitlines())
    assert counts, proc.stdout + proc.stderr
    assert set(counts.values()) == {"1"}, counts
