"""globalpool.compat.timm: timm's SelectAdaptivePool2d, create_classifier and global_pool_nlc,
checked against plain float64 compositions (mean / amax / cat, timm's definitions), with
swap_pool on a timm-style model, every registered kind, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import globalpool as gp
from globalpool import registry
from globalpool.compat.timm import (
    SelectAdaptivePool,
    SelectAdaptivePool2d,
    create_classifier,
    global_pool_nlc,
)

TIMM_TYPES = ("avg", "max", "avgmax", "catavgmax")
FAST_TYPES = ("fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")
SPATIAL = {"NCHW": (2, 3), "NHWC": (1, 2), "NLC": (1,)}
CHANNEL = {"NCHW": 1, "NHWC": 3, "NLC": 2}


def _base(pool_type: str) -> str:
    rest = pool_type.removeprefix("fast")
    return rest or "avg"


def timm_pool(x: torch.Tensor, pool_type: str, fmt: str, flatten: bool) -> torch.Tensor:
    """timm's definitions, written out: avgmax = 0.5 (avg + max), catavgmax = cat(avg, max)."""
    dims = SPATIAL[fmt]
    avg, top = x.mean(dims, keepdim=True), x.amax(dims, keepdim=True)
    y = {
        "avg": avg,
        "max": top,
        "avgmax": 0.5 * (avg + top),
        "catavgmax": torch.cat([avg, top], CHANNEL[fmt]),
    }[_base(pool_type)]
    return y.flatten(1) if flatten else y


def _features(fmt: str, n: int = 2, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"NCHW": (n, c, 4, 3), "NHWC": (n, 4, 3, c), "NLC": (n, 7, c)}[fmt]
    return torch.randn(shape, generator=g, dtype=torch.float64)


def _same_values_and_grads(module, reference, x: torch.Tensor, **call) -> None:
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    got, want = module(a, **call), reference(b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)
    (got * upstream).sum().backward()
    (want * upstream).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)


# --- SelectAdaptivePool: timm's pool types -------------------------------------------------------


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
@pytest.mark.parametrize("pool_type", TIMM_TYPES + FAST_TYPES)
def test_timm_pool_types_match_timms_definitions(pool_type, fmt, flatten):
    pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten, input_fmt=fmt)
    x = _features(fmt)
    _same_values_and_grads(pool, lambda t: timm_pool(t, pool_type, fmt, flatten), x)
    assert pool.feat_mult() == (2 if pool_type.endswith("catavgmax") else 1)
    assert pool.pool_type == pool_type and not pool.is_identity()
    assert list(pool.parameters()) == [] and pool.state_dict() == {}


def test_default_is_timms_fast_avg_and_names_are_read_as_timm_reads_them():
    x = _features("NCHW")
    pool = SelectAdaptivePool()
    assert pool.pool_type == "fast"
    torch.testing.assert_close(pool(x), x.mean((2, 3), keepdim=True))
    torch.testing.assert_close(SelectAdaptivePool(pool_type="MAX", flatten=True)(x), x.amax((2, 3)))
    assert issubclass(SelectAdaptivePool2d, SelectAdaptivePool)


def test_globalpool_kinds_agree_with_timms_avgmax_and_catavgmax():
    x = _features("NCHW")
    for kind in TIMM_TYPES:
        torch.testing.assert_close(gp.pool(x, kind), timm_pool(x, kind, "NCHW", True))


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NLC"])
def test_no_pooling_passes_through_and_flattens_as_timm(fmt):
    x = _features(fmt)
    for pool_type in ("", None):
        pool = SelectAdaptivePool(pool_type=pool_type, input_fmt=fmt)
        assert pool.is_identity() and pool.pool_type == "" and pool(x) is x
        assert pool.feat_mult() == 1
    flat = SelectAdaptivePool(pool_type="", flatten=True, input_fmt=fmt)
    torch.testing.assert_close(flat(x), x.flatten(1))


def test_repr_under_timms_name_is_timms():
    assert repr(SelectAdaptivePool2d(pool_type="avg", flatten=True)) == (
        "SelectAdaptivePool2d(pool_type=avg, flatten=Flatten(start_dim=1, end_dim=-1))"
    )
    assert repr(create_classifier(8, 3, pool_type="max")[0]) == (
        "SelectAdaptivePool2d(pool_type=max, flatten=Flatten(start_dim=1, end_dim=-1))"
    )


