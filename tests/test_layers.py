"""Layers and heads: shapes, parameters, masks, repr, torch.compile(fullgraph) and torch.export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import globalpool as gp


def _layers() -> dict[str, nn.Module]:
    return {
        "GlobalPool-avg": gp.GlobalPool("avg"),
        "GlobalPool-catavgmax": gp.GlobalPool("catavgmax"),
        "GlobalPool-lse": gp.GlobalPool("lse", r=2.0),
        "GeM": gp.GeM(p=3.0),
        "AttentionPool": gp.AttentionPool(6),
        "AdaptivePool": gp.AdaptivePool((2, 3), "max"),
        "ClassifierHead": gp.ClassifierHead(6, 4, pool="gem", dropout=0.0),
        "GeM-per-channel": gp.GeM(p=2.5, channels=6),
        "LSEPool": gp.LSEPool(r=2.0),
        "LSEPool-per-channel": gp.LSEPool(r=1.5, channels=6),
        "ClassifierHead-norm-hidden": gp.ClassifierHead(
            6, 4, pool="lse", learnable=True, norm="layer", hidden=5
        ),
    }


def test_gem_p_stays_at_least_one_and_learns():
    gem = gp.GeM(p=1.5)
    with torch.no_grad():
        gem.raw_p.fill_(-50.0)
    assert float(gem.p) >= 1.0
    gem = gp.GeM(p=3.0)
    x = torch.rand(4, 6, 5, 5) + 0.1
    gem(x).sum().backward()
    assert gem.raw_p.grad is not None and gem.raw_p.grad != 0
    assert abs(float(gem.p) - 3.0) < 1e-6


def test_gem_not_learnable_has_no_parameters():
    gem = gp.GeM(p=2.0, learnable=False)
    assert list(gem.parameters()) == []
    assert abs(float(gem.p) - 2.0) < 1e-6


def test_gem_fp16_near_max_does_not_overflow():
    x = torch.full((2, 3, 4, 4), 65504.0, dtype=torch.float16)
    y = gp.GeM(p=3.0)(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.full((2, 3), 65504.0), rtol=1e-3, atol=0)


def test_attention_pool_weights_are_non_negative_and_used():
    att = gp.AttentionPool(6)
    x = torch.randn(2, 6, 5, 5)
    w = att.weights(x)
    assert w.shape == (2, 5, 5) and (w >= 0).all()
    expected = (x * w.unsqueeze(1)).sum((2, 3)) / w.sum((1, 2)).unsqueeze(1)
    torch.testing.assert_close(att(x), expected)
    att(x).sum().backward()
    assert att.score.weight.grad is not None


def test_attention_pool_channels_last_matches_channels_first():
    att_last = gp.AttentionPool(6, layout="channels_last")
    att_first = gp.AttentionPool(6)
    att_first.load_state_dict(att_last.state_dict())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(att_last(x.movedim(1, -1)), att_first(x))


def test_attention_scorer_is_a_linear_over_the_channel_dim_where_it_lies():
    """The scores equal nn.Linear's on channels-last values, for either layout and rank, with
    Linear's state dict; hooks on the scorer see them; a channel dim in the middle is refused."""
    from globalpool.layers import ChannelScorer

    scorer, linear = ChannelScorer(6), torch.nn.Linear(6, 1)
    linear.load_state_dict(scorer.state_dict())
    seen = []
    scorer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    for shape in [(2, 6, 5), (2, 6, 5, 4), (2, 6, 3, 4, 2)]:
        x = torch.randn(shape)
        expected = linear(x.movedim(1, -1))[..., 0]
        torch.testing.assert_close(scorer(x, channel_dim=1), expected)
        torch.testing.assert_close(scorer(x.movedim(1, -1), channel_dim=-1), expected)
    assert seen[0] == (2, 5)
    with pytest.raises(ValueError, match="channel_dim must be 1 or the last dim, got 2"):
        scorer(torch.randn(2, 3, 6, 4), channel_dim=2)


@pytest.mark.parametrize("name", list(_layers()))
def test_layers_honour_mask(name):
    layer = _layers()[name]
    x = torch.randn(2, 6, 5, 5)
    mask = torch.rand(2, 5, 5) > 0.3
    mask[:, 0, 0] = True
    masked = layer(x, mask=mask)
    x_poisoned = x.clone()
    x_poisoned[~mask.unsqueeze(1).expand_as(x)] = float("nan")
    torch.testing.assert_close(layer(x_poisoned, mask=mask), masked)


