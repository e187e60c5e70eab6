"""Class activation maps: exact maps average to the logit, gradient maps match captum and an
independent NumPy oracle, batches give per-sample maps, and no hook, reference or gradient is
left behind."""

from __future__ import annotations

import gc
import weakref

import hypothesis.strategies as st
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from torch import nn

import globalpool as gp
from globalpool.cam import class_activation_maps as cam

# every built-in kind with a credit in the registry, and a tuple of them
EXACT = ("avg", "max", "avgmax", "catavgmax", "attention", "sum", "first", "last",
         "mean_sqrt_len", "weightedmean", ("avg", "max", "last"))
HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_full_backward_hooks" if hasattr(nn.Module, "_full_backward_hooks") else "_backward_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)


def no_hooks(model: nn.Module) -> bool:
    for m in model.modules():
        for name in HOOK_DICTS:
            if len(getattr(m, name, {}) or {}):
                return False
        if getattr(m, "_forward_hooks_with_kwargs", {}) or getattr(
            m, "_forward_pre_hooks_with_kwargs", {}
        ):
            return False
    return True


def make_head(kind, c: int, k: int, layout: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(kind, str) and kind.startswith("nin"):  # nin: softplus maps; nin-relu-bn: batch norm, then ReLU
        options = dict(activation="relu", norm=True) if kind == "nin-relu-bn" else {}
        head = gp.NiNHead(c, k, layout=layout, backend="torch", **options)
    else:
        head = gp.ClassifierHead(c, k, pool=kind, layout=layout, backend="torch")
    return head.double().eval()


def features(n, c, spatial, layout, seed, integer=False):
    g = torch.Generator().manual_seed(seed)
    shape = (n, c, *spatial) if layout == "channels_first" else (n, *spatial, c)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.round() if integer else x  # integers make ties of the max


def real_mean(maps, mask):
    dims = tuple(range(1, maps.ndim))
    if mask is None:
        return maps.mean(dims)
    return maps.sum(dims) / mask.sum(dims).clamp(min=1)


# --- exact maps --------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from((*EXACT, "nin", "nin-relu-bn")),
    rank=st.integers(1, 3),
    layout=st.sampled_from(("channels_first", "channels_last")),
    masked=st.booleans(),
    integer=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_exact_map_mean_is_logit_minus_bias(kind, rank, layout, masked, integer, seed):
    spatial = (4, 3, 2)[:rank]
    n, c, k = 3, 4, 5
    head = make_head(kind, c, k, layout, seed)
    x = features(n, c, spatial, layout, seed, integer)
    mask = None
    if masked:
        g = torch.Generator().manual_seed(seed + 1)
        mask = torch.rand((n, *spatial), generator=g) > 0.5
        mask.view(n, -1)[:, 0] = True
        x = x.masked_fill(~(mask.unsqueeze(1 if layout == "channels_first" else -1)), torch.nan)
    targets = torch.tensor([0, k - 1, seed % k])
    maps = cam(head, x, targets, method="cam", mask=mask)
    assert maps.shape == (n, *spatial) and maps.dtype == torch.float64
    logits = head(x, mask=mask)[torch.arange(n), targets]
    bias = 0.0 if isinstance(kind, str) and kind.startswith("nin") else head.fc.bias[targets]
    torch.testing.assert_close(real_mean(maps, mask), logits - bias, rtol=1e-10, atol=1e-10)
    if mask is not None:
        assert (maps[~mask] == 0).all()  # padded positions exactly 0 (no NaN leaks)


def test_avg_map_is_the_classifier_applied_per_position():
    head = make_head("avg", 3, 2, "channels_first", 0)
    x = features(2, 3, (5,), "channels_first", 1)
    want = torch.einsum("c,ncs->ns", head.fc.weight[1], x)
    torch.testing.assert_close(cam(head, x, 1), want)


def test_max_is_credited_to_its_argmax_ties_split_equally():
    head = gp.ClassifierHead(1, 1, pool="max").double()
    with torch.no_grad():
        head.fc.weight.fill_(2.0)
    x = torch.tensor([[[1.0, 3.0, 0.0, 3.0]]], dtype=torch.float64)  # the max 3 twice
    # logit - b = 2 * 3 = 6 = mean of the map -> sum 24, shared by the two arg-maxes
    torch.testing.assert_close(cam(head, x, 0), torch.tensor([[0.0, 12.0, 0.0, 12.0]]).double())


def test_catavgmax_splits_weight_columns_avg_first():
    head = gp.ClassifierHead(1, 1, pool="catavgmax").double()
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 10.0]]))
    x = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    # avg part: x itself; max part: n * 10 * 2 at the arg-max
    torch.testing.assert_close(cam(head, x, 0), torch.tensor([[1.0, 42.0]]).double())