def test_repr_is_timms():
    assert repr(SelectAdaptivePool(pool_type="avg", flatten=True)) == (
        "SelectAdaptivePool(pool_type=avg, flatten=Flatten(start_dim=1, end_dim=-1))"
    )
    assert repr(SelectAdaptivePool(pool_type="", flatten=False)) == (
        "SelectAdaptivePool(pool_type=, flatten=Identity())"
    )
    assert repr(SelectAdaptivePool(pool_type="gem", input_fmt="NLC", num_prefix_tokens=1, p=4.0)) == (
        "SelectAdaptivePool(pool_type=gem, flatten=Identity(), input_fmt=NLC, "
        "num_prefix_tokens=1, p=4.0)"
    )


@pytest.mark.parametrize(
    ("pool_type", "torch_pool"),
    [("avg", nn.functional.adaptive_avg_pool2d), ("max", nn.functional.adaptive_max_pool2d)],
)
def test_output_size_above_one_is_torchs_adaptive_pool(pool_type, torch_pool):
    x = _features("NCHW", c=3)
    x = torch.cat([x, x], dim=2)  # 8 x 3
    pool = SelectAdaptivePool((3, 2), pool_type=pool_type)
    _same_values_and_grads(pool, lambda t: torch_pool(t, (3, 2)), x)
    cat = SelectAdaptivePool(2, pool_type="catavgmax", flatten=True)
    want = torch.cat([nn.functional.adaptive_avg_pool2d(x, 2),
                      nn.functional.adaptive_max_pool2d(x, 2)], 1).flatten(1)
    torch.testing.assert_close(cat(x), want)
    assert cat.feat_mult() == 2 and isinstance(cat.pool, gp.AdaptivePool)


# --- every globalpool kind, tuples, parameters, masks ----------------------------------------------


def _per_position(kind: str, x: torch.Tensor, fmt: str) -> dict:
    if not any(q.per_position for q in registry.spec(kind).params):
        return {}
    shape = [s for d, s in enumerate(x.shape) if d != CHANNEL[fmt]]
    return {"weights": torch.rand(shape, dtype=x.dtype, generator=torch.Generator().manual_seed(3))}


@pytest.fixture
def my_kind():
    """A kind of the user's own: the range (max - min) of the real positions."""

    def spread(x, mask):
        if mask is None:
            return x.amax(-1) - x.amin(-1)
        hi = torch.where(mask, x, -torch.inf).amax(-1)
        lo = torch.where(mask, x, torch.inf).amin(-1)
        return torch.where(mask.any(-1), hi - lo, 0.0)

    gp.register_kind("spread", spread, summary="max - min")
    yield "spread"
    gp.unregister_kind("spread")


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC", "NLC"])
def test_every_registered_kind_and_a_tuple_is_accepted(fmt, my_kind):
    x = _features(fmt).abs() + 0.1
    layout = "channels_first" if fmt == "NCHW" else "channels_last"
    kinds = [*registry.kinds(), ("avg", "gem", my_kind)]
    assert my_kind in registry.kinds()
    for kind in kinds:
        pool = SelectAdaptivePool(pool_type=kind, flatten=True, input_fmt=fmt)
        extra = _per_position(kind, x, fmt) if isinstance(kind, str) else {}
        got = pool(x, **extra)
        torch.testing.assert_close(got, gp.pool(x, kind, layout=layout, **extra))
        assert got.shape[1] == x.shape[CHANNEL[fmt]] * pool.feat_mult()
        assert pool.state_dict() == {}
    assert SelectAdaptivePool(pool_type=("avg", "catavgmax")).feat_mult() == 3


