"""Query-based attention pools on variable-length token sequences: packed rows with
``cu_seqlens`` and jagged nested tensors (contiguous and ``torch.nested.narrow`` views) give what
padding each sequence and masking the padding gives, values and gradients, and what the float64
compositions give on each sequence alone."""

from __future__ import annotations

import pytest
import torch

import globalpool as gp
from test_attention_pools import FAMILIES, by_hand, make

C = 16
LENGTHS = (3, 0, 5, 1, 4)
TABLE = 6  # CLIP's 1-d positional table: at least the longest sequence


def _pool(name, layout="channels_last", **kw):
    torch.manual_seed(0)
    size = (TABLE,)
    if name == "map":
        kw.setdefault("mlp_ratio", 1.0)
    return make(name, size=size, layout=layout, **kw).double()


def _cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def _rows(lengths, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), C, generator=gen, dtype=dtype)


def _pad_by_hand(rows, lengths, length):
    """``(N, length, C)`` zeros with each sequence's rows at its start, and the mask (a loop,
    independent of the library's padding)."""
    out = rows.new_zeros(len(lengths), length, C)
    real = torch.zeros(len(lengths), length, dtype=torch.bool)
    start = 0
    for n, k in enumerate(lengths):
        out[n, :k] = rows[start:start + k]
        real[n, :k] = True
        start += k
    return out, real


def _pad_length(name, lengths):
    return TABLE if name == "clip" else max(lengths)


# --------------------------------------------------------------------------------------------
# packed rows


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_equals_padding_and_mask_values_and_gradients(name):
    pool = _pool(name)
    rows = _rows(LENGTHS).requires_grad_()
    got = pool(rows, cu_seqlens=_cu(LENGTHS))
    g = torch.randn(got.shape, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, [rows, *pool.parameters()], g)

    base = rows.detach().clone().requires_grad_()
    padded, real = _pad_by_hand(base, LENGTHS, _pad_length(name, LENGTHS))
    want = pool(padded, real)
    want_grads = torch.autograd.grad(want, [base, *pool.parameters()], g)

    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(got[1], torch.zeros(C, dtype=torch.float64))  # the empty sequence
    for a, b in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_each_sequence_matches_the_composition_alone(name):
    """Row n is the float64 composition on sequence n alone (on the first positions of CLIP's
    table), so no sequence sees another, nor the batch's longest length."""
    pool = _pool(name)
    rows = _rows(LENGTHS, seed=1)
    got = pool(rows, cu_seqlens=_cu(LENGTHS))
    start = 0
    for n, k in enumerate(LENGTHS):
        seq = rows[start:start + k].unsqueeze(0)
        start += k
        if k == 0:
            assert torch.equal(got[n], torch.zeros(C, dtype=torch.float64))
            continue
        length = TABLE if name == "clip" else k
        tokens, real = _pad_by_hand(seq[0], [k], length)
        torch.testing.assert_close(got[n], by_hand(name, pool, tokens, real)[0],
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_layout_argument_does_not_change_packed_rows(name):
    rows, cu = _rows(LENGTHS, seed=2), _cu(LENGTHS)
    first, last = _pool(name, "channels_first"), _pool(name, "channels_last")
    torch.testing.assert_close(first(rows, cu_seqlens=cu), last(rows, cu_seqlens=cu))


def test_gradcheck_in_float64():
    cu = _cu((2, 0, 3))
    for name in FAMILIES:
        torch.manual_seed(0)
        pool = make(name, c=4, size=(4,), **({"mlp_ratio": 1.0} if name == "map" else {}))
        pool = pool.double()
        rows = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda r, p=pool: p(r, cu_seqlens=cu), (rows,))


def test_gamma_simpool_and_int32_offsets():
    pool = _pool("simpool", gamma=2.0)
    rows = _rows(LENGTHS, seed=3)
    got = pool(rows, cu_seqlens=_cu(LENGTHS).int())
    padded, real = _pad_by_hand(rows, LENGTHS, max(LENGTHS))
    torch.testing.assert_close(got, pool(padded, real))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_rows_keep_their_dtype(dtype):
    pool = _pool("map").float()
    rows = _rows(LENGTHS, seed=4, dtype=torch.float32)
    got = pool(rows.to(dtype), cu_seqlens=_cu(LENGTHS))
    assert got.dtype == dtype
    want = pool(rows.to(dtype).float(), cu_seqlens=_cu(LENGTHS))
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def test_no_sequences_and_only_empty_ones():
    pool = _pool("simpool")
    assert pool(_rows(()), cu_seqlens=torch.tensor([0])).shape == (0, C)
    rows = _rows(()).requires_grad_()
    out = pool(rows, cu_seqlens=torch.tensor([0, 0, 0]))
    assert torch.equal(out, torch.zeros(2, C, dtype=torch.float64))