# --- gradient maps -----------------------------------------------------------------------------


class Net(nn.Module):
    """A conv backbone and any head, 1d to 3d."""

    def __init__(self, head: str, rank: int = 2, c: int = 6, k: int = 4) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        self.backbone = nn.Sequential(conv(2, c, 3, padding=1), nn.ReLU(), conv(c, c, 3))
        self.head = gp.make_head(head, c, k, backend="torch")

    def forward(self, x):
        return self.head(self.backbone(x))


def oracle(method, A, G, mask=None):
    """NumPy Grad-CAM / Grad-CAM++ / LayerCAM of one sample (A, G: (C, *S))."""
    A, G = A.numpy(), G.numpy()
    real = np.ones(A.shape[1:], bool) if mask is None else mask.numpy()
    A, G = np.where(real, A, 0.0), np.where(real, G, 0.0)
    if method == "gradcam":
        w = G.reshape(len(G), -1).sum(1) / real.sum()
        out = np.tensordot(w, A, 1)
    elif method == "layercam":
        out = (np.maximum(G, 0) * A).sum(0)
    else:
        total = A.reshape(len(A), -1).sum(1).reshape(-1, *[1] * (A.ndim - 1))
        denom = 2 * G**2 + total * G**3
        with np.errstate(divide="ignore", invalid="ignore"):
            alpha = np.where(G != 0, G**2 / np.where(denom != 0, denom, 1), 0.0)
        w = (alpha * np.maximum(G, 0)).reshape(len(G), -1).sum(1)
        out = np.tensordot(w, A, 1)
    return np.where(real, np.maximum(out, 0), 0.0)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "layercam"])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_gradient_methods_match_numpy_oracle(method, rank):
    torch.manual_seed(rank)
    net = Net("gem", rank).double().eval()
    x = torch.randn(2, 2, *[6] * rank, dtype=torch.float64)
    maps = cam(net, x, torch.tensor([1, 3]), method=method)
    for i, t in enumerate((1, 3)):
        A = net.backbone(x[i : i + 1]).detach().requires_grad_()
        (G,) = torch.autograd.grad(net.head(A)[0, t], A)
        want = oracle(method, A[0].detach(), G[0])
        np.testing.assert_allclose(maps[i].numpy(), want, rtol=1e-9, atol=1e-12)
    assert maps.shape == (2, *[4] * rank)


@pytest.mark.parametrize("head", ["gem", "lse", "avg", "fc"])
def test_gradcam_matches_captum(head):
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    net = Net(head, 2).eval() if head != "fc" else None
    if net is None:  # fc needs the spatial size: build it by hand
        net = Net("avg", 2).eval()
        net.head = gp.make_head("fc", 6, 4, spatial_size=(6, 6), hidden=8)
    x = torch.randn(3, 2, 8, 8)
    targets = torch.tensor([0, 2, 3])
    want = captum_attr.LayerGradCam(net, net.backbone).attribute(
        x, target=targets, relu_attributions=True
    )
    got = cam(net, x, targets, layer="backbone", method="gradcam")
    torch.testing.assert_close(got, want.squeeze(1), rtol=1e-5, atol=1e-6)


class _Block(nn.Module):
    """A torchvision ResNet's end: conv -> bn -> ReLU(inplace=True) -> head; the ReLU overwrites
    the bn's output in place."""

    def __init__(self, head: str = "gem") -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.bn = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.head = gp.make_head(head, 6, 4, backend="torch")

    def forward(self, x):
        return self.head(self.relu(self.bn(self.conv(x))))