def test_kind_parameters_and_fast_prefix_on_any_kind():
    x = _features("NHWC").abs()
    pool = SelectAdaptivePool(pool_type="fastgem", input_fmt="NHWC", flatten=True, p=4.0)
    want = x.pow(4.0).mean((1, 2)).pow(0.25)
    torch.testing.assert_close(pool(x), want, rtol=1e-6, atol=1e-6)
    assert pool.pool_type == "fastgem"


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_mask_leaves_padding_and_its_nan_out(fmt):
    x = _features(fmt)
    n = x.shape[0]
    spatial = [x.shape[d] for d in SPATIAL[fmt]]
    mask = torch.ones(n, *spatial, dtype=torch.bool)
    mask[0, 2:, :] = False  # sample 0: the first two rows are real
    x = x.clone()
    x[(~mask).unsqueeze(CHANNEL[fmt]).expand_as(x)] = float("nan")
    x.requires_grad_()
    y = SelectAdaptivePool(pool_type="catavgmax", flatten=True, input_fmt=fmt)(x, mask=mask)
    real0 = x[0:1, :, :2] if fmt == "NCHW" else x[0:1, :2]
    torch.testing.assert_close(y[0:1], timm_pool(real0.detach(), "catavgmax", fmt, True))
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert (x.grad[(~mask).unsqueeze(CHANNEL[fmt]).expand_as(x)] == 0).all()


# --- tokens: NLC, prefix tokens, the class token, global_pool_nlc ---------------------------------


def timm_nlc(x, pool_type, num_prefix_tokens, reduce_include_prefix):
    """timm's global_pool_nlc, written out."""
    if pool_type == "token":
        return x[:, 0]
    x = x if reduce_include_prefix else x[:, num_prefix_tokens:]
    return timm_pool(x, pool_type, "NLC", True)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 5])
@pytest.mark.parametrize("pool_type", [*TIMM_TYPES, "token"])
def test_token_pooling_matches_timms_global_pool_nlc(pool_type, prefix, include):
    x = _features("NLC")
    want = lambda t: timm_nlc(t, pool_type, prefix, include)  # noqa: E731
    _same_values_and_grads(
        lambda t: global_pool_nlc(t, pool_type, prefix, include), want, x
    )
    module = SelectAdaptivePool(
        pool_type=pool_type, flatten=True, input_fmt="NLC", num_prefix_tokens=prefix,
        reduce_include_prefix=include,
    )
    _same_values_and_grads(module, want, x)
    kept = SelectAdaptivePool(pool_type=pool_type, input_fmt="NLC", num_prefix_tokens=prefix)
    assert kept(x).shape == (x.shape[0], 1, x.shape[2] * kept.feat_mult())


def test_global_pool_nlc_defaults_and_no_pooling():
    x = _features("NLC")
    torch.testing.assert_close(global_pool_nlc(x), x[:, 0])  # timm's default: the class token
    assert global_pool_nlc(x, "") is x
    torch.testing.assert_close(global_pool_nlc(x, "gem", 1, p=1.0), x[:, 1:].clamp(min=1e-6).mean(1))


def test_token_mask_with_nan_padding_and_prefix_tokens():
    """Right-padded sequences of different lengths: padded tokens (NaN here) never reach the
    output or the gradient, while an unmasked mean is NaN (the pitfall a mask avoids)."""
    x = _features("NLC").clone()
    lengths = torch.tensor([7, 4])
    mask = torch.arange(7) < lengths[:, None]
    x[~mask] = float("nan")
    x.requires_grad_()
    y = global_pool_nlc(x, "avgmax", num_prefix_tokens=1, mask=mask)
    for i, length in enumerate(lengths.tolist()):
        patches = x[i : i + 1, 1:length].detach()
        torch.testing.assert_close(y[i : i + 1], timm_pool(patches, "avgmax", "NLC", True))
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()
    assert (x.grad[:, 0] == 0).all()  # the class token is left out of the pool
    module = SelectAdaptivePool(pool_type="avgmax", input_fmt="NLC", num_prefix_tokens=1,
                                flatten=True)
    torch.testing.assert_close(module(x, mask=mask), y)
    assert torch.isnan(timm_nlc(x.detach(), "avgmax", 1, False)[1]).all()
    torch.testing.assert_close(global_pool_nlc(x, "token", mask=mask), x[:, 0])
    token = SelectAdaptivePool(pool_type="token", input_fmt="NLC", flatten=True)
    torch.testing.assert_close(token(x, mask=mask), x[:, 0])
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(2, 7\)"):
        token(x, mask=mask[:, 1:])


