"""The fused CPU kernels against the NumPy reference at the lane width and target CPU of this
process's environment (``GLOBALPOOL_LANE_BITS``, ``NUMBA_CPU_NAME``, ``NUMBA_CPU_FEATURES``).

Run by ``tests/test_lane_width.py`` in a child process (numba reads those variables once, at
import). Sizes put tails, several chunks and the long-row and register paths at 4 float32 lanes
(128 bits) as well as at 16: rows of 1, 7, 37 and 300 positions (the channels-first max splits
rows of > 64 vectors, lse takes 32 vector pairs per chunk), 2,100 channels-last positions (past
the 2,048-position span of the two-level sums), 5, 17 and 33 channels (the channels-last max
keeps up to 4 vectors of channels in registers). Prints "ok <count>" when every case matches.
"""

from __future__ import annotations

import sys

import torch

import globalpool as gp
from globalpool import kernels
from globalpool.warmup import FUSED_KINDS, kernel_target
from helpers import KIND_PARAMS, check_against_reference, make_input, make_mask, make_weights

CASES = (  # (n, c, length, mask)
    (3, 5, 1, "none"),
    (2, 17, 7, "random"),
    (3, 33, 37, "empty"),
    (2, 6, 300, "random"),
    (2, 5, 2100, "none"),
)


def _fused(x, kind, layout, mask, keepdim, **params):
    return gp.pool(x, kind, layout=layout, mask=mask, keepdim=keepdim, backend="fused", **params)


def main() -> int:
    count = 0
    for dtype in (torch.float32, torch.bfloat16):
        # bfloat16 (16-bit loads and stores, masked at tails) through two kinds: the loads and
        # stores are the same helpers in every kernel; float32 through every kind
        kinds = FUSED_KINDS if dtype == torch.float32 else ("avg", "max")
        for layout in ("channels_first", "channels_last"):
            for seed, (n, c, length, mask_mode) in enumerate(CASES):
                x = make_input(n, c, (length,), layout, dtype, seed=seed)
                mask = make_mask(n, (length,), mask_mode, seed=seed)
                for kind in kinds:
                    params = dict(KIND_PARAMS.get(kind, {}))
                    if kind == "attention":
                        params["weights"] = make_weights(x, layout, seed).requires_grad_()
                    assert kernels.supports(x, kind), (kind, dtype)
                    check_against_reference(_fused, x, kind, layout, mask, params)
                    count += 1
    packed_x = make_input(1, 9, (330,), "channels_last", torch.float32, seed=9)[0]
    cu = torch.tensor([0, 0, 1, 40, 330])
    for kind in ("avg", "max", "gem", "lse"):
        params = KIND_PARAMS.get(kind, {})
        fused = gp.pool_packed(packed_x, cu, kind, backend="fused", **params)
        composed = gp.pool_packed(packed_x, cu, kind, backend="torch", **params)
        torch.testing.assert_close(fused, composed, rtol=2e-5, atol=2e-5)
        count += 1
    print("ok", count, kernel_target())
    return 0


if __name__ == "__main__":
    sys.exit(main())