def _block(head: str = "gem") -> nn.Module:
    torch.manual_seed(0)
    net = _Block(head)
    with torch.no_grad():  # statistics that leave many bn outputs negative, so the ReLU matters
        net.bn.running_mean.normal_()
        net.bn.bias.normal_()
    return net.double().eval()


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_gradient_maps_are_of_the_layer_output_before_an_inplace_relu(frozen):
    captum_attr = pytest.importorskip("captum.attr")
    net = _block()
    x = torch.randn(3, 2, 9, 9, dtype=torch.float64)
    targets = torch.tensor([0, 2, 3])
    want = captum_attr.LayerGradCam(net, net.bn).attribute(
        x, target=targets, relu_attributions=True
    ).squeeze(1)
    with torch.no_grad():
        A = net.bn(net.conv(x))  # the bn's own output, before the ReLU
    assert (A < 0).float().mean() > 0.3  # the in-place ReLU changes much of it
    if frozen:
        net.requires_grad_(False)
    got = cam(net, x, targets, layer="bn", method="gradcam")
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    A = A.clone().requires_grad_(True)
    (G,) = torch.autograd.grad(net.head(torch.relu(A))[torch.arange(3), targets].sum(), A)
    for method in ("gradcam", "gradcam++", "layercam"):
        got = cam(net, x, targets, layer=net.bn, method=method)
        for i in range(3):
            want_i = oracle(method, A[i].detach(), G[i])
            np.testing.assert_allclose(got[i].numpy(), want_i, rtol=1e-9, atol=1e-12)
    assert no_hooks(net) and all(p.grad is None for p in net.parameters())
    torch.testing.assert_close(net(x), net.head(torch.relu(A.detach())))  # model still intact


def test_exact_maps_refuse_a_layer_changed_in_place_before_the_head():
    net = _block("avg")
    x = torch.randn(2, 2, 9, 9, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"layer 'bn'.s output is not what the head received"):
        cam(net, x, layer="bn", method="cam")
    # auto takes the gradient map of the bn's output; the head's input still has its exact map
    torch.testing.assert_close(cam(net, x, layer="bn"), cam(net, x, layer="bn", method="gradcam"))
    torch.testing.assert_close(cam(net, x, layer="relu", method="cam"), cam(net, x))


@pytest.mark.parametrize("head", ["avg", "catavgmax", "attention", "gem", "nin"])
@pytest.mark.parametrize("method", ["auto", "gradcam", "gradcam++", "layercam"])
def test_an_empty_batch_gives_empty_maps(head, method):
    net = Net(head).eval()
    x = torch.randn(0, 2, 7, 7)
    for layer in (None, "backbone"):
        maps = cam(net, x, method=method, layer=layer)
        assert maps.shape == (0, 5, 5) and maps.dtype == torch.float32
        assert cam(net, x, 1, method=method, layer=layer, upsample=(7, 7)).shape == (0, 7, 7)
        empty = torch.zeros(0, dtype=torch.long)
        mask = torch.ones(0, 5, 5, dtype=torch.bool)
        assert cam(net, x, empty, method=method, layer=layer, mask=mask).shape == (0, 5, 5)
    if head in EXACT or head == "nin":
        assert cam(net, x, method="cam").shape == (0, 5, 5)
    assert no_hooks(net)


def test_gradient_maps_with_a_mask_ignore_padded_positions():
    torch.manual_seed(0)
    head = gp.ClassifierHead(3, 2, pool="lse", backend="torch").double().eval()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], dtype=torch.bool)
    poisoned = x.masked_fill(~mask.unsqueeze(1), 1e6)
    for method in ("gradcam", "gradcam++", "layercam"):
        got = cam(head, poisoned, 0, mask=mask, method=method)
        A = x.clone().requires_grad_()
        (G,) = torch.autograd.grad(head(A, mask=mask)[:, 0].sum(), A)
        for i in range(2):
            want = oracle(method, A[i].detach(), G[i], mask[i])
            np.testing.assert_allclose(got[i].numpy(), want, rtol=1e-9, atol=1e-12)
        assert (got[~mask] == 0).all()


def test_channels_last_equals_channels_first():
    torch.manual_seed(0)
    first = gp.ClassifierHead(4, 3, pool="gem", backend="torch").double().eval()
    last = gp.ClassifierHead(4, 3, pool="gem", layout="channels_last", backend="torch")
    last.load_state_dict(first.state_dict())
    last = last.double().eval()
    x = torch.rand(2, 4, 3, 5, dtype=torch.float64)
    for method in ("auto", "gradcam++", "layercam"):
        a = cam(first, x, 1, method=method)
        b = cam(last, x.permute(0, 2, 3, 1), 1, method=method)
        torch.testing.assert_close(a, b)


