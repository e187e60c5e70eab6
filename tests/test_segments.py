"""gp.pool_segments: rows grouped by an unsorted index, against torch's scatter_reduce and the
NumPy reference per segment for every registered kind (values and gradients), sorted against
unsorted order, empty segments, half dtypes, a user kind with a per-row parameter,
torch.compile / torch.export, errors, and torch_geometric's global pools where installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import globalpool as gp
from globalpool import reference, registry
from helpers import KIND_PARAMS, TOLERANCE

C = 3
# 13 rows, unsorted, into 7 segments: 2, 4 and 6 have no row
INDEX = torch.tensor([3, 0, 3, 1, 0, 3, 5, 1, 3, 0, 5, 3, 1])
SEGMENTS = 7
EMPTY = (2, 4, 6)


def _x(dtype=torch.float64, seed=0, t=None, c=C):
    gen = torch.Generator().manual_seed(seed)
    t = len(INDEX) if t is None else t
    return torch.randn(t, c, generator=gen, dtype=torch.float64).to(dtype)


def _params(kind, t, dtype=torch.float64, seed=1):
    """Parameters for every kind of a name or tuple: KIND_PARAMS' scalars, a positive random
    tensor ``(T,)`` for each per-row parameter."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k in (kind if isinstance(kind, tuple) else (kind,)):
        out.update(KIND_PARAMS.get(k, {}))
        for q in registry.spec(k).params:
            if q.per_position:
                out[q.name] = (torch.rand(t, generator=gen, dtype=torch.float64) + 0.1).to(dtype)
    return out


def _reference(x, index, n, kind, grad_out, params):
    """Per segment, its rows in x's order through globalpool.reference: (forward (n, width*C),
    grad x (T, C), {name: grad of each per-row parameter (T,)})."""
    xs = x.detach().double().numpy()
    idx = index.numpy()
    per_row = {k: v.detach().double().numpy() for k, v in params.items()
               if isinstance(v, torch.Tensor) and v.ndim == 1}
    scalars = {k: v for k, v in params.items() if k not in per_row}
    width = gp.output_width(kind, 1)
    out = np.zeros((n, width * xs.shape[1]))
    gx = np.zeros_like(xs)
    gw = {k: np.zeros_like(v) for k, v in per_row.items()}
    g = grad_out.detach().double().numpy()
    for s in range(n):
        rows = np.flatnonzero(idx == s)
        if not len(rows):
            continue
        kw = {**scalars, **{k: v[rows][None] for k, v in per_row.items()}}
        seq = xs[rows][None]
        out[s] = reference.pool_forward(seq, kind, layout="channels_last", **kw)[0]
        got = reference.pool_backward(seq, g[s:s + 1], kind, layout="channels_last", **kw)
        gx[rows] = got["x"][0]
        for k in gw:
            gw[k][rows] = got[k][0]
    return out, gx, gw


# --------------------------------------------------------------------------------------------
# values and gradients


@pytest.mark.parametrize("reduce, kind", [("sum", "sum"), ("mean", "avg"), ("amax", "max")])
def test_matches_scatter_reduce(reduce, kind):
    x = _x().requires_grad_()
    y = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS)
    want = x.new_zeros(SEGMENTS, C).scatter_reduce(
        0, INDEX[:, None].expand(-1, C), x, reduce, include_self=False)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    assert y[list(EMPTY)].eq(0).all()
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_want,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, gx_want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", gp.KINDS)
def test_every_kind_matches_reference_per_segment(kind):
    spec = registry.spec(kind)
    if spec.reference is None or spec.reference_grad is None:
        pytest.skip(f"kind {kind!r} has no NumPy reference")
    x = _x(seed=2).requires_grad_()
    params = {k: v.requires_grad_() if isinstance(v, torch.Tensor) else v
              for k, v in _params(kind, len(INDEX)).items()}
    y = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS, **params)
    assert y.shape == (SEGMENTS, gp.output_width(kind, C)) and y.dtype == torch.float64
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    want, gx_want, gw_want = _reference(x, INDEX, SEGMENTS, kind, g, params)
    np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-10, atol=1e-10)
    y.backward(g)
    np.testing.assert_allclose(x.grad.numpy(), gx_want, rtol=1e-10, atol=1e-10)
    for name, grad in gw_want.items():
        np.testing.assert_allclose(params[name].grad.numpy(), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["avg", "max", "gem", "lse", "attention", "last"])
def test_gradcheck_float64(kind):
    x = (_x(seed=4).abs() + 0.2).requires_grad_()
    params = _params(kind, len(INDEX))
    if kind == "gem":
        params["p"] = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    names = [k for k, v in params.items() if isinstance(v, torch.Tensor)]
    for name in names:
        params[name].requires_grad_()

    def run(x, *tensors):
        return gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS,
                                **{**params, **dict(zip(names, tensors, strict=True))})

    assert torch.autograd.gradcheck(run, (x, *(params[k] for k in names)))