def test_gradcheck():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    pool = SelectAdaptivePool(pool_type="catavgmax", input_fmt="NHWC", flatten=True)
    assert torch.autograd.gradcheck(pool, (x,))
    t = torch.randn(2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    assert torch.autograd.gradcheck(lambda u: global_pool_nlc(u, "avgmax", 2, mask=mask), (t,))
    assert torch.autograd.gradcheck(lambda u: global_pool_nlc(u, "lse", 1, r=2.0), (t,))


# --- create_classifier ---------------------------------------------------------------------------


def test_create_classifier_returns_timms_tuple():
    pool, fc = create_classifier(8, 3)
    assert isinstance(pool, SelectAdaptivePool) and pool.pool_type == "avg"
    assert isinstance(pool.flatten, nn.Flatten) and (fc.in_features, fc.out_features) == (8, 3)
    pool, drop, fc = create_classifier(8, 3, "catavgmax", drop_rate=0.2)
    assert isinstance(drop, nn.Dropout) and drop.p == 0.2 and fc.in_features == 16
    pool, fc = create_classifier(8, 0, "catavgmax")
    assert isinstance(fc, nn.Identity)
    pool, fc = create_classifier(8, 3, "")
    assert pool.is_identity() and isinstance(pool.flatten, nn.Identity) and fc.in_features == 8
    pool, fc = create_classifier(8, 3, "gem", dtype=torch.float64)
    assert fc.weight.dtype == torch.float64
    pool, fc = create_classifier(8, 3, "token", input_fmt="NLC")
    torch.testing.assert_close(pool(_features("NLC", c=8)), _features("NLC", c=8)[:, 0])


@pytest.mark.parametrize("pool_type", ["avg", "catavgmax", ("avg", "max", "gem")])
def test_create_classifier_with_a_1x1_convolution(pool_type):
    pool, fc = create_classifier(5, 3, pool_type, use_conv=True)
    assert isinstance(fc, nn.Conv2d) and fc.kernel_size == (1, 1)
    x = _features("NCHW").abs().float()
    pooled = pool(x)
    assert pooled.shape == (2, 5 * pool.feat_mult(), 1, 1)
    linear = nn.Linear(fc.in_channels, 3)
    with torch.no_grad():
        linear.weight.copy_(fc.weight.flatten(1))
        linear.bias.copy_(fc.bias)
    torch.testing.assert_close(fc(pooled).flatten(1), linear(pooled.flatten(1)))


# --- swap_pool on a timm-style model ---------------------------------------------------------------


class TimmStyleNet(nn.Module):
    """Like timm's ResNet: forward_features, global_pool + fc from create_classifier, and
    reset_classifier rebuilding both."""

    def __init__(self, num_classes: int = 4, global_pool: str = "avg", input_fmt: str = "NCHW",
                 num_features: int = 6):
        super().__init__()
        self.num_features, self.input_fmt = num_features, input_fmt
        self.conv = nn.Conv2d(3, self.num_features, 3)
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, input_fmt=input_fmt
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x))
        return y.permute(0, 2, 3, 1) if self.input_fmt == "NHWC" else y

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        like = {"device": self.conv.weight.device, "dtype": self.conv.weight.dtype}
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool, input_fmt=self.input_fmt, **like
        )