# --- choice of layer, method and target --------------------------------------------------------


def test_auto_picks_cam_where_exact_else_gradcam():
    torch.manual_seed(0)
    x = torch.randn(2, 2, 7, 7)
    for head, same_as in (
        ("avgmax", "cam"),
        ("attention", "cam"),
        ("nin", "cam"),
        ("gem", "gradcam"),
        ("lse", "gradcam"),
    ):
        net = Net(head).eval()
        torch.testing.assert_close(cam(net, x), cam(net, x, method=same_as))
        assert gp.cam.auto_method(net) == same_as
    with pytest.raises(ValueError, match="no globalpool head or pool"):
        gp.cam.auto_method(nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten()))


def test_default_layer_of_a_swap_pooled_model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)
    )
    gp.swap_pool(net, "gem")
    x = torch.randn(2, 2, 6, 6)
    got = cam(net, x, 2)  # the input of the swapped pool, i.e. the ReLU's output
    torch.testing.assert_close(got, cam(net, x, 2, layer="1", method="gradcam"))
    with pytest.raises(ValueError, match="gradcam"):
        cam(net, x, method="cam")


def test_layer_by_module_or_name_and_targets_default_to_prediction():
    torch.manual_seed(0)
    net = Net("avg").eval()
    x = torch.randn(3, 2, 7, 7)
    pred = net(x).argmax(1)
    a = cam(net, x, layer=net.backbone[0], method="gradcam")
    b = cam(net, x, pred, layer="backbone.0", method="gradcam")
    torch.testing.assert_close(a, b)
    assert a.shape == (3, 7, 7)
    # an explicit layer whose output is the head's input still gives the exact map
    torch.testing.assert_close(cam(net, x, layer="backbone", method="cam"), cam(net, x))


def test_a_batch_gives_the_per_sample_maps():
    torch.manual_seed(0)
    x = torch.randn(4, 2, 6, 6)
    for head, method in (
        ("catavgmax", "cam"),
        ("gem", "gradcam"),
        ("lse", "gradcam++"),
        ("attention", "layercam"),
        ("nin", "auto"),
    ):
        net = Net(head).eval()
        batch = cam(net, x, method=method)
        single = torch.cat([cam(net, x[i : i + 1], method=method) for i in range(4)])
        torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-6)


def test_upsample_to_the_input_size():
    torch.manual_seed(0)
    net = Net("avg", rank=1).eval()
    x = torch.randn(2, 2, 10)
    small = cam(net, x)
    big = cam(net, x, upsample=10)
    assert big.shape == (2, 10)
    want = torch.nn.functional.interpolate(small[:, None], size=10, mode="linear")[:, 0]
    torch.testing.assert_close(big, want)


# --- nothing left behind -----------------------------------------------------------------------


def test_no_hooks_left_after_success_or_failure():
    net = Net("gem").eval()
    x = torch.randn(2, 2, 6, 6)
    for method in ("auto", "gradcam", "gradcam++"):
        cam(net, x, method=method)
        cam(net, x, layer="backbone.0", method=method)
        assert no_hooks(net)
    with pytest.raises(RuntimeError):  # the forward raises: wrong input channels
        cam(net, torch.randn(2, 3, 6, 6))
    assert no_hooks(net)
    with pytest.raises(ValueError, match="targets"):  # raises after the forward
        cam(net, x, 9)
    assert no_hooks(net)


def test_no_grad_caller_untouched_grads_and_no_reference_kept():
    net = Net("lse").eval()
    x = torch.randn(2, 2, 6, 6)
    net(x).sum().backward()
    before = {n: p.grad.clone() for n, p in net.named_parameters()}
    with torch.no_grad():
        maps = cam(net, x, method="gradcam")
    assert maps.abs().sum() > 0 and not maps.requires_grad
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, before[n]), n

    seen = []

    class Spy(nn.Module):
        def forward(self, t):
            seen.append(weakref.ref(t))
            return t

    net.backbone.append(Spy())
    for _ in range(3):
        cam(net, x, method="gradcam++")
    gc.collect()
    assert len(seen) == 3 and all(r() is None for r in seen)  # every feature map was freed


# --- bad input ---------------------------------------------------------------------------------


