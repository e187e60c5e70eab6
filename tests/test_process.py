"""The fused CPU kernels across processes and threads, and without a writable cache.

Each case runs in a fresh interpreter (subprocess) so that numba's threading layer and cache
start from scratch, as in a user's program: a ``fork()``ed child (``os.fork``, a
``multiprocessing`` fork pool, ``DataLoader`` workers) pools on the fused path after its parent
did; two threads pool at once; a read-only install (the package imported from a zip file, no
writable cache directory) compiles in memory with one warning.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

PRELUDE = """
import os, sys, numpy as np, torch, globalpool as gp

def pooled(seed, layout="channels_first"):
    # NumPy for the input and the reference: torch's own OpenMP pool is not fork-safe (a child
    # of a parent that ran a parallel torch op hangs in its next one, fused kernels or not)
    shape = (4, 64, 32, 32) if layout == "channels_first" else (4, 32, 32, 64)
    x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    got = gp.pool(torch.from_numpy(x), "max", layout=layout, backend="fused")  # 256K elements:
    axes = (2, 3) if layout == "channels_first" else (1, 2)  # the parallel path
    return bool(np.array_equal(got.numpy(), x.max(axis=axes)))
"""


def _run(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "NUMBA_THREADING_LAYER"}
    base["PYTHONPATH"] = os.pathsep.join([str(SRC), base.get("PYTHONPATH", "")])
    base.update(env or {})
    script = textwrap.dedent(PRELUDE) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], env=base, capture_output=True, text=True, timeout=timeout
    )


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_os_fork_child_pools_on_the_fused_path():
    out = _ok(
        _run("""
        assert pooled(0)
        pid = os.fork()
        if pid == 0:
            os._exit(0 if pooled(1) and pooled(2, "channels_last") else 3)
        _, status = os.waitpid(pid, 0)
        print("child", os.waitstatus_to_exitcode(status))
        """)
    )
    assert "child 0" in out


def test_multiprocessing_fork_pool_pools_on_the_fused_path():
    out = _ok(
        _run("""
        import multiprocessing as mp
        assert pooled(0)
        with mp.get_context("fork").Pool(2) as pool:
            print("results", pool.map_async(pooled, range(4), chunksize=1).get(timeout=300))
        """)
    )
    assert "results [True, True, True, True]" in out


def test_dataloader_fork_workers_pool_on_the_fused_path():
    out = _ok(
        _run("""
        from torch.utils.data import DataLoader, Dataset

        class Pooled(Dataset):
            def __len__(self):
                return 4

            def __getitem__(self, i):
                return pooled(i)

        assert pooled(0)
        loader = DataLoader(Pooled(), batch_size=None, num_workers=2,
                            multiprocessing_context="fork", timeout=300)
        print("results", [bool(b) for b in loader])
        """)
    )
    assert "results [True, True, True, True]" in out


@pytest.mark.parametrize("layer", [None, "workqueue"])
def test_two_threads_pool_at_once(layer):
    """Also under workqueue, where two launches at once would abort the process."""
    out = _ok(
        _run(
            """
        import threading
        from globalpool.kernels import launch
        results = []

        def work(seed):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(4, 64, 32, 32, generator=g, requires_grad=True)
            for kind in ("max", "avg", "gem", "lse") * 5:
                y = gp.pool(x, kind, backend="fused")
                (gx,) = torch.autograd.grad(y.sum(), x)
                ref = gp.pool(x, kind, backend="torch")
                (rx,) = torch.autograd.grad(ref.sum(), x)
                results.append(torch.allclose(y, ref, rtol=1e-4, atol=1e-5)
                               and torch.allclose(gx, rx, rtol=1e-3, atol=1e-5))

        threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("layer", launch.layer_info()[0], "ok", len(results), all(results))
        """,
            env={"NUMBA_THREADING_LAYER": layer} if layer else None,
        )
    )
    assert "ok 40 True" in out
    if layer:
        assert f"layer {layer} " in out


def test_user_threading_layer_is_respected():
    out = _ok(
        _run(
            """
            from globalpool.kernels import launch
            assert pooled(0)
            print("layer", launch.layer_info())
            """,
            env={"NUMBA_THREADING_LAYER": "workqueue"},
        )
    )
    assert "layer ('workqueue', False)" in out


def test_read_only_install_compiles_in_memory_with_one_warning(tmp_path):
    """The package imported from a zip file: no ``__pycache__`` can be made beside the source,
    and with HOME and XDG_CACHE_HOME on a non-directory no user cache either (even as root)."""
    archive = tmp_path / "site.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (SRC / "globalpool").rglob("*"):
            if "__pycache__" not in path.parts and path.is_file():
                zf.write(path, path.relative_to(SRC).as_posix())
    env = {
        k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_THREADING_LAYER")
    }
    env.update(HOME="/dev/null", XDG_CACHE_HOME="/dev/null", PYTHONPATH=str(archive))
    script = textwrap.dedent(PRELUDE) + textwrap.dedent("""
        import warnings
        assert gp.__file__.startswith(sys.argv[1]), gp.__file__
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ok = pooled(0) and pooled(1)
        texts = [str(w.message) for w in caught if "cache" in str(w.message)]
        print("ok", ok, "warnings", len(texts), "NUMBA_CACHE_DIR" in texts[0])
        """)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(archive)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert "ok True warnings 1 True" in _ok(proc)


@pytest.mark.parametrize("kind", ["avg"])
def test_warmup_compiles_the_selection(kind, tmp_path):
    from typer.testing import CliRunner

    from globalpool.lab.cli import app

    result = CliRunner().invoke(
        app, ["warmup", "--kind", kind, "--layout", "channels_first", "--dtype", "float32"]
    )
    assert result.exit_code == 0, result.output
    assert "avg" in result.output and "channels_first" in result.output
    assert "cache" in result.output
    from globalpool.warmup import kernel_target

    target = kernel_target()
    assert f"built for: {target['cpu']} ({target['register_bits']}-bit" in result.output