@pytest.mark.parametrize("name", list(_layers()))
def test_extra_repr_names_kind_and_params(name):
    text = repr(_layers()[name])
    assert "(" in text
    if name.startswith("GlobalPool"):
        assert "kind=" in text
    if name == "GeM":
        assert "p=3.0000" in text
    if name.endswith("per-channel"):
        assert "x 6" in text  # the range of its 6 values


@pytest.mark.parametrize("kind", gp.KINDS)
def test_classifier_head_feature_width(kind):
    head = gp.ClassifierHead(8, 3, pool=kind)
    assert head.feature_width == (16 if kind == "catavgmax" else 8)
    assert head.fc.in_features == head.feature_width
    for shape in [(2, 8, 9), (2, 8, 5, 5), (2, 8, 3, 3, 3)]:
        assert head(torch.randn(shape)).shape == (2, 3)


@pytest.mark.parametrize("name", gp.HEADS)
def test_make_head_every_name(name):
    head = gp.make_head(name, 8, 3, spatial_size=(5, 5), hidden=16)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    y = head(x)
    y.sum().backward()
    assert y.shape == (2, 3) and x.grad is not None


def test_flatten_fc_head_rejects_other_sizes():
    head = gp.FlattenFCHead(4, (5, 5), 3)
    with pytest.raises(ValueError, match=r"spatial size \(5, 5\).*got \(6, 6\)"):
        head(torch.randn(1, 4, 6, 6))


def test_swap_pool_replaces_adaptive_pool_and_classifier():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                        nn.Linear(8, 2))
    gp.swap_pool(net, "gem", classifier="3")
    assert isinstance(net[1], gp.GeM) and net[3].in_features == 8
    assert net(torch.randn(2, 3, 9, 9)).shape == (2, 2)
    gp.swap_pool(nn.Sequential(net[0], nn.AdaptiveMaxPool2d(1)), "avg")
    with pytest.raises(ValueError, match="needs classifier"):
        gp.swap_pool(nn.Sequential(nn.AdaptiveAvgPool2d(1)), "catavgmax")
    with pytest.raises(ValueError, match="no AdaptiveAvgPool"):
        gp.swap_pool(nn.Sequential(nn.Conv2d(3, 3, 1)), "avg")