def _check_head(net: TimmStyleNet, x: torch.Tensor, pooled) -> None:
    """The model's logits are its fc of ``pooled(features)`` (a composition in the test)."""
    features = net.forward_features(x)
    torch.testing.assert_close(net(x), net.fc(pooled(features)), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_swap_pool_reset_classifier_swap_pool_again(fmt):
    torch.manual_seed(0)
    net = TimmStyleNet(input_fmt=fmt).double()
    dims = SPATIAL[fmt]
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    gp.swap_pool(net, "gem")  # same width: fc kept
    assert isinstance(net.global_pool.pool, gp.GeM) and net.global_pool.pool_type == "gem"
    assert net.global_pool.pool.layout == ("channels_last" if fmt == "NHWC" else "channels_first")
    p = float(net.global_pool.pool.p.detach())
    _check_head(net, x, lambda f: f.clamp(min=1e-6).pow(p).mean(dims).pow(1 / p))
    net.reset_classifier(5, global_pool="catavgmax")  # timm rebuilds its pool and fc here
    assert net.fc.in_features == 12 and net.global_pool.pool_type == "catavgmax"
    gp.swap_pool(net, "max")  # a narrower kind: fc rebuilt at the pool's width
    assert net.fc.in_features == 6 and net.fc.out_features == 5
    assert net.global_pool.feat_mult() == 1 and net.global_pool.pool_type == "max"
    _check_head(net, x, lambda f: f.amax(dims))
    gp.swap_pool(net, ("avg", "max"))  # and again, with no reset between
    assert net.fc.in_features == 12 and net.global_pool.feat_mult() == 2
    _check_head(net, x, lambda f: torch.cat([f.mean(dims), f.amax(dims)], 1))
    assert "pool=GlobalPool(kind=('avg', 'max')" in repr(net.global_pool)
    assert net(x).shape == (2, 5)


@pytest.mark.parametrize("learned", ["map", "simpool"])
def test_a_learned_pool_swapped_in_is_a_pool_type_reset_classifier_takes_back(learned):
    torch.manual_seed(0)
    net = TimmStyleNet(num_features=16)  # map's default 8 heads divide it
    x = torch.randn(2, 3, 7, 6)
    gp.swap_pool(net, learned)
    assert net.global_pool.pool_type == learned and net.global_pool.feat_mult() == 1
    net.reset_classifier(5, global_pool=net.global_pool.pool_type)
    assert type(net.global_pool.pool) is type(gp.make_learned_pool(learned, 16, "channels_first",
                                                                   {}))
    assert net.global_pool.pool_type == learned and net(x).shape == (2, 5)
    assert net.fc.in_features == 16
    with pytest.raises(ValueError, match=f"use_conv=True needs a pool that keeps the spatial "
                                         f"dims .* pool_type='{learned}' returns"):
        create_classifier(16, 5, pool_type=learned, use_conv=True)
    with pytest.raises(ValueError, match=f"pool_type='{learned}' is a learned pool .* "
                                         "create_classifier"):
        SelectAdaptivePool(pool_type=learned)


class ConvHeadNet(nn.Module):
    """timm's ``use_conv=True`` head (a 1x1 convolution on the kept (N, C, 1, 1) map, logits
    flattened after it) or ``num_classes=0`` (fc is nn.Identity)."""

    def __init__(self, num_classes: int = 4, use_conv: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3)
        self.global_pool, self.fc = create_classifier(6, num_classes, pool_type="avg",
                                                      use_conv=use_conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.global_pool(torch.relu(self.conv(x)))).flatten(1)


def test_swap_pool_widens_the_features_of_a_model_without_classifier():
    """num_classes=0: fc is nn.Identity, so a wider kind just gives wider features (as timm's
    catavgmax does there); a kind with per-channel weights is refused, the model unchanged."""
    torch.manual_seed(0)
    net = ConvHeadNet(num_classes=0).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    gp.swap_pool(net, "catavgmax")
    f = torch.relu(net.conv(x))
    torch.testing.assert_close(net(x), torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1))
    assert isinstance(net.fc, nn.Identity) and net.global_pool.feat_mult() == 2
    gp.swap_pool(net, "max", classifier="fc")  # and back, naming it
    torch.testing.assert_close(net(x), f.amax((2, 3)))
    before = [(n, id(m)) for n, m in net.named_modules()]
    for kind, params in (("map", {}), ("gem", {"per_channel": True}), ("attention", {})):
        with pytest.raises(ValueError, match=f"kind '{kind}': its per-channel weights need the "
                                             "channel count, and the classifier 'fc' is an "
                                             "nn.Identity"):
            gp.swap_pool(net, kind, **params)
    assert [(n, id(m)) for n, m in net.named_modules()] == before


def test_swap_pool_resizes_a_1x1_convolution_classifier():
    torch.manual_seed(0)
    net = ConvHeadNet(use_conv=True).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    gp.swap_pool(net, "catavgmax")
    assert isinstance(net.fc, nn.Conv2d) and net.fc.in_channels == 12
    assert net.fc.out_channels == 4 and net.fc.weight.dtype == torch.float64
    f = torch.relu(net.conv(x))
    pooled = torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)
    want = pooled @ net.fc.weight.flatten(1).T + net.fc.bias
    torch.testing.assert_close(net(x), want)
    gp.swap_pool(net, "gem", per_channel=True, classifier="fc")  # learned per channel: 6 wide
    assert net.fc.in_channels == 6 and net(x).shape == (2, 4)
    before = [(n, id(m)) for n, m in net.named_modules()]
    with pytest.raises(ValueError, match=r"kind 'map' returns \(N, C\) features, but the "
                                         r"classifier 'fc' is a 1x1 nn.Conv2d"):
        gp.swap_pool(net, "map")
    assert [(n, id(m)) for n, m in net.named_modules()] == before


