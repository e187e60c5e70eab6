"""Heads: every head refuses a wrong channel count with a ValueError naming both counts (a check,
shape only, that survives torch.compile(fullgraph=True) and torch.export); ClassifierHead's reset,
pre_logits and norm / hidden layer; swap_pool on timm-like models."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import globalpool as gp
from globalpool import reference

OWNERS = {"fc": "FlattenFCHead", "nin": "NiNHead"}
LAYOUTS = ("channels_first", "channels_last")


def _input(channels: int, spatial: tuple[int, ...], layout: str) -> torch.Tensor:
    shape = (2, channels, *spatial) if layout == "channels_first" else (2, *spatial, channels)
    return torch.randn(shape)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", gp.HEADS)
@pytest.mark.parametrize("spatial", [(5,), (4, 4), (2, 3, 2)], ids=["1d", "2d", "3d"])
def test_wrong_channel_count_names_expected_and_received(name, layout, spatial):
    head = gp.make_head(name, 12, 3, spatial_size=spatial, hidden=8, layout=layout, backend="torch")
    owner = OWNERS.get(name, "ClassifierHead")
    dim = 1 if layout == "channels_first" else 1 + len(spatial)
    expected = (
        f"{owner}(in_channels=12) got input with 5 channels (dim {dim} for layout='{layout}')"
    )
    with pytest.raises(ValueError, match=re.escape(expected)):
        head(_input(5, spatial, layout))
    assert head(_input(12, spatial, layout)).shape == (2, 3)  # the right count still works


def test_catavgmax_head_reports_channels_not_feature_width():
    head = gp.ClassifierHead(512, 10, pool="catavgmax")  # its Linear takes 1024 features
    message = "ClassifierHead(in_channels=512) got input with 256 channels (dim 1 for layout="
    with pytest.raises(ValueError, match=re.escape(message)):
        head(torch.randn(2, 256, 7, 7))


def test_attention_pool_names_its_channels():
    with pytest.raises(ValueError, match=re.escape("AttentionPool(channels=6) got input with 5")):
        gp.AttentionPool(6)(torch.randn(2, 5, 4))


@pytest.mark.parametrize("name", ["avg", "catavgmax", "gem", "attention", "nin", "fc"])
def test_check_compiles_fullgraph_and_exports(name):
    head = gp.make_head(name, 6, 3, spatial_size=(5, 5), hidden=8, backend="torch").eval()
    x = torch.randn(2, 6, 5, 5)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), head(x))
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(head, (x,), dynamic_shapes=({0: batch},))
    assert exported.module()(torch.randn(4, 6, 5, 5)).shape == (4, 3)


def test_check_compiles_with_dynamic_shapes():
    head = gp.make_head("avg", 6, 3, backend="torch").eval()
    compiled = torch.compile(head, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 6, 5, 5), (3, 6, 4, 7)]:
        x = torch.randn(shape)
        torch.testing.assert_close(compiled(x), head(x))


def test_compiled_head_still_names_the_channel_counts():
    head = gp.make_head("gem", 6, 3, backend="torch").eval()
    expected = re.escape("ClassifierHead(in_channels=6) got input with 5 channels")
    with pytest.raises(ValueError, match=expected):  # graph break: eager raises it
        torch.compile(head, backend="aot_eager")(torch.randn(2, 5, 4, 4))
    with pytest.raises(Exception, match=expected):  # fullgraph: dynamo reports the same error
        torch.compile(head, fullgraph=True, backend="aot_eager")(torch.randn(2, 5, 4, 4))


# --- ClassifierHead.reset: the right width, the head's device and dtype ------------------------

def test_reset_keeps_dtype_and_rebuilds_for_the_new_pool_width():
    head = gp.ClassifierHead(8, 10).double()
    head.reset(3, pool="catavgmax")
    assert head.pooled_width == head.feature_width == 16
    assert (head.fc.in_features, head.fc.out_features) == (16, 3)
    assert head.fc.weight.dtype == torch.float64
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    features = head(x, pre_logits=True)
    expected = reference.pool_forward(x.numpy(), "catavgmax")
    torch.testing.assert_close(features, torch.from_numpy(expected))
    torch.testing.assert_close(head(x), features @ head.fc.weight.T + head.fc.bias)


def test_reset_builds_on_the_heads_device_meta():
    head = gp.ClassifierHead(8, 10, pool="gem", norm="layer", hidden=6).to("meta")
    head.reset(4, pool="attention")  # same width: the norm and hidden layer are kept
    assert {t.device.type for t in head.parameters()} == {"meta"}
    head.reset(5, pool="catavgmax")  # width 16: the norm and hidden layer are rebuilt there
    assert {t.device.type for t in head.parameters()} == {"meta"}
    assert head.norm.normalized_shape == (16,) and head.hidden[0].in_features == 16


def test_reset_keeps_a_trained_norm_and_hidden_layer_when_the_width_is_unchanged():
    head = gp.ClassifierHead(8, 10, pool="avg", norm="batch", hidden=6, act="tanh")
    norm, hidden, fc = head.norm, head.hidden, head.fc
    head.reset(7, pool="max")
    assert head.norm is norm and head.hidden is hidden and head.fc is not fc
    assert head.fc.in_features == 6 and head.fc.out_features == 7
    assert isinstance(head.pool, gp.GlobalPool) and head.pool.kind == "max"
    head.reset(7, pool="catavgmax")  # width 16 now: both rebuilt
    assert head.norm is not norm and head.norm.num_features == 16
    assert head.hidden[0].in_features == 16 and isinstance(head.hidden[1], nn.Tanh)


def test_reset_to_zero_classes_returns_features_and_back():
    head = gp.ClassifierHead(8, 10, pool="lse", r=2.0).half()
    head.reset(0)
    assert isinstance(head.fc, nn.Identity) and head.num_classes == 0
    x = torch.randn(2, 8, 6)
    out = head(x.half())
    expected = reference.pool_forward(x.half().double().numpy(), "lse", r=2.0)
    assert out.shape == (2, 8) and out.dtype == torch.float16
    torch.testing.assert_close(out.double(), torch.from_numpy(expected), rtol=4e-3, atol=4e-3)
    head.reset(3)
    assert head.fc.weight.dtype == torch.float16 and head.num_classes == 3


def test_reset_on_a_head_without_parameters_takes_the_dtype_it_was_moved_to():
    head = gp.ClassifierHead(4, 0, pool="avg")  # num_classes=0 at construction: no parameter
    assert list(head.parameters()) == [] and head(torch.randn(2, 4, 3)).shape == (2, 4)
    head.to(torch.float64)
    head.reset(2)
    assert head.fc.weight.dtype == torch.float64
    assert "_like" not in head.state_dict()


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((-1,), {}, ValueError, r"num_classes must be an int >= 0 .*got -1"),
        ((2.0,), {}, ValueError, r"num_classes must be an int >= 0 .*got 2.0"),
        ((True,), {}, ValueError, r"num_classes must be an int >= 0 .*got True"),
        ((3,), {"pool": "median"}, ValueError, r"kind must be one of .*'median'"),
        ((3,), {"p": 2.0}, TypeError, r"reset got pool parameter\(s\) \['p'\] without pool="),
        ((3,), {"pool": "avg", "p": 2.0}, TypeError, r"unexpected parameter"),
    ],
)
def test_reset_refuses_bad_arguments_and_changes_nothing(args, kwargs, error, match):
    head = gp.ClassifierHead(8, 10, pool="gem")
    pool, fc = head.pool, head.fc
    with pytest.raises(error, match=match):
        head.reset(*args, **kwargs)
    assert head.pool is pool and head.fc is fc


# --- pre_logits, norm and hidden layer (timm's NormMlp head) ----------------------------------


@pytest.mark.parametrize("norm", [None, "layer", "batch"])
@pytest.mark.parametrize("act", ["gelu", "tanh", "relu"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_norm_hidden_head_is_pool_norm_linear_act_dropout_fc(norm, act, layout):
    torch.manual_seed(0)
    head = gp.ClassifierHead(
        6, 4, pool="catavgmax", norm=norm, hidden=5, act=act, dropout=0.5, layout=layout
    )
    head.train()  # batch norm uses the batch's statistics; dropout below is checked in eval
    x = torch.randn(3, 6, 7) if layout == "channels_first" else torch.randn(3, 7, 6)
    pooled = torch.from_numpy(reference.pool_forward(x.double().numpy(), "catavgmax", layout=layout))
    pooled = pooled.float()
    if norm == "layer":
        pooled = F.layer_norm(pooled, (12,), head.norm.weight, head.norm.bias)
    elif norm == "batch":
        pooled = (pooled - pooled.mean(0)) / torch.sqrt(pooled.var(0, unbiased=False) + 1e-5)
        pooled = pooled * head.norm.weight + head.norm.bias
    activation = {"gelu": F.gelu, "tanh": torch.tanh, "relu": torch.relu}[act]
    hidden = activation(pooled @ head.hidden[0].weight.T + head.hidden[0].bias)
    with torch.no_grad():
        head.dropout.eval()  # no dropout: deterministic
        features = head(x, pre_logits=True)
        logits = head(x)
    assert head.pooled_width == 12 and head.feature_width == 5 and features.shape == (3, 5)
    torch.testing.assert_close(features, hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, hidden @ head.fc.weight.T + head.fc.bias, rtol=1e-5,
                               atol=1e-5)


def test_pre_logits_goes_through_dropout():
    head = gp.ClassifierHead(64, 3, dropout=0.5).train()
    features = head(torch.rand(4, 64, 5) + 1, pre_logits=True)
    assert (features == 0).any() and features.shape == (4, 64)
    head.eval()
    torch.testing.assert_close(head(torch.ones(1, 64, 5), pre_logits=True), torch.ones(1, 64))


def test_norm_head_without_hidden_layer_and_make_head_options():
    head = gp.make_head("gem", 8, 3, norm="layer", dropout=0.1)
    assert isinstance(head.norm, nn.LayerNorm) and head.hidden is None
    assert head.feature_width == 8 and head.fc.in_features == 8
    head = gp.make_head("avgmax", 8, 3, hidden=999, mlp_hidden=12, act="relu")  # hidden: fc's
    assert head.feature_width == 12 and isinstance(head.hidden[1], nn.ReLU)
    plain = gp.make_head("avg", 8, 3, hidden=16)
    assert plain.norm is None and plain.hidden is None
    assert [n for n, _ in plain.named_children()] == ["pool", "dropout", "fc"]


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: gp.ClassifierHead(8, 3, norm="group"), ValueError, r"norm must be one of .*'group'"),
        (lambda: gp.ClassifierHead(8, 3, hidden=0), ValueError, r"hidden must be a positive int"),
        (lambda: gp.ClassifierHead(8, 3, act="swish"), ValueError, r"act must be one of .*'swish'"),
        (lambda: gp.ClassifierHead(8, -1), ValueError, r"num_classes must be an int >= 0"),
        (lambda: gp.ClassifierHead(8, 3, norm="layer", keepdim=True), ValueError,
         r"keepdim must be False for a ClassifierHead, got True"),
        (lambda: gp.ClassifierHead(8, 3, pool="avg", layout="NHWC"), ValueError,
         r"layout must be one of"),
        (lambda: gp.ClassifierHead(8, 3, pool="gem", channels=8), TypeError,
         r"ClassifierHead got channels=8 for its pool, .* pass per_channel=True"),
        (lambda: gp.make_head("nin", 8, 3, norm="layer"), TypeError,
         r"head 'nin' got unexpected argument\(s\) \['norm'\]"),
        (lambda: gp.make_head("fc", 8, 3, spatial_size=(4,), mlp_hidden=4, act="tanh"), TypeError,
         r"head 'fc' got unexpected argument\(s\) \['mlp_hidden', 'act'\]"),
    ],
)
def test_bad_head_option_refused(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: gp.ClassifierHead(8, 3, **kw),
        lambda **kw: gp.ClassifierHead(8, 3, pool="catavgmax", **kw),
        lambda **kw: gp.make_head("gem", 8, 3, **kw),
        lambda **kw: gp.make_head(("avg", "max"), 8, 3, **kw),
        lambda **kw: gp.ClassifierHead(8, 3, pool="avg", norm="layer").reset(3, pool="max", **kw),
        lambda **kw: gp.ClassifierHead(8, 3).reset(3, pool="attention", **kw),
    ],
    ids=["avg", "catavgmax", "make_head", "tuple", "reset-norm", "reset-attention"],
)
def test_keepdim_true_is_refused_by_every_head_and_reset(build):
    with pytest.raises(ValueError, match=r"keepdim must be False for a ClassifierHead, got True"):
        build(keepdim=True)
    head = gp.ClassifierHead(8, 3)
    pool, fc = head.pool, head.fc
    with pytest.raises(ValueError, match="keepdim must be False"):
        head.reset(4, pool="gem", keepdim=True)
    assert head.pool is pool and head.fc is fc  # nothing changed
    flat = gp.ClassifierHead(8, 3, keepdim=False)  # False is the head's own choice: accepted
    assert flat(torch.randn(2, 8, 5, 5)).shape == (2, 3)


@pytest.mark.parametrize(
    ("dropout", "error", "match"),
    [
        (-0.5, ValueError, r"dropout must be a real number in \[0, 1\) .*got -0.5"),
        (float("nan"), ValueError, r"dropout must be a real number in \[0, 1\) .*got nan"),
        (1.0, ValueError, r"dropout must be a real number in \[0, 1\) .*got 1.0"),
        (float("inf"), ValueError, r"dropout .*got inf"),
        ("0.1", TypeError, r"dropout must be a real number in \[0, 1\) .*got '0.1' \(str\)"),
        (None, TypeError, r"dropout must be a real number .*got None"),
        (True, TypeError, r"dropout must be a real number .*got True"),
    ],
 ids=["negative", "nan", "one", "inf", "str", "none", "bool"],
)
@pytest.mark.parametrize("head", ["ClassifierHead", "make_head", "FlattenFCHead", "make_head fc"])
def test_bad_dropout_is_refused_naming_it(head, dropout, error, match):
    build = {
        "ClassifierHead": lambda: gp.ClassifierHead(8, 3, dropout=dropout),
        "make_head": lambda: gp.make_head("gem", 8, 3, dropout=dropout),
        "FlattenFCHead": lambda: gp.FlattenFCHead(8, (4,), 3, dropout=dropout),
        "make_head fc": lambda: gp.make_head("fc", 8, 3, spatial_size=(4,), dropout=dropout),
    }[head]
    with pytest.raises(error, match=match):
        build()


def test_good_dropout_values_are_taken():
    assert isinstance(gp.ClassifierHead(8, 3, dropout=0).dropout, nn.Identity)
    assert gp.ClassifierHead(8, 3, dropout=0.25).dropout.p == 0.25
    assert gp.FlattenFCHead(8, (4,), 3, dropout=0.5).dropout.p == 0.5
    assert gp.make_head("avg", 8, 3, dropout=np.float64(0.1)).dropout.p == pytest.approx(0.1)
    with pytest.raises(TypeError, match=r"head 'nin' got unexpected argument\(s\) \['dropout'\]"):
        gp.make_head("nin", 8, 3, dropout=0.2)


@pytest.mark.parametrize(
    ("spatial_size", "error", "match"),
    [
        ((0,), ValueError, r"spatial_size must be a tuple of 1 to 3 positive ints.*got \(0,\)"),
        ((4, -1), ValueError, r"spatial_size must be .*got \(4, -1\)"),
        ((), ValueError, r"spatial_size must be .*got \(\)"),
        ((2, 2, 2, 2), ValueError, r"spatial_size must be .*got \(2, 2, 2, 2\)"),
        ((4.0, 4), ValueError, r"spatial_size must be .*got \(4.0, 4\)"),
        ((True,), ValueError, r"spatial_size must be .*got \(True,\)"),
        (7, TypeError, r"spatial_size must be a tuple .*got the int 7; pass \(7,\) for one "
                       r"spatial dim or \(7, 7\) for a 7x7 map"),
        ("7", TypeError, r"spatial_size must be a tuple .*got '7'"),
    ],
 ids=["zero", "negative", "empty", "four-dims", "float", "bool", "int", "str"],
)
def test_flatten_fc_head_checks_spatial_size(spatial_size, error, match):
    with pytest.raises(error, match=match):
        gp.FlattenFCHead(8, spatial_size, 3)
    with pytest.raises(error, match=match):
        gp.make_head("fc", 8, 3, spatial_size=spatial_size)


def test_flatten_fc_head_takes_a_tuple_or_list_of_sizes():
    head = gp.FlattenFCHead(2, [3, 4], 5, hidden=4)
    assert head.spatial_size == (3, 4) and head.feature_width == 24
    assert head(torch.randn(2, 2, 3, 4)).shape == (2, 5)
    assert gp.FlattenFCHead(2, torch.Size([7]), 5).spatial_size == (7,)


def test_pre_logits_must_be_a_bool():
    with pytest.raises(TypeError, match=r"pre_logits must be a bool .*got 1"):
        gp.ClassifierHead(4, 2)(torch.randn(2, 4, 3), pre_logits=1)


def test_norm_hidden_head_compiles_and_exports():
    head = gp.ClassifierHead(6, 3, pool="gem", norm="layer", hidden=8, backend="torch").eval()
    x = torch.randn(2, 6, 5, 5)
    torch._dynamo.reset()  # other files compile heads too: no recompile limit reached here
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), head(x))
    exported = torch.export.export(head, (x,), kwargs={"pre_logits": True})
    torch.testing.assert_close(exported.module()(x, pre_logits=True), head(x, pre_logits=True))


def test_cam_is_exact_only_for_a_head_that_is_one_linear_of_the_pool():
    from globalpool.cam.exact import is_exact

    assert is_exact(gp.ClassifierHead(4, 3))
    for head in (gp.ClassifierHead(4, 3, norm="layer"), gp.ClassifierHead(4, 3, hidden=5),
                 gp.ClassifierHead(4, 0)):
        assert not is_exact(head)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), gp.ClassifierHead(4, 3, norm="layer"))
    with pytest.raises(ValueError, match=r"with a norm, a hidden layer or no classifier"):
        gp.class_activation_maps(net, torch.randn(2, 1, 8, 8), method="cam")
    maps = gp.class_activation_maps(net, torch.randn(2, 1, 8, 8))  # auto: gradient maps
    assert maps.shape == (2, 6, 6)


# --- swap_pool on timm-like models (fakes: timm itself is not installed here) -----------------


class _SelectPool(nn.Module):
    """Like timm's SelectAdaptivePool2d: an adaptive pool, then an optional flatten."""

    def __init__(self, pool: nn.Module | None = None, flatten: bool = True) -> None:
        super().__init__()
        self.pool = pool if pool is not None else nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1) if flatten else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.flatten(self.pool(x))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)  # not the global pool: must be left alone
        self.scale = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.scale(self.pool(x)))