@pytest.mark.parametrize("name", list(_layers()))
def test_compile_fullgraph(name):
    layer = _layers()[name].eval()
    x = torch.randn(2, 6, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("name", list(_layers()))
def test_torch_export(name):
    layer = _layers()[name].eval()
    x = torch.randn(2, 6, 5, 5)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


# --- padding never leaks from any module -------------------------------------------------------

def _poisoned(x: torch.Tensor, mask: torch.Tensor, channel_dim: int) -> torch.Tensor:
    padded = (~mask).unsqueeze(channel_dim).expand_as(x)
    values = torch.full((int(padded.sum()),), float("nan"))
    values[::2] = float("inf")
    values[1::4] = -float("inf")
    out = x.clone()
    out[padded] = values
    return out


def _leak_cases():
    return {
        "AttentionPool": lambda layout: gp.AttentionPool(6, layout=layout),
        "ClassifierHead-attention": lambda layout: gp.ClassifierHead(6, 3, pool="attention",
                                                                     layout=layout),
        "ClassifierHead-gem": lambda layout: gp.ClassifierHead(6, 3, pool="gem", layout=layout),
        "NiNHead": lambda layout: gp.NiNHead(6, 3, layout=layout),
        "FlattenFCHead": lambda layout: gp.FlattenFCHead(6, (4, 5), 3, hidden=8, layout=layout),
        "ClassifierHead-lse-learnable": lambda layout: gp.ClassifierHead(
            6, 3, pool="lse", learnable=True, norm="layer", hidden=4, layout=layout
        ),
        "GeM-per-channel": lambda layout: gp.GeM(channels=6, layout=layout),
        "LSEPool-per-channel": lambda layout: gp.LSEPool(channels=6, layout=layout),
    }


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("name", list(_leak_cases()))
def test_nan_at_padded_positions_leaves_output_and_every_gradient_finite(name, layout, backend):
    if backend == "fused" and name.endswith("per-channel"):
        pytest.skip("no kernel for a per-channel p or r (backend='fused' refuses it)")
    torch.manual_seed(0)
    module = _leak_cases()[name](layout)
    if hasattr(module, "backend"):
        module.backend = backend
    for sub in module.modules():
        if hasattr(sub, "backend"):
            sub.backend = backend
    first = layout == "channels_first"
    x = torch.randn(2, 6, 4, 5) if first else torch.randn(2, 4, 5, 6)
    mask = torch.rand(2, 4, 5) > 0.4
    mask[:, 0, 0] = True
    mask[1] = False  # an all-padded sample too
    x_bad = _poisoned(x, mask, 1 if first else -1).requires_grad_()
    y = module(x_bad, mask=mask)
    assert torch.isfinite(y).all(), "output holds NaN/inf"
    torch.testing.assert_close(y, module(torch.where(
        mask.unsqueeze(1 if first else -1), x, 0.0), mask=mask))
    y.square().sum().backward()
    assert torch.isfinite(x_bad.grad).all(), "x's gradient holds NaN/inf"
    assert (x_bad.grad[~mask.unsqueeze(1 if first else -1).expand_as(x)] == 0).all()
    for pname, p in module.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{pname}'s gradient"


def test_flatten_fc_head_mask_nan_gives_finite_logits():
    head = gp.FlattenFCHead(2, (3,), 4, hidden=5)
    x = torch.randn(1, 2, 3)
    x[..., 2] = float("nan")
    mask = torch.tensor([[True, True, False]])
    assert torch.isfinite(head(x, mask=mask)).all()


def test_flatten_fc_head_float_mask_refused():
    head = gp.FlattenFCHead(2, (3,), 4, hidden=5)
    with pytest.raises(TypeError, match=r"mask must have dtype torch.bool.*torch.float32"):
        head(torch.randn(1, 2, 3), mask=torch.ones(1, 3))


def test_flatten_fc_head_wrong_shaped_mask_refused_clearly():
    head = gp.FlattenFCHead(2, (3,), 4, hidden=5)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(1, 3\), got \(3,\)"):
        head(torch.randn(1, 2, 3), mask=torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize(
    ("module", "shape"),
    [(gp.AttentionPool(6), (2, 5, 4)), (gp.NiNHead(6, 3), (2, 5, 4)),
     (gp.FlattenFCHead(6, (4,), 3), (2, 5, 4))],
    ids=["AttentionPool", "NiNHead", "FlattenFCHead"],
)
def test_wrong_channel_count_refused_clearly(module, shape):
    with pytest.raises(ValueError, match=r"\(\w+=6\) got input with 5 channels \(dim 1 for layout="):
        module(torch.randn(shape))


# --- construction checks everything ------------------------------------------------------------

@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: gp.GlobalPool("avg", backend="cuda"), ValueError, r"backend must be one of .*'cuda'"),
        (lambda: gp.GeM(backend="fast"), ValueError, r"backend must be one of .*'fast'"),
        (lambda: gp.AttentionPool(4, backend="gpu"), ValueError, r"backend must be one of"),
        (lambda: gp.NiNHead(4, 2, backend="x"), ValueError, r"backend must be one of"),
        (lambda: gp.GlobalPool("gem", P=3), TypeError,
         r"kind 'gem' got unexpected parameter\(s\) \['P'\]; it takes p, eps"),
        (lambda: gp.GlobalPool("avg", p=3), TypeError, r"kind 'avg' got unexpected parameter"),
        (lambda: gp.GlobalPool("gem", p=0.5), ValueError, r"p for kind 'gem' must be >= 1, got 0.5"),
        (lambda: gp.GlobalPool("gem", p=float("inf")), ValueError, r"must be finite, got inf"),
        (lambda: gp.GlobalPool("gem", p=torch.tensor(float("nan"))), ValueError,
         r"must be finite, got nan"),
        (lambda: gp.GlobalPool("gem", eps=0.0), ValueError, r"eps for kind 'gem' must be >= 1.17549e-38"),
        (lambda: gp.GlobalPool("lse", r=float("inf")), ValueError, r"r for kind 'lse' must be finite"),
        (lambda: gp.GlobalPool("lse", r="2"), TypeError, r"r for kind 'lse' must be a real number"),
        (lambda: gp.GlobalPool("avg", keepdim="False"), TypeError, r"keepdim must be a bool"),
        (lambda: gp.GeM(keepdim="False"), TypeError, r"keepdim must be a bool"),
        (lambda: gp.AttentionPool(4, keepdim=1), TypeError, r"keepdim must be a bool"),
        (lambda: gp.GeM(p=float("nan")), ValueError, r"p must be a finite number >= 1, got nan"),
        (lambda: gp.GeM(p=float("inf")), ValueError, r"p must be a finite number >= 1, got inf"),
        (lambda: gp.GeM(p="3"), TypeError, r"p must be a real number"),
        (lambda: gp.GeM(eps=float("inf")), ValueError, r"eps for kind 'gem' must be finite"),
        (lambda: gp.GeM(eps=-1.0), ValueError, r"eps for kind 'gem' must be >= 1.17549e-38, got -1.0"),
        (lambda: gp.GeM(learnable="no"), TypeError, r"learnable must be a bool"),
        (lambda: gp.AttentionPool(0), ValueError, r"channels must be a positive int, got 0"),
        (lambda: gp.make_pool("attention", 4, p=3.0), TypeError,
         r"pool 'attention' got unexpected argument\(s\) \['p'\]; it takes keepdim, backend"),
        (lambda: gp.make_pool("gem", 4, r=3.0), TypeError, r"pool 'gem' got unexpected argument"),
    ],
)
def test_bad_module_argument_refused_at_construction(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_global_pool_attention_takes_weights_at_the_call():
    layer = gp.GlobalPool("attention")
    x = torch.randn(2, 3, 4)
    assert layer(x, weights=torch.rand(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(name="nin", layout="channels_last", p=3.0), r"head 'nin' got unexpected argument"),
        (dict(name="nin", dropout=0.5), r"head 'nin' got unexpected argument\(s\) \['dropout'\]"),
        (dict(name="fc", p=3.0), r"head 'fc' got unexpected argument\(s\) \['p'\]"),
        (dict(name="fc", r=1.0), r"head 'fc' got unexpected argument\(s\) \['r'\]"),
        (dict(name="avg", p=3.0), r"pool 'avg'|kind 'avg' got unexpected parameter"),
    ],
)
def test_make_head_refuses_arguments_the_head_does_not_use(kwargs, match):
    name = kwargs.pop("name")
    with pytest.raises(TypeError, match=match):
        gp.make_head(name, 4, 3, spatial_size=(5,), **kwargs)


