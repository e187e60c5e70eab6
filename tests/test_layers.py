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
    }


@pytest.mark.parametrize("backend", ["torch", "fused"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
@pytest.mark.parametrize("name", list(_leak_cases()))
def test_nan_at_padded_positions_leaves_output_and_every_gradient_finite(name, layout, backend):
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
        (lambda: gp.GlobalPool("gem", eps=0.0), ValueError, r"eps for kind 'gem' must be > 0"),
        (lambda: gp.GlobalPool("lse", r=float("inf")), ValueError, r"r for kind 'lse' must be finite"),
        (lambda: gp.GlobalPool("lse", r="2"), TypeError, r"r for kind 'lse' must be a real number"),
        (lambda: gp.GlobalPool("avg", keepdim="False"), TypeError, r"keepdim must be a bool"),
        (lambda: gp.GeM(keepdim="False"), TypeError, r"keepdim must be a bool"),
        (lambda: gp.AttentionPool(4, keepdim=1), TypeError, r"keepdim must be a bool"),
        (lambda: gp.GeM(p=float("nan")), ValueError, r"p must be a finite number >= 1, got nan"),
        (lambda: gp.GeM(p=float("inf")), ValueError, r"p must be a finite number >= 1, got inf"),
        (lambda: gp.GeM(p="3"), TypeError, r"p must be a real number"),
        (lambda: gp.GeM(eps=float("inf")), ValueError, r"eps for kind 'gem' must be finite"),
        (lambda: gp.GeM(eps=-1.0), ValueError, r"eps for kind 'gem' must be > 0, got -1.0"),
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
