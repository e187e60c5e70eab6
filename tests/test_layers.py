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
def test_layers_accept_mask_or_reject_it_clearly(name):
    layer = _layers()[name]
    x = torch.randn(2, 6, 5, 5)
    mask = torch.rand(2, 5, 5) > 0.3
    mask[:, 0, 0] = True
    if name == "AdaptivePool":
        with pytest.raises(ValueError, match="mask"):
            layer(x, mask=mask)
        return
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