def test_make_head_refuses_bad_backend_and_layout():
    with pytest.raises(ValueError, match=r"backend must be one of .*'cuda'"):
        gp.make_head("fc", 4, 3, spatial_size=(5,), backend="cuda")
    with pytest.raises(ValueError, match=r"layout must be one of .*'NHWC'"):
        gp.make_head("avg", 4, 3, layout="NHWC")


@pytest.mark.parametrize("name", ["nin", "fc", "avg", "attention"])
def test_make_head_channels_last_gives_the_channels_first_logits(name):
    torch.manual_seed(0)
    first = gp.make_head(name, 6, 3, spatial_size=(4, 5))
    last = gp.make_head(name, 6, 3, spatial_size=(4, 5), layout="channels_last")
    x = torch.randn(2, 6, 4, 5)
    mask = torch.rand(2, 4, 5) > 0.3
    mask[:, 0, 0] = True
    if name == "fc":  # flattening order differs: map the weights across
        last.load_state_dict(first.state_dict())
        with torch.no_grad():
            w = first.hidden.weight.view(-1, 6, 4, 5).permute(0, 2, 3, 1).reshape(-1, 120)
            last.hidden.weight.copy_(w)
    else:
        last.load_state_dict(first.state_dict())
    torch.testing.assert_close(last(x.movedim(1, -1), mask=mask), first(x, mask=mask))


def test_nin_class_maps_channels_last():
    head = gp.NiNHead(6, 3, layout="channels_last")
    assert head.class_maps(torch.randn(2, 4, 5, 6)).shape == (2, 4, 5, 3)


# --- swap_pool -----------------------------------------------------------------------------------