def test_swap_pool_turns_a_class_token_readout_into_a_pool_of_the_patch_tokens():
    net = nn.Module()
    net.global_pool = SelectAdaptivePool(pool_type="token", input_fmt="NLC", num_prefix_tokens=1,
                                         flatten=True)
    net.fc = nn.Linear(5, 2)
    gp.swap_pool(net, "gem", p=2.0, learnable=False)
    x = _features("NLC").abs()
    want = x[:, 1:].pow(2.0).mean(1).sqrt()
    torch.testing.assert_close(net.global_pool(x), want)


def test_a_timm_checkpoint_loads_into_a_model_with_the_compat_pool():
    torch.manual_seed(0)
    for pool_type in ("avg", "catavgmax", "fastmax", "", "lse", ("avg", "gem")):
        net = TimmStyleNet(global_pool=pool_type)
        timm_like = nn.Module()  # a timm model's names, torch's adaptive pool inside
        timm_like.conv = nn.Conv2d(3, 6, 3)
        timm_like.global_pool = nn.Module()
        timm_like.global_pool.pool = nn.AdaptiveAvgPool2d(1)
        timm_like.fc = nn.Linear(6 * net.global_pool.feat_mult(), 4)
        net.load_state_dict(timm_like.state_dict(), strict=True)
        torch.testing.assert_close(net.fc.weight, timm_like.fc.weight)


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pool_type": "mean"}, ValueError,
         r"pool_type must be '' \(no pooling\), 'token' .*got 'mean'"),
        ({"pool_type": "fastmean"}, ValueError, r"a kind of \('avg', 'max'.*got 'fastmean'"),
        ({"pool_type": 3}, ValueError, r"pool_type must be .* got 3"),
        ({"pool_type": ("avg", "mean")}, ValueError, r"pool_type must be one of .*'mean' is not"),
        ({"pool_type": "token"}, ValueError,
         r"pool_type='token' .* needs token sequences, input_fmt='NLC'; got input_fmt='NCHW'"),
        ({"input_fmt": "nchw"}, ValueError,
         r"input_fmt must be one of \('NCHW', 'NHWC', 'NLC'\), got 'nchw'"),
        ({"input_fmt": "NCL"}, ValueError, r"input_fmt must be one of .* got 'NCL'"),
        ({"flatten": "yes"}, TypeError, r"flatten must be a bool \(True or False\), got 'yes'"),
        ({"flatten": 1}, TypeError, r"flatten must be a bool"),
        ({"input_fmt": "NLC", "num_prefix_tokens": -1}, ValueError,
         r"num_prefix_tokens must be an int >= 0 .* got -1"),
        ({"input_fmt": "NLC", "num_prefix_tokens": 1.0}, TypeError,
         r"num_prefix_tokens must be an int >= 0 .* got 1.0"),
        ({"input_fmt": "NLC", "num_prefix_tokens": True}, TypeError,
         r"num_prefix_tokens must be an int"),
        ({"num_prefix_tokens": 1}, ValueError,
         r"num_prefix_tokens must be 0 for input_fmt='NCHW' .* got 1"),
        ({"input_fmt": "NLC", "reduce_include_prefix": "no"}, TypeError,
         r"reduce_include_prefix must be a bool"),
        ({"output_size": 2, "pool_type": "fastavg"}, ValueError,
         r"output_size must be 1 for pool_type='fastavg' \(a global pool\), got 2"),
        ({"output_size": 0, "pool_type": "avg"}, ValueError, r"output_size must be a positive"),
        ({"pool_type": "gem", "q": 3}, TypeError, r"kind 'gem' got unexpected parameter"),
        ({"pool_type": "", "p": 3}, TypeError, r"pool_type='' \(no pooling\) takes no pool"),
    ],
)
def test_bad_arguments_are_refused_clearly(kwargs, error, match):
    with pytest.raises(error, match=match):
        SelectAdaptivePool(**kwargs)