class _TimmLike(nn.Module):
    """conv -> squeeze-excite -> global_pool -> fc (timm's ResNet names), or a ``head``."""

    def __init__(self, classifier: str = "fc", global_pool: nn.Module | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.se = _SqueezeExcite(8)
        self.global_pool = global_pool if global_pool is not None else _SelectPool()
        self.name = classifier
        setattr(self, classifier, nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(self.global_pool(self.se(self.conv(x))).flatten(1))


class _HeadFc(nn.Module):
    """timm's ConvNeXt names: head.global_pool and head.fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Module()
        self.head.global_pool = _SelectPool(flatten=False)
        self.head.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.fc(self.head.global_pool(self.conv(x)).flatten(1))


@pytest.mark.parametrize("classifier", ["fc", "head", "classifier"])
def test_swap_pool_finds_timm_global_pool_and_classifier(classifier):
    torch.manual_seed(0)
    net = _TimmLike(classifier).double()
    se_pool = net.se.pool
    gp.swap_pool(net, "catavgmax")
    assert net.se.pool is se_pool  # the squeeze-excitation pool is not the global pool
    assert isinstance(net.global_pool.pool, gp.GlobalPool)  # the wrapper (and flatten) stay
    fc = getattr(net, classifier)
    assert fc.in_features == 16 and fc.weight.dtype == torch.float64
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    features = net.se(net.conv(x))
    expected = reference.pool_forward(features.detach().numpy(), "catavgmax")
    torch.testing.assert_close(net.global_pool(features).detach(), torch.from_numpy(expected))
    assert net(x).shape == (2, 5)


def test_swap_pool_finds_head_fc_and_keeps_device_and_dtype_of_new_pools():
    net = _HeadFc().to(torch.float64)
    gp.swap_pool(net, "gem", per_channel=True)  # per-channel p needs the channel count: head.fc
    pool = net.head.global_pool.pool
    assert isinstance(pool, gp.GeM) and pool.p.shape == (8,) and pool.raw_p.dtype == torch.float64
    assert net(torch.randn(2, 3, 7, 7, dtype=torch.float64)).shape == (2, 5)
    net = _HeadFc().to("meta")
    gp.swap_pool(net, "attention")
    assert {t.device.type for t in net.parameters()} == {"meta"}


def test_swap_pool_kinds_of_the_same_width_need_no_classifier():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    gp.swap_pool(net, "lse", learnable=True)
    assert isinstance(net[1], gp.LSEPool) and net[3].in_features == 4


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                               nn.Linear(8, 2)),
         r"needs classifier= .*got None, and the model has none under the names "
         r"\['fc', 'head', 'classifier', 'head.fc'\]; pass classifier="),
        (lambda: _with(_TimmLike("fc"), head=nn.Linear(8, 5)),
         r"the model has several: \['fc', 'head'\] under the names"),
    ],
)
def test_swap_pool_asks_for_classifier_when_none_or_several_are_found(build, match):
    net = build()
    with pytest.raises(ValueError, match=match):
        gp.swap_pool(net, "catavgmax")
    assert not any(isinstance(m, gp.GlobalPool) for m in net.modules())  # nothing swapped
    used = "fc" if hasattr(net, "fc") else "3"  # the Linear the forward uses
    gp.swap_pool(net, "catavgmax", classifier=used)  # naming it resolves it
    assert net.get_submodule(used).in_features == 16
    assert net(torch.randn(2, 3, 9, 9)).shape[1] in (2, 5)


def _with(net: nn.Module, **modules: nn.Module) -> nn.Module:
    for name, module in modules.items():
        setattr(net, name, module)
    return net


class _MeanPool(nn.Module):  # timm's 'fast' pool: a function, no adaptive pool module
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))


class _CatPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.avg, self.max = nn.AdaptiveAvgPool2d(1), nn.AdaptiveMaxPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.avg(x), self.max(x)], 1)


@pytest.mark.parametrize(
    ("global_pool", "match"),
    [
        (_MeanPool(), r"global_pool \(global_pool: _MeanPool\) holds no AdaptiveAvgPool"),
        (_CatPool(), r"holds 2 \(\['global_pool.avg', 'global_pool.max'\]\) AdaptiveAvgPool"),
    ],
)
def test_swap_pool_refuses_a_global_pool_without_exactly_one_adaptive_pool(global_pool, match):
    net = _TimmLike("fc", global_pool=global_pool)
    with pytest.raises(ValueError, match=match):
        gp.swap_pool(net, "avg")
    assert isinstance(net.se.pool, nn.AdaptiveAvgPool2d)  # the other pools are not touched


# --- swap_pool: several pools, and what sits between the pool and the classifier --------------


class _LayerNorm2d(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm of the channels of (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias)
        return x.permute(0, 3, 1, 2)


class _ConvNeXtLike(nn.Module):
    """timm's ConvNeXt head (NormMlpClassifierHead): head.global_pool -> head.norm (a LayerNorm
    of the C channels) -> head.flatten -> head.drop -> head.fc."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3)
        self.head = nn.Module()
        self.head.global_pool = _SelectPool(flatten=False)
        self.head.norm = _LayerNorm2d(c)
        self.head.flatten = nn.Flatten(1)
        self.head.drop = nn.Dropout(0.0)
        self.head.fc = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head
        return h.fc(h.drop(h.flatten(h.norm(h.global_pool(self.stem(x))))))


class _MobileNetV3Like(nn.Module):
    """timm's MobileNetV3: blocks with squeeze-excitation, global_pool -> conv_head (a 1x1 conv
    of the C channels) -> act2 -> flatten -> classifier."""

    def __init__(self, c: int = 6) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(3, c, 3)
        self.se = _SqueezeExcite(c)
        self.global_pool = _SelectPool(flatten=False)
        self.conv_head = nn.Conv2d(c, 12, 1)
        self.act2 = nn.Hardswish()
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.global_pool(self.se(self.conv_stem(x)))
        return self.classifier(self.flatten(self.act2(self.conv_head(x))))


class _SEModel(nn.Module):
    """torchvision's names: a squeeze-excitation block's pool beside the final avgpool, no
    global_pool module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.se = _SqueezeExcite(8)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.avgpool(self.se(self.conv(x))).flatten(1))


def _snapshot(net: nn.Module) -> tuple[list[tuple[str, int]], dict[str, torch.Tensor]]:
    modules = [(n, id(m)) for n, m in net.named_modules(remove_duplicate=False)]
    return modules, {k: v.clone() for k, v in net.state_dict().items()}


def _unchanged(net: nn.Module, before: tuple) -> bool:
    modules, state = _snapshot(net)
    same_state = state.keys() == before[1].keys() and all(
        torch.equal(state[k], before[1][k]) for k in state
    )
    return modules == before[0] and same_state


@pytest.mark.parametrize(
    ("build", "blocker", "kind"),
    [
        (_ConvNeXtLike, r"'head.norm' \(_LayerNorm2d, normalized_shape=8\)", "catavgmax"),
        (_MobileNetV3Like, r"'conv_head' \(Conv2d, in_channels=6\)", "catavgmax"),
        (_MobileNetV3Like, r"'conv_head' \(Conv2d, in_channels=6\)", ("avg", "max", "gem")),
    ],
    ids=["convnext", "mobilenetv3", "mobilenetv3-tuple"],
)
def test_swap_pool_refuses_a_wider_pool_before_a_module_of_fixed_width(build, blocker, kind):
    torch.manual_seed(0)
    net = build().eval()
    x = torch.randn(2, 3, 9, 9)
    want = net(x)
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"cannot swap 'global_pool.pool'|cannot swap 'head."):
        gp.swap_pool(net, kind)
    with pytest.raises(ValueError, match=blocker + r" sits between the pool and the classifier"):
        gp.swap_pool(net, kind)
    assert _unchanged(net, before)  # nothing changed: the model runs as before
    torch.testing.assert_close(net(x), want)


@pytest.mark.parametrize("build", [_ConvNeXtLike, _MobileNetV3Like], ids=["convnext", "mnv3"])
@pytest.mark.parametrize(
    ("kind", "params"),
    [("gem", {"per_channel": True}), ("attention", {}), ("lse", {"per_channel": True}),
     ("max", {}), ("gem", {})],
    ids=["gem-per-channel", "attention", "lse-per-channel", "max", "gem"],
)
def test_swap_pool_sizes_per_channel_kinds_from_the_module_after_the_pool(build, kind, params):
    torch.manual_seed(0)
    net = build()
    channels = 8 if build is _ConvNeXtLike else 6  # not the classifier's 12 for mobilenetv3
    classifier = net.head.fc if build is _ConvNeXtLike else net.classifier
    se_pool = getattr(getattr(net, "se", None), "pool", None)
    gp.swap_pool(net, kind, **params)
    pool = (net.head.global_pool if build is _ConvNeXtLike else net.global_pool).pool
    if kind == "attention":
        assert pool.channels == channels
    elif params:
        assert (pool.p if kind == "gem" else pool.r).shape == (channels,)
    x = torch.randn(2, 3, 9, 9)
    assert net(x).shape == (2, 5)
    # same width: the classifier (and what lies before it) is kept, trained
    assert (net.head.fc if build is _ConvNeXtLike else net.classifier) is classifier
    if se_pool is not None:
        assert net.se.pool is se_pool


def test_swap_pool_with_several_pools_asks_for_name_and_changes_nothing():
    net = _SEModel()
    before = _snapshot(net)
    for kind in ("catavgmax", "gem", "max"):
        with pytest.raises(
            ValueError,
            match=r"model has 2 global pools \['se.pool', 'avgpool'\]; .*pass name= "
            r"\(e.g. name='avgpool'\)",
        ):
            gp.swap_pool(net, kind)
        assert _unchanged(net, before)
    se_pool = net.se.pool
    gp.swap_pool(net, "catavgmax", name="avgpool")
    assert net.se.pool is se_pool and isinstance(net.avgpool, gp.GlobalPool)
    assert net.fc.in_features == 16 and net(torch.randn(2, 3, 9, 9)).shape == (2, 5)


def test_swap_pool_name_selects_several_pools_of_the_same_width():
    net = _SEModel()
    gp.swap_pool(net, "max", name=["se.pool", "avgpool"])
    assert isinstance(net.se.pool, gp.GlobalPool) and isinstance(net.avgpool, gp.GlobalPool)
    assert net.se.pool is not net.avgpool and net(torch.randn(2, 3, 9, 9)).shape == (2, 5)
    net = _SEModel()
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"got 2 pools \['se.pool', 'avgpool'\]"):
        gp.swap_pool(net, "catavgmax", name=("se.pool", "avgpool"))
    assert _unchanged(net, before)
    net = _TimmLike("fc")  # name= overrides the global_pool convention, also with a wrapper
    gp.swap_pool(net, "gem", name="se")
    assert isinstance(net.se.pool, gp.GeM) and isinstance(net.global_pool.pool, nn.AdaptiveAvgPool2d)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("nope", ValueError, r"name 'nope' is not a module of the model; expected the dotted "
                             r"name of one of its global pools \['se.pool', 'avgpool'\]"),
        ("conv", ValueError, r"name='conv' \(Conv2d\) holds no AdaptiveAvgPool"),
        ("", ValueError, r"name='' \(_SEModel\) holds 2 \(\['avgpool', 'se.pool'\]\)"),
        (3, TypeError, r"name must be None, the dotted name of a global pool or a list"),
        ([], TypeError, r"name must be None"),
    ],
)
def test_swap_pool_refuses_a_bad_name(name, error, match):
    net = _SEModel()
    before = _snapshot(net)
    with pytest.raises(error, match=match):
        gp.swap_pool(net, "avg", name=name)
    assert _unchanged(net, before)


def test_swap_pool_refuses_a_bad_classifier_name_before_changing_anything():
    net = _SEModel()
    before = _snapshot(net)
    with pytest.raises(ValueError, match=r"classifier 'head' is not a module of the model"):
        gp.swap_pool(net, "catavgmax", name="avgpool", classifier="head")
    with pytest.raises(TypeError, match=r"classifier must name an nn.Linear, a 1x1 nn.Conv2d or an nn.Identity .*, got 'se': _Squeeze"):
        gp.swap_pool(net, "catavgmax", name="avgpool", classifier="se")
    with pytest.raises(TypeError, match=r"unexpected argument"):  # a bad pool parameter
        gp.swap_pool(net, "attention", name="avgpool", p=3.0)
    assert _unchanged(net, before)


@pytest.mark.parametrize(
    ("pool", "kind", "x"),
    [
        (nn.AdaptiveAvgPool2d(1), "max", torch.randn(2, 4, 5, 5)),
        (nn.AdaptiveMaxPool1d(1), "avg", torch.randn(2, 4, 7)),
        (nn.AdaptiveAvgPool3d((1, 1, 1)), "catavgmax", torch.randn(2, 4, 3, 3, 3)),
    ],
)
def test_swap_pool_on_a_lone_pool_returns_the_new_pool(pool, kind, x):
    new = gp.swap_pool(pool, kind)
    assert isinstance(new, gp.GlobalPool) and new.kind == kind and new is not pool
    assert list(pool.children()) == []  # the old pool is left as it was
    expected = gp.pool(x, kind, keepdim=True)
    torch.testing.assert_close(new(x), expected)


def test_swap_pool_on_a_lone_pool_refuses_what_it_cannot_size():
    with pytest.raises(ValueError, match=r"itself the pool \(AdaptiveAvgPool2d\): nothing gives"):
        gp.swap_pool(nn.AdaptiveAvgPool2d(1), "attention")
    with pytest.raises(ValueError, match=r"gp.make_pool\('gem', channels, keepdim=True"):
        gp.swap_pool(nn.AdaptiveAvgPool2d(1), "gem", per_channel=True)
    with pytest.raises(ValueError, match=r"itself the pool .* no classifier; got classifier='fc'"):
        gp.swap_pool(nn.AdaptiveAvgPool2d(1), "max", classifier="fc")
    assert isinstance(gp.swap_pool(nn.AdaptiveAvgPool2d(1).double(), "gem"), gp.GeM)


def test_swap_pool_swaps_a_swapped_pool_again_at_its_width_and_layout():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    gp.swap_pool(net, "catavgmax", classifier="3")
    assert net[3].in_features == 8
    gp.swap_pool(net, "gem", classifier="3")  # from 2 features a channel back to 1: fc rebuilt
    assert isinstance(net[1], gp.GeM) and net[3].in_features == 4
    assert net(torch.randn(2, 3, 5, 5)).shape == (2, 2)
    gp.swap_pool(net, "max")  # the same width as before: nothing else changes
    assert isinstance(net[1], gp.GlobalPool) and net[3].in_features == 4
    last = nn.Sequential(gp.GlobalPool("avg", layout="channels_last", keepdim=True), nn.Flatten(),
                         nn.Linear(4, 2))
    gp.swap_pool(last, "max")  # a channels-last pool's replacement is channels-last
    x = torch.randn(2, 5, 5, 4)
    assert last[0].layout == "channels_last"
    torch.testing.assert_close(last[1](last[0](x)), x.amax((1, 2)))
    with pytest.raises(ValueError, match=r"no AdaptiveAvgPool.* or globalpool pool \(keepdim=True"):
        gp.swap_pool(nn.Sequential(gp.GlobalPool("avg"), nn.Linear(4, 2)), "max")  # flattens
    odd = nn.Sequential(gp.GlobalPool("catavgmax", keepdim=True), nn.Flatten(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"gives 2 features per channel, but the classifier '2' "
                                         r"takes 5 features, not a multiple of 2"):
        gp.swap_pool(odd, "avg", classifier="2")