def test_swap_pool_refuses_max_pool_returning_indices():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Sequential(nn.AdaptiveMaxPool2d(1, return_indices=True)))
    with pytest.raises(ValueError, match=r"cannot swap '1.0': AdaptiveMaxPool2d\(return_indices=True\)"):
        gp.swap_pool(net, "avg")
    assert isinstance(net[1][0], nn.AdaptiveMaxPool2d)  # left untouched


class _SharedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.pool_again = self.pool  # the same module under a second name
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return self.fc((self.pool(f) + self.pool_again(f)).flatten(1))


@pytest.mark.parametrize("kind", ["max", "gem", "catavgmax"])
def test_swap_pool_replaces_a_shared_pool_under_every_name(kind):
    net = _SharedPool()
    gp.swap_pool(net, kind, classifier="fc")
    assert not isinstance(net.pool_again, nn.AdaptiveAvgPool2d)
    assert net.pool is net.pool_again  # still one shared module
    assert net(torch.randn(2, 3, 5, 5)).shape == (2, 2)


# --- per-channel p (gem) and r (lse): gp.pool against the NumPy reference ---------------------


def _channels_input(layout: str, spatial: tuple[int, ...], c: int = 4, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shape = (3, c, *spatial) if layout == "channels_first" else (3, *spatial, c)
    x = torch.rand(shape, generator=gen, dtype=torch.float64) * 3 + 0.05
    mask = torch.rand((3, *spatial), generator=gen) > 0.4
    mask.view(3, -1)[:, 0] = True
    mask.view(3, -1)[2] = False  # an empty sample: 0 out, 0 gradient
    return x, mask


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("spatial", [(7,), (3, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_per_channel_gem_p_matches_reference_value_grad_x_and_grad_p(layout, spatial, masked):
    from globalpool import reference

    x, mask = _channels_input(layout, spatial)
    mask = mask if masked else None
    p = torch.tensor([1.0, 1.7, 3.0, 9.5], dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    y = gp.pool(x, "gem", p=p, layout=layout, mask=mask)
    ref_mask = None if mask is None else mask.numpy()
    expected = reference.pool_forward(
        x.detach().numpy(), "gem", p=p.detach().numpy(), layout=layout, mask=ref_mask
    )
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-10, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y.backward(g)
    grads = reference.pool_backward(
        x.detach().numpy(), g.numpy(), "gem", p=p.detach().numpy(), layout=layout, mask=ref_mask
    )
    assert grads["p"].shape == (4,)
    torch.testing.assert_close(x.grad, torch.from_numpy(grads["x"]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p.grad, torch.from_numpy(grads["p"]), rtol=1e-9, atol=1e-12)
    # per channel means: channel i pools exactly as a scalar p[i] would
    for i in range(4):
        one = x.detach().select(1 if layout == "channels_first" else -1, i).unsqueeze(
            1 if layout == "channels_first" else -1
        )
        scalar = gp.pool(one, "gem", p=float(p[i]), layout=layout, mask=mask)
        torch.testing.assert_close(y.detach()[:, i], scalar[:, 0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_per_channel_lse_r_matches_reference_and_finite_differences(layout):
    from globalpool import reference

    x, mask = _channels_input(layout, (3, 5))
    r = torch.tensor([0.01, 0.5, 2.0, 8.0], dtype=torch.float64, requires_grad=True)
    x.requires_grad_(True)
    y = gp.pool(x, "lse", r=r, layout=layout, mask=mask)
    xn, mn, rn = x.detach().numpy(), mask.numpy(), r.detach().numpy()
    expected = reference.pool_forward(xn, "lse", r=rn, layout=layout, mask=mn)
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-9, atol=1e-12)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y.backward(g)
    grads = reference.pool_backward(xn, g.numpy(), "lse", r=rn, layout=layout, mask=mn)
    torch.testing.assert_close(x.grad, torch.from_numpy(grads["x"]), rtol=1e-9, atol=1e-12)
    # the reference has no grad r: central differences of its forward, one channel at a time
    h = 1e-6
    for i in range(4):
        up, down = rn.copy(), rn.copy()
        up[i] += h
        down[i] -= h
        diff = (
            reference.pool_forward(xn, "lse", r=up, layout=layout, mask=mn)
            - reference.pool_forward(xn, "lse", r=down, layout=layout, mask=mn)
        ) / (2 * h)
        assert abs(float((g.numpy() * diff).sum()) - float(r.grad[i])) < 1e-6


def test_per_channel_p_gradcheck():
    x, mask = _channels_input("channels_first", (3, 3), c=3)
    x.requires_grad_(True)
    p = torch.tensor([1.3, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, p: gp.pool(x, "gem", p=p, mask=mask), (x, p))
    assert torch.autograd.gradcheck(lambda x, r: gp.pool(x, "lse", r=r, mask=mask), (x, r))


def test_per_channel_p_in_adaptive_pool_matches_reference():
    from globalpool import reference

    x, mask = _channels_input("channels_last", (5, 7))
    x.requires_grad_(True)
    p = torch.tensor([1.0, 2.0, 3.0, 6.0], dtype=torch.float64, requires_grad=True)
    y = gp.adaptive_pool(x, (2, 3), "gem", p=p, layout="channels_last", mask=mask)
    xn, pn, mn = x.detach().numpy(), p.detach().numpy(), mask.numpy()
    expected = reference.adaptive_forward(xn, (2, 3), "gem", p=pn, layout="channels_last", mask=mn)
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-10, atol=1e-12)
    g = torch.ones_like(y)
    y.backward(g)
    grads = reference.adaptive_backward(
        xn, g.numpy(), (2, 3), "gem", p=pn, layout="channels_last", mask=mn
    )
    torch.testing.assert_close(x.grad, torch.from_numpy(grads["x"]), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(p.grad, torch.from_numpy(grads["p"]), rtol=1e-9, atol=1e-12)


def test_per_channel_p_has_no_kernel_auto_composes_and_fused_refuses():
    from globalpool import kernels, reference

    x = torch.rand(2, 64, 32, 32) + 0.1  # 131072 elements: auto would take the kernel for one p
    p = torch.linspace(1.0, 5.0, 64)
    assert kernels.supports(x, "gem", p=torch.tensor(3.0))
    assert not kernels.supports(x, "gem", p=p) and not kernels.supports(x, "lse", r=p)
    expected = reference.pool_forward(x.numpy(), "gem", p=p.numpy())
    torch.testing.assert_close(gp.pool(x, "gem", p=p), torch.from_numpy(expected).float())
    message = r"backend='fused' .*a per-channel p \(shape \(64,\)\) has no kernel.*backend='auto'"
    with pytest.raises(ValueError, match=message):
        gp.pool(x, "gem", p=p, backend="fused")
    with pytest.raises(ValueError, match=r"per-channel r .*'torch'"):
        gp.pool(x, "lse", r=p, backend="fused")


@pytest.mark.parametrize(
    ("p", "error", "match"),
    [
        (torch.full((5,), 3.0), ValueError,
         r"p for kind 'gem' must have shape \(C,\) = \(4,\) \(one value per channel of x, dim 1 "
         r"for layout='channels_first'\), got shape \(5,\)"),
        (torch.tensor([3.0, 0.5, 2.0, 2.0]), ValueError,
         r"p for kind 'gem' must be finite and >= 1 in every channel, got 0.5 at channel 1"),
        (torch.tensor([3.0, 2.0, float("inf"), 2.0]), ValueError, r"got inf at channel 2"),
        (torch.tensor([3.0, 2.0, 2.0, float("nan")]), ValueError, r"got nan at channel 3"),
        (torch.tensor([3, 2, 2, 2]), TypeError, r"p for kind 'gem' must be a floating tensor"),
        (torch.full((4, 1), 3.0), TypeError, r"or a \(C,\) tensor, one per channel"),
        (torch.full((4,), 3.0, device="meta"), ValueError, r"p for kind 'gem' must be on x's device"),
    ],
)
def test_per_channel_p_refused_clearly(p, error, match):
    with pytest.raises(error, match=match):
        gp.pool(torch.rand(2, 4, 3, 3), "gem", p=p)


def test_per_channel_r_refused_clearly_and_fixed_layers_check_values():
    with pytest.raises(ValueError, match=r"r for kind 'lse' must be finite and > 0 in every channel"):
        gp.pool(torch.rand(2, 3, 5), "lse", r=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=r"must have shape \(C,\) = \(3,\) .* dim 2 .*got shape \(2,\)"):
        gp.pool(torch.rand(2, 5, 3), "lse", r=torch.ones(2), layout="channels_last")
    with pytest.raises(ValueError, match=r"p for kind 'gem' must be finite and >= 1 in every"):
        gp.GlobalPool("gem", p=torch.tensor([2.0, 0.9]))
    layer = gp.GlobalPool("gem", p=torch.tensor([1.0, 4.0]))  # its size is checked at the call
    assert layer(torch.rand(3, 2, 6)).shape == (3, 2)
    with pytest.raises(ValueError, match=r"must have shape \(C,\) = \(3,\)"):
        layer(torch.rand(3, 3, 6))


# --- GeM(channels=C) and LSEPool: learnable, in range by construction, no NaN in half ---------


def test_per_channel_gem_learns_one_p_per_channel_and_stays_at_least_one():
    gem = gp.GeM(p=3.0, channels=4)
    assert gem.p.shape == (4,) and torch.allclose(gem.p, torch.full((4,), 3.0))
    opt = torch.optim.SGD(gem.parameters(), lr=50.0)
    x = torch.rand(8, 4, 5, 5) + 0.1
    for _ in range(200):  # push every p down as hard as possible
        opt.zero_grad()
        gem.p.sum().mul(100.0).backward()
        opt.step()
    assert torch.isfinite(gem.p).all() and (gem.p >= 1.0).all()
    assert torch.isfinite(gem(x)).all()
    gem = gp.GeM(p=3.0, channels=4)
    weights = torch.tensor([1.0, -1.0, 2.0, 0.0])  # each channel's p gets its own gradient
    (gem(x) * weights).sum().backward()
    grad = gem.raw_p.grad
    assert grad.shape == (4,) and grad[3] == 0 and grad[0] * grad[1] < 0
    with pytest.raises(ValueError, match=r"GeM\(channels=4\) got input with 3 channels"):
        gem(torch.rand(2, 3, 5))


def test_per_channel_gem_raw_p_is_in_the_state_dict_and_loads():
    gem = gp.GeM(p=2.0, channels=3)
    with torch.no_grad():
        gem.raw_p.copy_(torch.tensor([-1.0, 0.0, 2.0]))
    other = gp.GeM(channels=3)
    other.load_state_dict(gem.state_dict())
    torch.testing.assert_close(other.p, gem.p)
    assert list(gem.state_dict()) == ["raw_p"]


@pytest.mark.parametrize("channels", [None, 4])
def test_gem_no_nan_under_bfloat16_autocast_with_a_float16_input(channels):
    gem = gp.GeM(p=3.0, channels=channels)
    x = (torch.rand(2, 4, 6, 6) * 2).half().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gem(x)
    y.float().sum().backward()
    assert y.dtype == torch.float16 and torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gem.raw_p.grad).all()
    expected = gp.pool(x.detach().double(), "gem", p=gem.p.detach().double())
    torch.testing.assert_close(y.double(), expected, rtol=4e-3, atol=4e-3)


@pytest.mark.parametrize("channels", [None, 4])
def test_gem_float16_near_its_largest_value_keeps_value_and_gradients_finite(channels):
    gem = gp.GeM(p=6.0, channels=channels).half()  # p and its parameter in float16 as well
    x = torch.full((2, 4, 3, 3), 6.0e4, dtype=torch.float16)
    x[:, :, 0, 0] = 6.5e4
    x.requires_grad_(True)
    y = gem(x)
    y.float().sum().backward()
    assert torch.isfinite(y).all() and (y > 5.9e4).all()
    assert torch.isfinite(x.grad).all() and torch.isfinite(gem.raw_p.grad).all()


def test_lse_pool_r_stays_positive_when_pushed_down():
    for channels in (None, 3):
        lse = gp.LSEPool(r=1.0, channels=channels)
        opt = torch.optim.SGD(lse.parameters(), lr=100.0)
        for _ in range(200):
            opt.zero_grad()
            lse.r.sum().mul(100.0).backward()
            opt.step()
        assert torch.isfinite(lse.r).all() and (lse.r > 0).all() and (lse.r >= lse.r_min).all()
        y = lse(torch.randn(2, 3, 9) * 10)
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("channels", [None, 3])
def test_lse_pool_gradient_matches_finite_differences_of_the_reference(channels):
    from globalpool import reference

    lse = gp.LSEPool(r=1.5, channels=channels).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=gen)
    mask = torch.rand(2, 4, 5, generator=gen) > 0.5
    mask[:, 0, 0] = True
    y = lse(x, mask=mask)
    r = lse.r.detach().numpy()
    expected = reference.pool_forward(x.numpy(), "lse", r=r, mask=mask.numpy())
    torch.testing.assert_close(y.detach(), torch.from_numpy(expected), rtol=1e-10, atol=1e-12)
    y.sum().backward()
    dr_draw = torch.sigmoid(lse.raw_r.detach()).numpy()  # r = r_min + softplus(raw)
    h = 1e-6
    for i in range(r.size):
        up, down = r.copy(), r.copy()
        if r.ndim:
            up[i] += h
            down[i] -= h
        else:
            up, down = r + h, r - h
        diff = (
            reference.pool_forward(x.numpy(), "lse", r=up, mask=mask.numpy()).sum()
            - reference.pool_forward(x.numpy(), "lse", r=down, mask=mask.numpy()).sum()
        ) / (2 * h)
        got = lse.raw_r.grad.reshape(-1)[i].item()
        assert abs(got - diff * dr_draw.reshape(-1)[i]) < 1e-6


def test_fixed_lse_r_with_a_mask_gets_a_finite_gradient_on_every_backend():
    """exp(r * -inf) at a padded position must not turn d/dr into -inf * 0 = NaN."""
    x = torch.rand(2, 64, 32, 32)
    mask = torch.rand(2, 32, 32) > 0.5
    mask[1] = False  # and an empty sample
    grads = []
    for backend in ("torch", "fused"):
        r = torch.tensor(1.5, requires_grad=True)
        gp.pool(x, "lse", r=r, mask=mask, backend=backend).sum().backward()
        grads.append(r.grad)
    assert torch.isfinite(grads[0]) and grads[0] != 0
    torch.testing.assert_close(grads[0], grads[1])


def test_lse_pool_not_learnable_and_make_pool_routes():
    fixed = gp.LSEPool(r=2.0, learnable=False, channels=3)
    assert list(fixed.parameters()) == [] and fixed.r.shape == (3,)
    assert type(gp.make_pool("lse", 8, r=2.0)) is gp.GlobalPool  # as before: a fixed r
    learned = gp.make_pool("lse", 8, r=2.0, learnable=True)
    assert isinstance(learned, gp.LSEPool) and learned.r.shape == ()
    assert gp.make_pool("lse", 8, per_channel=True).r.shape == (8,)
    assert gp.make_pool("gem", 8, per_channel=True).p.shape == (8,)
    head = gp.make_head("lse", 8, 3, learnable=True, per_channel=True)
    assert isinstance(head.pool, gp.LSEPool) and head.pool.r.shape == (8,)
    assert head(torch.randn(2, 8, 5)).shape == (2, 3)
    assert "r=2.0000, learnable=True" in repr(learned)
    assert "p=[3.0000..3.0000] x 8" in repr(gp.GeM(channels=8))


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: gp.LSEPool(r=0.0), ValueError, r"r must be a number >= 0.001, got 0.0"),
        (lambda: gp.LSEPool(r=1e-3), ValueError, r"r must be > 0.001 for a learnable LSEPool"),
        (lambda: gp.LSEPool(r=float("inf")), ValueError, r"r must be a finite number"),
        (lambda: gp.LSEPool(r="1"), TypeError, r"r must be a real number"),
        (lambda: gp.LSEPool(r_min=0.0), ValueError, r"r_min must be a number > 0, got 0.0"),
        (lambda: gp.LSEPool(channels=0), ValueError, r"channels must be a positive int, got 0"),
        (lambda: gp.LSEPool(learnable=1), TypeError, r"learnable must be a bool"),
        (lambda: gp.GeM(channels=2.0), ValueError, r"channels must be a positive int, got 2.0"),
        (lambda: gp.GeM(p=1.0), ValueError, r"p must be > 1 for a learnable GeM"),
        (lambda: gp.make_pool("lse", 4, p=3.0), TypeError,
         r"pool 'lse' got unexpected argument\(s\) \['p'\]; it takes r, learnable, per_channel"),
        (lambda: gp.make_pool("gem", 4, per_channel=1), TypeError, r"per_channel must be a bool"),
        (lambda: gp.make_pool("lse", 4, learnable="yes"), TypeError, r"learnable must be a bool"),
    ],
)
def test_bad_lse_pool_or_per_channel_argument_refused(build, error, match):
    with pytest.raises(error, match=match):
        build()