def test_bad_calls_are_refused_clearly():
    x = _features("NLC")
    with pytest.raises(ValueError, match=r"pool_type must be '' .*got 'cls'"):
        global_pool_nlc(x, "cls")
    with pytest.raises(ValueError, match=r"num_prefix_tokens must be an int >= 0 .* got -2"):
        global_pool_nlc(x, "avg", -2)
    with pytest.raises(ValueError, match=r"num_prefix_tokens=7 leaves no token to pool in x of "
                                         r"shape \(2, 7, 5\) \(N, L, C\); expected .* < L = 7"):
        global_pool_nlc(x, "avg", 7)
    with pytest.raises(ValueError, match=r"mask must be None with pool_type='' \(no pooling\)"):
        global_pool_nlc(x, "", mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(2, 7\), got \(2, 6\)"):
        global_pool_nlc(x, "avg", 1, mask=torch.ones(2, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) for input_fmt='NCHW', got "
                                         r"shape \(2, 7, 5\)"):
        SelectAdaptivePool(pool_type="avg")(x)
    with pytest.raises(ValueError, match=r"x must be \(N, L, C\) for input_fmt='NLC'"):
        global_pool_nlc(_features("NCHW"), "avg")
    with pytest.raises(ValueError, match=r"num_classes must be an int >= 0 \(0: no classifier\), "
                                         r"got -1"):
        create_classifier(8, -1)
    with pytest.raises(ValueError, match=r"num_features must be a positive int, got 0"):
        create_classifier(0, 3)
    with pytest.raises(TypeError, match=r"num_features must be a positive int, got float 64.0"):
        create_classifier(64.0, 3)
    with pytest.raises(TypeError, match=r"num_classes must be an int >= 0 .*, got float 3.0"):
        create_classifier(64, 3.0)
    for two_d in (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.int64)):
        with pytest.raises(ValueError, match=r"x must be \(N, L, C\) for input_fmt='NLC', got "
                                             r"shape \(2, 3\)"):
            global_pool_nlc(two_d, "avg")
    with pytest.raises(ValueError, match=r"x must be \(N, C, H, W\) for input_fmt='NCHW', got "
                                         r"shape \(2, 3\)"):
        SelectAdaptivePool(pool_type="avg")(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"use_conv=True needs input_fmt='NCHW' .*got "
                                         r"input_fmt='NHWC'"):
        create_classifier(8, 3, use_conv=True, input_fmt="NHWC")
    with pytest.raises(ValueError, match=r"drop_rate must be None or a number in \[0, 1\], got 2"):
        create_classifier(8, 3, drop_rate=2)
    with pytest.raises(TypeError, match=r"use_conv must be a bool"):
        create_classifier(8, 3, use_conv="no")


# --- timm itself, where it imports ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["NCHW", "NHWC"])
def test_equal_to_timms_own_modules(fmt):
    layers = pytest.importorskip("timm.layers")
    x = _features(fmt).float()
    for pool_type in TIMM_TYPES + FAST_TYPES + ("",):
        for flatten in (True, False):
            theirs = layers.SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten,
                                                 input_fmt=fmt)
            ours = SelectAdaptivePool2d(pool_type=pool_type, flatten=flatten, input_fmt=fmt)
            torch.testing.assert_close(ours(x), theirs(x))
            assert ours.feat_mult() == theirs.feat_mult()
            assert ours.is_identity() == theirs.is_identity()
    for pool_type in ("avg", "catavgmax", ""):
        for drop_rate in (None, 0.1):
            theirs = layers.create_classifier(6, 3, pool_type, input_fmt=fmt, drop_rate=drop_rate)
            ours = create_classifier(6, 3, pool_type, input_fmt=fmt, drop_rate=drop_rate)
            assert [type(m).__name__ for m in ours[1:]] == [type(m).__name__ for m in theirs[1:]]
    vit = pytest.importorskip("timm.models.vision_transformer")
    t = _features("NLC").float()
    for pool_type in ("token", "avg", "max", "avgmax", ""):
        torch.testing.assert_close(global_pool_nlc(t, pool_type, 2),
                                   vit.global_pool_nlc(t, pool_type, 2))
