"""The fused CPU kernels at another lane width and vector ISA than this machine's.

The suite itself runs the kernels as built for this machine (512-bit lanes; AVX-512 or AVX2
registers, as the CPU has). A child process builds them again with 128-bit lanes (4 float32)
and, on an x86 machine, for AVX2 (``x86-64-v3``), and checks every kind with a grid kernel
and the packed kernels against the NumPy reference there (``tests/lane_width_cases.py``).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from globalpool.kernels import _HAS_NUMBA

pytestmark = pytest.mark.skipif(not _HAS_NUMBA, reason="numba is not installed")
HERE = Path(__file__).parent


def test_kernels_match_the_reference_at_128_bit_lanes_for_avx2():
    env = {**os.environ, "GLOBALPOOL_LANE_BITS": "128"}
    if platform.machine().lower() in ("x86_64", "amd64"):
        env.update(NUMBA_CPU_NAME="x86-64-v3", NUMBA_CPU_FEATURES="+avx2")
    done = subprocess.run(
        [sys.executable, str(HERE / "lane_width_cases.py")], env=env, cwd=HERE,
        capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("ok 104 "), done.stdout
    assert "'lane_bits': 128" in done.stdout


def test_a_lane_width_the_kernels_do_not_take_is_refused_by_name():
    env = {**os.environ, "GLOBALPOOL_LANE_BITS": "300"}
    code = "from globalpool.kernels import launch; launch.lane_bits()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode != 0
    assert "GLOBALPOOL_LANE_BITS='300' is not a lane width the kernels take" in done.stderr
    assert "expected 128, 256, 512 or 1024" in done.stderr