def test_tuple_of_kinds_takes_per_row_weights_in_row_order():
    kinds = ("attention", "gem", "first", "max")
    x = _x(seed=5)
    params = _params(kinds, len(INDEX))
    y = gp.pool_segments(x, INDEX, kinds, num_segments=SEGMENTS, **params)
    parts = [gp.pool_segments(x, INDEX, k, num_segments=SEGMENTS,
                              **{n: v for n, v in params.items()
                                 if n in registry.spec(k).defaults})
             for k in kinds]
    torch.testing.assert_close(y, torch.cat(parts, dim=1), rtol=0, atol=0)
    want, _, _ = _reference(x, INDEX, SEGMENTS, kinds, torch.zeros(y.shape), params)
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-10, atol=1e-10)


def test_user_kind_with_a_per_row_parameter():
    def scaled_sum(x, mask, scale):
        scale = scale.to(x.dtype)
        if mask is not None:
            x, scale = torch.where(mask, x, 0.0), torch.where(mask, scale, 0.0)
        return (x * scale).sum(-1)

    gp.register_kind("scaled_sum", scaled_sum,
                     params=(gp.Param("scale", None, per_position=True),),
                     reference=lambda xs, scale: (xs * scale).sum(axis=1))
    try:
        x = _x(seed=6)
        scale = torch.arange(1.0, len(INDEX) + 1, dtype=torch.float64)
        y = gp.pool_segments(x, INDEX, ("avg", "scaled_sum"), scale=scale)
        want = x.new_zeros(6, C).index_add_(0, INDEX, x * scale[:, None])
        torch.testing.assert_close(y[:, C:], want)
        torch.testing.assert_close(y[:, :C], gp.pool_segments(x, INDEX, "avg"))
    finally:
        gp.unregister_kind("scaled_sum")


# --------------------------------------------------------------------------------------------
# order, empty segments, dtypes


@pytest.mark.parametrize("kind", gp.KINDS)
def test_unsorted_equals_sorted(kind):
    """Rows pooled from an unsorted index equal the same rows given sorted (stably: the order
    within a segment is kept, so first and last agree too)."""
    x = _x(seed=7)
    params = _params(kind, len(INDEX))
    order = torch.argsort(INDEX, stable=True)
    sorted_params = {k: v[order] if isinstance(v, torch.Tensor) else v for k, v in params.items()}
    y = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS, **params)
    y_sorted = gp.pool_segments(x[order], INDEX[order], kind, num_segments=SEGMENTS,
                                **sorted_params)
    torch.testing.assert_close(y, y_sorted, rtol=1e-12, atol=1e-12)


def test_first_and_last_are_in_original_row_order():
    x = torch.arange(len(INDEX), dtype=torch.float32)[:, None]
    y = gp.pool_segments(x, INDEX, ("first", "last"), num_segments=SEGMENTS)
    for s in range(SEGMENTS):
        rows = INDEX.eq(s).nonzero()[:, 0].tolist()
        assert y[s].tolist() == ([rows[0], rows[-1]] if rows else [0.0, 0.0])


def test_sorted_index_skips_the_sort(monkeypatch):
    x = _x(seed=8)
    index = torch.sort(INDEX).values
    want = gp.pool_segments(x, index, "lse", r=2.0)

    def refuse(*args, **kwargs):
        raise AssertionError("a sorted index must not be sorted again")

    monkeypatch.setattr(torch, "argsort", refuse)
    torch.testing.assert_close(gp.pool_segments(x, index, "lse", r=2.0), want)
    with pytest.raises(AssertionError, match="must not be sorted again"):
        gp.pool_segments(x, INDEX, "lse", r=2.0)


@pytest.mark.parametrize("kind", gp.KINDS)
def test_empty_segments_give_zero_with_zero_gradient(kind):
    x = _x(seed=9).requires_grad_()
    params = _params(kind, len(INDEX))
    y = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS + 3, **params)
    assert y.shape == (SEGMENTS + 3, gp.output_width(kind, C))
    empty = [*EMPTY, SEGMENTS, SEGMENTS + 1, SEGMENTS + 2]
    assert y[empty].eq(0).all()
    g = torch.zeros_like(y)
    g[empty] = 1.0
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.eq(0).all()


def test_no_rows():
    x = torch.zeros(0, C)
    index = torch.zeros(0, dtype=torch.int64)
    assert gp.pool_segments(x, index, "max").shape == (0, C)
    y = gp.pool_segments(x, index, "catavgmax", num_segments=2)
    assert y.shape == (2, 2 * C) and y.eq(0).all()


