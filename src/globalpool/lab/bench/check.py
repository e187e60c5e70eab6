"""Check a method against the NumPy reference before it is timed.

The method runs on the *full* benchmark tensor (so shape-dependent tiling bugs show), forward and
backward with a fixed random ``grad_out``; the first ``samples`` samples of its output and of its
input gradient are compared, in float64, with :func:`globalpool.reference.pool_forward` /
:func:`~globalpool.reference.pool_backward` on those samples only. Pooling is independent per
sample, so this is exact and keeps the float64 reference cheap.

The error is ``max |got - want| / max |want|`` (relative to the largest reference value, so a
zero gradient where one is expected fails). Tolerances: 1e-3 for float32/float64, 3e-2 for
16-bit inputs (one bfloat16 rounding is 4e-3; composed ops round intermediates too). Gradients of
``p`` and ``weights`` are not compared, only the input gradient.

Methods whose ``grad_rule`` is ``"first"`` (``adaptive_max_pool``) are compared with the gradient
routed to the first arg-max instead of shared among ties; the forward is the same.

>>> import numpy as np
>>> relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.5]))
0.2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from globalpool import reference
from globalpool.lab.bench.shapes import Case

TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3, torch.bfloat16: 3e-2, torch.float16: 3e-2}


@dataclass
class CheckResult:
    ok: bool
    forward_error: float | None = None
    backward_error: float | None = None
    tolerance: float = 0.0
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """``max |got - want| / max |want|``; inf on a shape mismatch or a non-finite value."""
    if got.shape != want.shape or not np.all(np.isfinite(got)):
        return float("inf")
    if not want.size:
        return 0.0
    scale = max(float(np.max(np.abs(want))), 1e-30)
    return float(np.max(np.abs(got - want))) / scale


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def reference_params(kind: str, params: dict[str, Any], k: int) -> dict[str, Any]:
    """The reference's keyword arguments for the first ``k`` samples."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name == "weights":
            out[name] = to_numpy(value[:k])
        elif isinstance(value, torch.Tensor):
            out[name] = float(value.detach())
        else:
            out[name] = value
    return out


class ReferenceCache:
    """Reference forward/backward on the first samples of one case, computed once per kind."""

    def __init__(self, case: Case, x: torch.Tensor, samples: int = 2) -> None:
        self.case = case
        self.k = min(samples, x.shape[0])
        self.x = to_numpy(x[: self.k])
        self._cache: dict[tuple[str, str], np.ndarray] = {}

    def forward(self, kind: str, params: dict[str, Any]) -> np.ndarray:
        key = (kind, "forward")
        if key not in self._cache:
            self._cache[key] = reference.pool_forward(
                self.x,
                kind,
                layout=self.case.layout,
                **reference_params(kind, params, self.k),
            )
        return self._cache[key]

    def backward(self, kind: str, params: dict[str, Any], g: np.ndarray, rule: str) -> np.ndarray:
        key = (kind, f"backward-{rule}")
        if key not in self._cache:
            if rule == "first":
                self._cache[key] = _first_argmax_grad(self.x, g, self.case.layout)
            else:
                self._cache[key] = reference.pool_backward(
                    self.x,
                    g,
                    kind,
                    layout=self.case.layout,
                    **reference_params(kind, params, self.k),
                )["x"]
        return self._cache[key]


def _first_argmax_grad(x: np.ndarray, g: np.ndarray, layout: str) -> np.ndarray:
    """Gradient of global max pooling with the first arg-max (in spatial order) taking it all."""
    xc = np.moveaxis(x, -1, 1) if layout == "channels_last" else x
    n, c = xc.shape[:2]
    flat = xc.reshape(n, c, -1)
    grad = np.zeros_like(flat)
    first = flat.argmax(axis=2)
    np.put_along_axis(grad, first[:, :, None], g.reshape(n, c, 1), axis=2)
    grad = grad.reshape(xc.shape)
    return np.moveaxis(grad, 1, -1) if layout == "channels_last" else grad


def check_method(
    fn: Any,
    kind: str,
    grad_rule: str,
    x: torch.Tensor,
    params: dict[str, Any],
    grad_out: torch.Tensor,
    refs: ReferenceCache,
) -> CheckResult:
    """Run ``fn`` forward (no grad) and backward on ``x`` and compare with the reference.

    ``x`` must require grad; ``grad_out`` is ``(N, C_out)``. Exceptions propagate to the caller,
    which reports them as errors rather than wrong results.
    """
    tol = TOLERANCE.get(x.dtype, 1e-3)
    k = refs.k
    with torch.no_grad():
        y = fn(x, params)
    got = to_numpy(y.reshape(x.shape[0], -1)[:k])
    fwd_err = relative_error(got, refs.forward(kind, params))
    if not fwd_err <= tol:
        return CheckResult(False, fwd_err, None, tol, f"forward error {fwd_err:.3g} > {tol:g}")
    with torch.enable_grad():
        y = fn(x, params)
    (gx,) = torch.autograd.grad(y, [x], grad_out.reshape(y.shape))
    want = refs.backward(kind, params, to_numpy(grad_out[:k]), grad_rule)
    bwd_err = relative_error(to_numpy(gx[:k]), want)
    if not bwd_err <= tol:
        return CheckResult(False, fwd_err, bwd_err, tol, f"backward error {bwd_err:.3g} > {tol:g}")
    return CheckResult(True, fwd_err, bwd_err, tol)
