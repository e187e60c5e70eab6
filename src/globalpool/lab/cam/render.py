"""Draw inputs with their class activation maps: one row per sample, one column per head.

1d inputs are drawn as a line over a heat strip of the map, 2d inputs with the map overlaid,
3d inputs as maximum projections (along the first spatial axis) of the input and the map. Maps
are resized to the input (:func:`~globalpool.cam.upsample_maps`) and scaled to [0, 1] per map.

>>> import tempfile, torch
>>> from pathlib import Path
>>> x = torch.randn(2, 1, 12); maps = {"avg": torch.rand(2, 3), "nin": torch.rand(2, 3)}
>>> path = Path(tempfile.mkdtemp()) / "grid.png"
>>> render_grid(x, maps, path, titles=["0", "1"]).stat().st_size > 0
True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from globalpool.cam import normalize_maps, upsample_maps


def _image(x: torch.Tensor) -> torch.Tensor:
    """``(C, H, W)`` -> something ``imshow`` shows: grey for one channel, RGB for three, scaled
    to [0, 1]."""
    img = x[0] if x.shape[0] != 3 else x.permute(1, 2, 0)
    low, high = img.min(), img.max()
    return (img - low) / (high - low) if high > low else torch.zeros_like(img)


def render_grid(
    x: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    path: str | Path,
    *,
    titles: Sequence[str] | None = None,
    column_titles: Mapping[str, str] | None = None,
) -> Path:
    """Write a PNG of inputs ``x`` ``(N, C, *S)`` and, per column name, maps ``(N, *S')``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n, rank = x.shape[0], x.ndim - 2
    size = tuple(x.shape[2:])
    heads = list(maps)
    shown = {h: normalize_maps(upsample_maps(maps[h].float(), size)) for h in heads}
    width = 3.0 if rank == 1 else 2.2
    fig, axes = plt.subplots(
        n, len(heads), figsize=(width * len(heads), 1.9 * n), squeeze=False
    )
    for j, head in enumerate(heads):
        for i in range(n):
            ax = axes[i][j]
            m = shown[head][i]
            if rank == 1:
                signal = x[i, 0].float()
                low, high = float(signal.min()), float(signal.max())
                span = high - low or 1.0
                strip = (low - 0.35 * span, low - 0.05 * span)
                ax.imshow(
                    m[None].numpy(),
                    extent=(0, size[0] - 1, strip[0], strip[1]),
                    aspect="auto",
                    cmap="inferno",
                    vmin=0,
                    vmax=1,
                )
                ax.plot(signal.numpy(), color="black", linewidth=1)
                ax.set_ylim(strip[0], high + 0.05 * span)
                ax.set_xlim(0, size[0] - 1)
            else:
                img, heat = (x[i].float(), m) if rank == 2 else (x[i].float().amax(1), m.amax(0))
                ax.imshow(_image(img).numpy(), cmap="gray")
                ax.imshow(heat.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title((column_titles or {}).get(head, head), fontsize=8)
            if j == 0 and titles is not None:
                ax.set_ylabel(titles[i], fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
