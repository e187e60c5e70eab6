"""CLIPAttentionPool with ``interpolate=True`` exports with dynamic spatial sizes: the recorded
graph resizes its table for every size, its own size included, and gives the eager numbers."""

from __future__ import annotations

import warnings

import torch

import globalpool as gp


def test_exported_clip_pool_matches_eager_at_its_table_size_and_others():
    torch.manual_seed(0)
    pool = gp.CLIPAttentionPool(8, (4, 4), num_heads=2, interpolate=True).eval()
    dims = {0: torch.export.Dim("N", min=1, max=64), 2: torch.export.Dim("H", min=2, max=64),
            3: torch.export.Dim("W", min=2, max=64)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(pool, (torch.randn(2, 8, 5, 6),), dynamic_shapes=(dims,))
    for shape in ((3, 8, 4, 4), (1, 8, 3, 7)):
        x = torch.randn(shape)
        with torch.no_grad():
            want = pool(x)
        torch.testing.assert_close(program.module()(x), want, rtol=1e-6, atol=1e-6)
    # at the table's own size eager takes the table as it is: resizing to it is exact
    table = pool.positional_embedding.detach()
    torch.testing.assert_close(gp.attention.clip.resize_positions(table, (4, 4), (4, 4)), table,
                               rtol=0, atol=0)