def test_nan_outside_the_sequences_never_reaches_output_or_gradient():
    """Rows of values() a narrowed nested tensor leaves out may hold anything."""
    pool = _pool("map")
    base = torch.randn(3, 7, C, dtype=torch.float64)
    base[:, 5:] = torch.nan
    base[0, 0] = torch.inf
    base.requires_grad_()
    starts, lengths = torch.tensor([1, 0, 2]), torch.tensor([4, 5, 0])
    nt = torch.nested.narrow(base, 1, starts, lengths, layout=torch.jagged)
    out = pool(nt)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(base.grad).all()
    assert torch.equal(base.grad[:, 5:], torch.zeros_like(base.grad[:, 5:]))
    assert torch.equal(base.grad[0, 0], torch.zeros(C, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# nested tensors


@pytest.mark.parametrize("name", FAMILIES)
def test_nested_tensor_equals_packed_rows_with_gradients(name):
    pool = _pool(name)
    rows = _rows(LENGTHS, seed=5)
    seqs = list(rows.split(list(LENGTHS)))
    nt = torch.nested.nested_tensor(seqs, layout=torch.jagged, requires_grad=True)
    got = pool(nt)
    packed = rows.clone().requires_grad_()
    want = pool(packed, cu_seqlens=_cu(LENGTHS))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(got.shape, dtype=torch.float64)
    (got * g).sum().backward()
    (want * g).sum().backward()
    torch.testing.assert_close(nt.grad.values(), packed.grad)


@pytest.mark.parametrize("name", FAMILIES)
def test_narrowed_nested_tensor_uses_each_sequences_own_tokens(name):
    pool = _pool(name)
    base = torch.randn(4, TABLE + 2, C, dtype=torch.float64, requires_grad=True)
    starts, lengths = torch.tensor([2, 0, 3, 1]), torch.tensor([4, 6, 0, 1])
    nt = torch.nested.narrow(base, 1, starts, lengths, layout=torch.jagged)
    assert not nt.is_contiguous()
    got = pool(nt)
    g = torch.randn(got.shape, dtype=torch.float64)
    (got_grad,) = torch.autograd.grad(got, base, g)

    spans = [(int(s), int(k)) for s, k in zip(starts, lengths, strict=True)]
    rows = torch.cat([base[n, s:s + k] for n, (s, k) in enumerate(spans)])
    want = pool(rows, cu_seqlens=_cu([k for _, k in spans]))
    (want_grad,) = torch.autograd.grad(want, base, g)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad)


# --------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda p, r, cu: p(r, torch.ones(2, 3, dtype=torch.bool), cu_seqlens=cu), ValueError,
     "mask must be None with cu_seqlens"),
    (lambda p, r, cu: p(r.unsqueeze(0), cu_seqlens=cu), ValueError, r"x must be 2-D \(T, C\)"),
    (lambda p, r, cu: p(r[:, :4], cu_seqlens=cu), ValueError,
     r"SimPool\(channels=16\) got packed rows \(T, C\) with C = 4"),
    (lambda p, r, cu: p(r, cu_seqlens=torch.tensor([0, 5, 3, 9])), ValueError,
     "cu_seqlens must be non-decreasing"),
    (lambda p, r, cu: p(r, cu_seqlens=cu.float()), TypeError, "cu_seqlens must have dtype"),
    (lambda p, r, cu: p(r, cu_seqlens=torch.tensor([0, 3])), ValueError,
     "cu_seqlens must end at T"),
    (lambda p, r, cu: p(torch.nested.nested_tensor([r[:3], r[3:]], layout=torch.jagged),
                        cu_seqlens=cu), ValueError, "cu_seqlens must be None for a nested tensor"),
    (lambda p, r, cu: p(torch.nested.nested_tensor([r[:3], r[3:]], layout=torch.jagged),
                        torch.ones(2, 6, dtype=torch.bool)), ValueError,
     "mask must be None for a nested tensor"),
])
def test_bad_packed_input_is_refused(call, error, match):
    rows, cu = _rows((3, 6)), _cu((3, 6))
    with pytest.raises(error, match=match):
        call(_pool("simpool"), rows, cu)


def test_clip_refuses_a_grid_table_and_sequences_longer_than_its_table():
    rows, cu = _rows((3, 6)), _cu((3, 6))
    grid = gp.CLIPAttentionPool(C, (3, 3), num_heads=4, interpolate=True).double()
    with pytest.raises(ValueError, match=r"spatial_size=\(3, 3\)\) got packed sequences.*1-d"):
        grid(rows, cu_seqlens=cu)
    short = gp.CLIPAttentionPool(C, (5,), num_heads=4, interpolate=True).double()
    with pytest.raises(ValueError, match="got a sequence of 6 tokens.*table's 5"):
        short(rows, cu_seqlens=cu)
    # padding + mask on the table's length: the same numbers as for the padded map
    table = gp.CLIPAttentionPool(C, (6,), num_heads=4, layout="channels_last").double()
    padded, real = _pad_by_hand(rows, (3, 6), 6)
    torch.testing.assert_close(table(rows, cu_seqlens=cu), table(padded, real))