def test_bad_input_is_refused_clearly():
    net = Net("gem").eval()
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(ValueError, match="method must be one of"):
        cam(net, x, method="scorecam")
    with pytest.raises(ValueError, match="'nope' is not a module"):
        cam(net, x, layer="nope")
    with pytest.raises(ValueError, match=r"\(N, C, \*S\) feature map"):
        cam(net, x, layer="head.fc")  # (N, 4) logits are no feature map
    with pytest.raises(ValueError, match="gradcam"):
        cam(net, x, method="cam")  # GeM is not linear in the positions
    with pytest.raises(ValueError, match=r"mask must have the feature map's shape .*\(2, 4, 4\)"):
        cam(net, x, mask=torch.ones(2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"targets must be class indices in \[0, 4\), got 4"):
        cam(net, x, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="got -1"):
        cam(net, x, -1)
    with pytest.raises(ValueError, match=r"shape \(N,\) = \(2,\)"):
        cam(net, x, torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="targets"):
        cam(net, x, 1.5)
    with pytest.raises(ValueError, match="upsample"):
        cam(net, x, upsample=(4,))
    with pytest.raises(ValueError, match="no globalpool head"):
        cam(nn.Sequential(nn.Conv1d(1, 2, 1), nn.Flatten()), torch.randn(1, 1, 3))
    assert no_hooks(net)


def test_explicit_layer_feeding_a_channels_last_head_takes_its_layout():
    torch.manual_seed(0)
    head = gp.ClassifierHead(4, 3, pool="avg", layout="channels_last").double().eval()
    net = nn.Sequential(nn.Identity(), head).eval()
    x = torch.randn(2, 5, 6, 4, dtype=torch.float64)  # (N, H, W, C)
    torch.testing.assert_close(cam(net, x, 1, layer="0", method="cam"), cam(net, x, 1))
    with pytest.raises(ValueError, match="contradicts the head's layout"):
        cam(net, x, 1, layer="0", layout="channels_first")


def test_inference_mode_allows_exact_maps_and_explains_gradient_ones():
    net = Net("avg").eval()
    x = torch.randn(2, 2, 6, 6)
    want = cam(net, x)
    with torch.inference_mode():
        torch.testing.assert_close(cam(net, x), want)
        with pytest.raises(RuntimeError, match="inference_mode"):
            cam(net, x, method="gradcam")
    assert no_hooks(net)


def test_normalize_maps_ignores_padded_positions():
    maps = torch.tensor([[2.0, 4.0, 100.0], [1.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    got = gp.cam.normalize_maps(maps, mask)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize(
    "name",
    ["cam", "cam.maps", "cam.exact", "cam.gradient", "cam.resize", "cam.capture"],
)
def test_cam_doctests_pass(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"globalpool.{name}"))
    assert result.failed == 0 and result.attempted > 0


def test_exact_kinds_are_those_with_a_credit_and_a_registered_kind_can_have_one():
    from globalpool import registry
    from globalpool.cam.maps import exact_kinds

    assert set(exact_kinds()) == {k for k in registry.kinds() if registry.spec(k).credit}
    assert "gem" not in exact_kinds() and "lse" not in exact_kinds()

    def absmax(x, mask):
        return (x.abs() if mask is None else torch.where(mask, x.abs(), 0.0)).amax(-1)

    def absmax_credit(x, mask):  # the largest magnitude, credited to where it is (n * |x|)
        a = x.abs() if mask is None else torch.where(mask, x.abs(), -1.0)
        top = a.amax(-1, keepdim=True)
        n = x.shape[-1] if mask is None else mask.sum(-1, keepdim=True).to(x.dtype)
        ties = (a == top).to(x.dtype)
        return ties * n * top / ties.sum(-1, keepdim=True)

    gp.register_kind("absmax_cam", absmax, credit=absmax_credit)
    try:
        head = make_head("absmax_cam", 4, 3, "channels_first", 0)
        x = features(2, 4, (5, 3), "channels_first", 0, False)
        targets = torch.tensor([0, 2])
        maps = cam(head, x, targets, method="cam")
        logits = head(x)[torch.arange(2), targets] - head.fc.bias[targets]
        torch.testing.assert_close(maps.mean((1, 2)), logits, rtol=1e-10, atol=1e-10)
    finally:
        gp.unregister_kind("absmax_cam")
