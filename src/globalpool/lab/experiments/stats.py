"""Mean and Student-t confidence interval over seeds.

>>> m, half = mean_ci([0.90, 0.92, 0.94])
>>> round(m, 4), round(half, 4)
(0.92, 0.0497)
>>> mean_ci([0.5])
(0.5, None)
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``).

    >>> round(t_quantile(0.975, 2), 3)
    4.303
    """
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be in (0, 1), got {q}")
    from scipy.stats import t

    return float(t.ppf(q, df))


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """``(mean, half_width)`` of the two-sided ``confidence`` interval of the mean.

    The half width is ``t_{(1+confidence)/2, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation; it is ``None`` for a single value (no spread to estimate from).
    """
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("values must hold at least one number, got none")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, None
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, t_quantile((1.0 + confidence) / 2.0, n - 1) * math.sqrt(var / n)