def test_num_segments_defaults_to_max_index_plus_one():
    x = _x(seed=10)
    assert gp.pool_segments(x, INDEX, "avg").shape == (int(INDEX.max()) + 1, C)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int16, torch.uint8])
def test_index_dtypes(index_dtype):
    x = _x(seed=11)
    torch.testing.assert_close(gp.pool_segments(x, INDEX.to(index_dtype), "max"),
                               gp.pool_segments(x, INDEX, "max"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", ["sum", "avg", "max", "gem", "lse", "attention"])
def test_dtypes_accumulate_as_pool_packed(kind, dtype):
    """Half inputs: the result in their dtype, computed in float32 from the rounded inputs."""
    x = _x(dtype, seed=12).requires_grad_()
    params = _params(kind, len(INDEX), dtype=dtype)
    y = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS, **params)
    assert y.dtype == dtype
    g = torch.ones_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    assert gx.dtype == dtype
    want, gx_want, _ = _reference(x, INDEX, SEGMENTS, kind, g, params)
    tol = TOLERANCE[dtype]
    np.testing.assert_allclose(y.detach().double().numpy(), want, **tol)
    np.testing.assert_allclose(gx.double().numpy(), gx_want, **tol)


def test_half_sum_does_not_accumulate_in_half():
    # 4096 ones per segment: a float16 running sum would stop at 2048 (2049 is not a float16)
    x = torch.ones(8192, 1, dtype=torch.float16)
    index = torch.arange(8192) % 2  # unsorted
    assert gp.pool_segments(x, index, "sum").tolist() == [[4096.0], [4096.0]]


# --------------------------------------------------------------------------------------------
# torch.compile and torch.export


def test_compile_fullgraph_with_num_segments():
    kinds = ("avg", "max", "first")
    fn = torch.compile(lambda x, i: gp.pool_segments(x, i, kinds, num_segments=SEGMENTS),
                       fullgraph=True, backend="aot_eager")
    for seed in (13, 14):  # the second call: new values, same graph
        x = _x(torch.float32, seed=seed)
        index = INDEX[torch.randperm(len(INDEX), generator=torch.Generator().manual_seed(seed))]
        torch.testing.assert_close(fn(x, index), gp.pool_segments(x, index, kinds,
                                                                  num_segments=SEGMENTS))


def _eager_and_compiled_step(fn, compiled, x, *args):
    """Values and x's gradient of one training step, eager and compiled."""
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    ye, yc = fn(xe, *args), compiled(xc, *args)
    (ye * torch.arange(1.0, ye.numel() + 1).reshape(ye.shape)).sum().backward()
    (yc * torch.arange(1.0, yc.numel() + 1).reshape(yc.shape)).sum().backward()
    return (ye, xe.grad), (yc, xc.grad)


def test_inductor_compile_trains_through_a_tuple_of_kinds():
    """The default backend (inductor), forward and backward: the longest segment is a size
    the graph reads when it runs, and the backward sees it as that same size (new lengths:
    tests/test_packed.py)."""
    fn = lambda x, i: gp.pool_segments(x, i, ("avg", "max"), num_segments=8)  # noqa: E731
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(50, 4, generator=gen)
    index = torch.sort(torch.randint(0, 8, (50,), generator=gen))[0]
    eager, graph = _eager_and_compiled_step(fn, torch.compile(fn, fullgraph=True), x, index)
    torch.testing.assert_close(graph, eager)


def test_inductor_compile_trains_gem_with_dynamic_shapes():
    fn = lambda x, i: gp.pool_segments(x, i, "gem", num_segments=6)  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(22)
    x = torch.rand(30, 4, generator=gen) + 0.1
    index = torch.randint(0, 5, (30,), generator=gen)  # unsorted, segment 5 empty
    eager, graph = _eager_and_compiled_step(fn, compiled, x, index)
    torch.testing.assert_close(graph, eager)


class _Segments(torch.nn.Module):
    def __init__(self, kind, num_segments):
        super().__init__()
        self.kind, self.num_segments = kind, num_segments

    def forward(self, x, index, weights):
        return gp.pool_segments(x, index, self.kind, self.num_segments, weights=weights)


def test_export_with_num_segments_runs_on_new_row_counts():
    model = _Segments(("attention", "max"), SEGMENTS)
    x, w = _x(torch.float32, seed=15), torch.rand(len(INDEX))
    rows = torch.export.Dim("rows")
    program = torch.export.export(model, (x, INDEX, w),
                                  dynamic_shapes=({0: rows}, {0: rows}, {0: rows}))
    run = program.module()
    for t, seed in ((len(INDEX), 15), (40, 16), (1, 17)):
        gen = torch.Generator().manual_seed(seed)
        x, w = _x(torch.float32, seed=seed, t=t), torch.rand(t, generator=gen)
        index = torch.randint(0, SEGMENTS, (t,), generator=gen)
        torch.testing.assert_close(run(x, index, w), model(x, index, w))
    with pytest.raises(RuntimeError, match=r"index must lie in \[0, num_segments\)"):
        run(x, torch.full((t,), SEGMENTS), w)


def test_export_without_num_segments_is_refused():
    x = _x(torch.float32)
    with pytest.raises(ValueError, match="num_segments must be given"):
        torch.export.export(_Segments("attention", None), (x, INDEX, torch.ones(len(INDEX))))


# --------------------------------------------------------------------------------------------
# errors name the argument


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.ones(4), torch.zeros(4, dtype=torch.int64), {}), ValueError,
         r"x must be 2-D \(T, C\)"),
        (lambda: (torch.ones(4, 2, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), {}),
         TypeError, "x must have a floating dtype"),
        (lambda: (torch.ones(4, 2), torch.zeros(4), {}), TypeError,
         "index must have an integer dtype .* got torch.float32"),
        (lambda: (torch.ones(4, 2), torch.zeros(4, dtype=torch.bool), {}), TypeError,
         "index must have an integer dtype .* got torch.bool"),
        (lambda: (torch.ones(4, 2), [0, 0, 1, 1], {}), TypeError,
         "index must be a torch.Tensor, got list"),
        (lambda: (torch.ones(4, 2), torch.zeros(4, 1, dtype=torch.int64), {}), ValueError,
         r"index must have shape \(T,\) = \(4,\).* got shape \(4, 1\)"),
        (lambda: (torch.ones(4, 2), torch.zeros(3, dtype=torch.int64), {}), ValueError,
         r"index must have shape \(T,\) = \(4,\).* got shape \(3,\)"),
        (lambda: (torch.ones(4, 2), torch.zeros(4, dtype=torch.int64, device="meta"), {}),
         ValueError, "index must be on x's device cpu, got meta"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 2, -1, 1]), {}), ValueError,
         r"index must be >= 0, got index\[2\] = -1"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 2, 3, 1]), {"num_segments": 3}),
         ValueError, r"index must be < num_segments = 3, got index\[2\] = 3"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 2, 3, 1]), {"num_segments": -1}),
         ValueError, "num_segments must be >= 0, got -1"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 2, 3, 1]), {"num_segments": 4.0}),
         TypeError, "num_segments must be an int or None, got float 4.0"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 2, 3, 1]), {"num_segments": True}),
         TypeError, "num_segments must be an int or None, got bool True"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), {"kind": "median"}),
         ValueError, "kind must be one of"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), {"kind": "attention"}),
         TypeError, r"requires weights=Tensor of shape \(T,\)"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]),
                  {"kind": "attention", "weights": torch.ones(3)}),
         ValueError, r"weights must have shape \(T,\) = \(4,\), got \(3,\)"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]),
                  {"kind": "attention", "weights": -torch.ones(4)}),
         ValueError, "weights must be non-negative"),
        (lambda: (torch.ones(4, 2), torch.tensor([0, 1, 0, 1]), {"kind": "gem", "p": 0.5}),
         ValueError, "p for kind 'gem' must be >= 1, got 0.5"),
        (lambda: (torch.ones(5, 2), torch.tensor([0, 1, 0, 1, 1]),
                  {"kind": "gem", "p": torch.full((5,), 3.0)}),
         ValueError, r"p for kind 'gem' must have shape \(C,\) = \(2,\) \(one value per "
         r"channel, the same for every row of x \(5, 2\); not one per row\), got shape \(5,\)"),
    ],
)
def test_errors_name_the_argument(make, error, match):
    x, index, kw = make()
    kind = kw.pop("kind", "avg")
    with pytest.raises(error, match=match):
        gp.pool_segments(x, index, kind, **kw)


# --------------------------------------------------------------------------------------------
# torch_geometric's global pools, where it is installed


def test_matches_torch_geometric_global_pools():
    glob = pytest.importorskip("torch_geometric.nn.pool.glob")
    x = _x(seed=18).requires_grad_()
    pairs = [(glob.global_add_pool, "sum"), (glob.global_mean_pool, "avg"),
             (glob.global_max_pool, "max")]
    for theirs, kind in pairs:
        want = theirs(x, INDEX, SEGMENTS)
        got = gp.pool_segments(x, INDEX, kind, num_segments=SEGMENTS)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(theirs(x, INDEX), gp.pool_segments(x, INDEX, kind))
        g = torch.randn_like(got)
        torch.testing.assert_close(torch.autograd.grad(got, x, g)[0],
                                   torch.autograd.grad(want, x, g)[0])
