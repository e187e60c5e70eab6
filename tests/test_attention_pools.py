"""Query-based attention pools (LatentAttentionPool, SimPool, CLIPAttentionPool) against float64
compositions written here from their definitions, under the layout / mask / dtype contract, in
heads, and through torch.export, ONNX and torch.compile."""

from __future__ import annotations

import doctest
import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import globalpool as gp
from globalpool import registry
from globalpool.learned_pools import LEARNED_POOLS

C, HEADS = 16, 4

# --------------------------------------------------------------------------------------------
# float64 compositions, from the definitions (softmax(q kᵀ/√d) v by hand), over (N, L, C) tokens


def attention_by_hand(q, k, v, real):
    """q (N, H, Lq, d), k/v (N, H, L, d), real (N, L) bool: softmax over the real keys."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~real[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1) @ v


def heads_of(t, h):
    n, length, c = t.shape
    return t.reshape(n, length, h, c // h).permute(0, 2, 1, 3)


def layer_norm(t, weight, bias, eps=1e-6):
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def linear(t, sd, name):
    out = t @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out


def gelu(t, tanh):
    if tanh:
        return 0.5 * t * (1 + torch.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t**3)))
    return 0.5 * t * (1 + torch.erf(t / math.sqrt(2)))


def map_by_hand(sd, tokens, real, *, h, qk_norm, pool, tanh=False):
    """timm's AttentionPoolLatent (with a LayerNorm norm_layer) from its state dict."""
    n = tokens.shape[0]
    q = heads_of(linear(sd["latent"].expand(n, -1, -1), sd, "q"), h)
    kv = linear(tokens, sd, "kv")
    c = tokens.shape[-1]
    k, v = heads_of(kv[..., :c], h), heads_of(kv[..., c:], h)
    if qk_norm:
        q = layer_norm(q, sd["q_norm.weight"], sd["q_norm.bias"])
        k = layer_norm(k, sd["k_norm.weight"], sd["k_norm.bias"])
    y = attention_by_hand(q, k, v, real).permute(0, 2, 1, 3).reshape(n, -1, c)
    y = linear(y, sd, "proj")
    hidden = gelu(linear(layer_norm(y, sd["norm.weight"], sd["norm.bias"]), sd, "mlp.fc1"), tanh)
    y = y + linear(hidden, sd, "mlp.fc2")
    return {"token": y[:, 0], "avg": y.mean(1), None: y}[pool]


def simpool_by_hand(sd, tokens, real, *, h, gamma):
    """SimPool (Psomas et al. 2023): GAP query, LN keys and values, optional gamma power."""
    w = real.to(tokens.dtype)[..., None]
    mean = (tokens * w).sum(1) / w.sum(1)
    q = heads_of(linear(mean[:, None], sd, "wq"), h)
    v = layer_norm(tokens, sd["norm_patches.weight"], sd["norm_patches.bias"])
    k = heads_of(linear(v, sd, "wk"), h)
    if gamma is not None:
        low = torch.where(real[..., None], v, torch.inf).amin((1, 2), keepdim=True)
        v = (torch.where(real[..., None], v, low) - low + 1e-6) ** gamma
    y = attention_by_hand(q, k, heads_of(v, h), real)
    y = y.permute(0, 2, 1, 3).reshape(tokens.shape[0], -1)
    return y if gamma is None else y ** (1 / gamma)


def clip_by_hand(sd, tokens, real, *, h):
    """CLIP's AttentionPool2d: [mean, x] + positions, the first as query, multi-head."""
    w = real.to(tokens.dtype)[..., None]
    mean = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    seq = torch.cat([mean, tokens], 1) + sd["positional_embedding"]
    keys = torch.cat([torch.ones_like(real[:, :1]), real], 1)
    q = heads_of(linear(seq[:, :1], sd, "q_proj"), h)
    k, v = heads_of(linear(seq, sd, "k_proj"), h), heads_of(linear(seq, sd, "v_proj"), h)
    y = attention_by_hand(q, k, v, keys).permute(0, 2, 1, 3).reshape(tokens.shape[0], -1)
    return linear(y, sd, "c_proj")


def timm_map_state_dict(c, h, latent_len, qk_norm, mlp_ratio=4.0, seed=0):
    """A state dict with timm's AttentionPoolLatent names and shapes (norm_layer=LayerNorm)."""
    g = torch.Generator().manual_seed(seed)
    hidden = int(c * mlp_ratio)
    shapes = {
        "latent": (1, latent_len, c),
        "q.weight": (c, c), "q.bias": (c,),
        "kv.weight": (2 * c, c), "kv.bias": (2 * c,),
        "proj.weight": (c, c), "proj.bias": (c,),
        "norm.weight": (c,), "norm.bias": (c,),
        "mlp.fc1.weight": (hidden, c), "mlp.fc1.bias": (hidden,),
        "mlp.fc2.weight": (c, hidden), "mlp.fc2.bias": (c,),
    }
    if qk_norm:
        shapes |= {f"{n}_norm.{p}": (c // h,) for n in "qk" for p in ("weight", "bias")}
    return {k: torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for k, s in shapes.items()}


def random_state_dict(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64) * 0.5
            for k, v in module.state_dict().items()}


def make(name, c=C, size=(5,), **kw):
    """A pool of each family, channels-last unless told (the compositions take tokens)."""
    kw.setdefault("layout", "channels_last")
    if name == "map":
        return gp.LatentAttentionPool(c, num_heads=HEADS, **kw)
    if name == "simpool":
        return gp.SimPool(c, **kw)
    return gp.CLIPAttentionPool(c, size, num_heads=HEADS, **kw)


def by_hand(name, module, tokens, real):
    sd = {k: v.double() for k, v in module.state_dict().items()}
    if name == "map":
        return map_by_hand(sd, tokens, real, h=module.num_heads, qk_norm=False, pool="token")
    if name == "simpool":
        return simpool_by_hand(sd, tokens, real, h=module.num_heads, gamma=module.gamma)
    return clip_by_hand(sd, tokens, real, h=module.num_heads)


FAMILIES = ("map", "simpool", "clip")

# --------------------------------------------------------------------------------------------
# values and gradients against the compositions


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize(("latent_len", "pool"), [(1, "token"), (3, "token"), (3, "avg"), (3, None)])
def test_map_loads_timm_names_and_matches_the_composition(qk_norm, latent_len, pool):
    sd = timm_map_state_dict(C, HEADS, latent_len, qk_norm)
    module = gp.LatentAttentionPool(C, num_heads=HEADS, latent_len=latent_len, qk_norm=qk_norm,
                                    pool=pool, layout="channels_last").double()
    assert set(module.state_dict()) == set(sd)
    module.load_state_dict(sd, strict=True)
    x = torch.randn(3, 7, C, dtype=torch.float64, requires_grad=True)
    real = torch.ones(3, 7, dtype=torch.bool)
    got = module(x)
    want = map_by_hand(sd, x, real, h=HEADS, qk_norm=qk_norm, pool=pool)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    (gx,) = torch.autograd.grad(got, x, g)
    (wx,) = torch.autograd.grad(want, x, g)
    torch.testing.assert_close(gx, wx)


def test_map_gelu_tanh_and_parameter_gradients():
    sd = timm_map_state_dict(C, HEADS, 2, False, mlp_ratio=2.0)
    module = gp.LatentAttentionPool(C, num_heads=HEADS, latent_len=2, mlp_ratio=2.0,
                                    mlp_act="gelu_tanh", layout="channels_last").double()
    module.load_state_dict(sd)
    leaves = {k: v.clone().requires_grad_() for k, v in sd.items()}
    x = torch.randn(2, 6, C, dtype=torch.float64)
    want = map_by_hand(leaves, x, torch.ones(2, 6, dtype=torch.bool), h=HEADS, qk_norm=False,
                       pool="token", tanh=True)
    got = module(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    for name, p in module.named_parameters():
        torch.testing.assert_close(p.grad, leaves[name].grad, msg=name)


@pytest.mark.parametrize("gamma", [None, 2.0, 0.7])
@pytest.mark.parametrize("num_heads", [1, 2])
def test_simpool_matches_the_composition(gamma, num_heads):
    module = gp.SimPool(C, num_heads=num_heads, gamma=gamma, layout="channels_last").double()
    sd = random_state_dict(module)
    assert set(sd) == {"norm_patches.weight", "norm_patches.bias", "wq.weight", "wk.weight"}
    module.load_state_dict(sd)
    x = torch.randn(3, 8, C, dtype=torch.float64, requires_grad=True)
    mask = torch.arange(8) < torch.tensor([[8], [5], [2]])
    got = module(x, mask)
    want = simpool_by_hand(sd, x, mask, h=num_heads, gamma=gamma)
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx)


def test_clip_loads_clip_names_and_matches_the_composition():
    module = gp.CLIPAttentionPool(C, (3, 4), num_heads=HEADS, output_dim=8).double()
    sd = random_state_dict(module)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "positional_embedding": (13, C),
        **{f"{p}_proj.{w}": (C, C)[: 2 if w == "weight" else 1] for p in "qkv"
           for w in ("weight", "bias")},
        "c_proj.weight": (8, C), "c_proj.bias": (8,),
    }
    module.load_state_dict(sd)
    x = torch.randn(2, C, 3, 4, dtype=torch.float64, requires_grad=True)
    got = module(x)
    tokens = x.flatten(2).transpose(1, 2)
    want = clip_by_hand(sd, tokens, torch.ones(2, 12, dtype=torch.bool), h=HEADS)
    torch.testing.assert_close(got, want)
    (gx,) = torch.autograd.grad(got.sum(), x)
    (wx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, wx)


def test_clip_equals_torch_multi_head_attention_forward():
    """The same computation as CLIP's own code path (F.multi_head_attention_forward)."""
    module = gp.CLIPAttentionPool(C, (2, 3), num_heads=HEADS).double()
    x = torch.randn(2, C, 2, 3, dtype=torch.float64)
    seq = x.flatten(2).permute(2, 0, 1)
    seq = torch.cat([seq.mean(0, keepdim=True), seq]) + module.positional_embedding[:, None]
    want, _ = F.multi_head_attention_forward(
        seq[:1], seq, seq, C, HEADS, None,
        torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias]), None, None,
        False, 0.0, module.c_proj.weight, module.c_proj.bias, use_separate_proj_weight=True,
        q_proj_weight=module.q_proj.weight, k_proj_weight=module.k_proj.weight,
        v_proj_weight=module.v_proj.weight, need_weights=False)
    torch.testing.assert_close(module(x), want[0])


# --------------------------------------------------------------------------------------------
# the contract: layouts, ranks, masks, dtypes


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("size", [(7,), (3, 4), (2, 3, 2)])
def test_layouts_and_ranks_agree(name, size):
    torch.manual_seed(0)
    first = make(name, size=size, layout="channels_first").double()
    last = make(name, size=size, layout="channels_last").double()
    last.load_state_dict(first.state_dict())
    x = torch.randn(2, C, *size, dtype=torch.float64)
    mask = torch.rand(2, *size) > 0.3
    mask.view(2, -1)[:, 0] = True
    out = first(x, mask)
    assert out.shape == (2, C)
    torch.testing.assert_close(last(x.movedim(1, -1), mask), out)
    tokens = x.flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, by_hand(name, first, tokens, mask.flatten(1)))


@pytest.mark.parametrize("name", FAMILIES)
def test_padding_never_reaches_output_or_gradient(name):
    torch.manual_seed(0)
    module = make(name, size=(6,)).double()
    x = torch.randn(3, 6, C, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]]).bool()
    x[~mask] = float("nan")
    x.requires_grad_(True)
    out = module(x, mask)
    assert out.isfinite().all()
    assert (out[2] == 0).all()  # no real position: exactly 0
    clean = torch.where(mask[..., None], x.detach(), 0.0)
    torch.testing.assert_close(out[:2], by_hand(name, module, clean, mask)[:2])
    if name != "clip":  # no positional table: the real positions alone give the same output
        torch.testing.assert_close(out[1], module(x.detach()[1:2, :3])[0])
    out.sum().backward()
    assert x.grad.isfinite().all()
    assert (x.grad[~mask] == 0).all()
    for pname, p in module.named_parameters():
        assert p.grad.isfinite().all(), pname
    module.zero_grad()
    module(x.detach()[2:], mask[2:]).sum().backward()  # an all-padded sample alone
    for pname, p in module.named_parameters():
        assert (p.grad == 0).all(), pname


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32_and_keep_their_dtype(name, dtype):
    torch.manual_seed(0)
    module = make(name, size=(3, 3), layout="channels_first")
    x = torch.randn(2, C, 3, 3).to(dtype)
    mask = torch.ones(2, 3, 3, dtype=torch.bool)
    mask[1, 2] = False
    out = module(x, mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), module(x.float(), mask), rtol=2e-2, atol=2e-2)
    half = module.to(dtype)(x, mask)  # half parameters too: the softmax still runs in float32
    assert half.dtype == dtype and half.isfinite().all()


def test_simpool_gamma_is_per_sample():
    """One sample's output does not depend on the others (the reference code's batch-wide
    minimum would make it)."""
    module = gp.SimPool(C, gamma=2.0, layout="channels_last")
    x = torch.randn(2, 5, C)
    alone = module(x[:1])
    x[1] -= 100.0
    torch.testing.assert_close(module(x)[:1], alone)


# --------------------------------------------------------------------------------------------
# CLIP's positional table at other sizes


def test_clip_positional_table_is_resized_only_when_asked():
    module = gp.CLIPAttentionPool(C, (4, 4), num_heads=HEADS)
    with pytest.raises(ValueError, match=r"spatial_size=\(4, 4\).*spatial size \(5, 3\).*"
                                         r"interpolate=True"):
        module(torch.randn(1, C, 5, 3))
    resized = gp.CLIPAttentionPool(C, (4, 4), num_heads=HEADS, interpolate=True)
    resized.load_state_dict(module.state_dict())
    table = resized.positions((5, 3))
    grid = module.positional_embedding[1:].reshape(1, 4, 4, C).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(5, 3), mode="bicubic", align_corners=False)
    torch.testing.assert_close(table[1:], want.permute(0, 2, 3, 1).reshape(15, C))
    torch.testing.assert_close(table[0], module.positional_embedding[0])
    assert resized(torch.randn(2, C, 5, 3)).shape == (2, C)
    with pytest.raises(ValueError, match="another rank"):
        resized(torch.randn(1, C, 5))


def test_clip_one_dim_table_is_resized_linearly():
    module = gp.CLIPAttentionPool(C, (4,), num_heads=HEADS, interpolate=True)
    table = module.positions((7,))
    grid = module.positional_embedding[1:].T[None]
    want = F.interpolate(grid, size=7, mode="linear", align_corners=False)[0].T
    torch.testing.assert_close(table[1:], want)


# --------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(("build", "match"), [
    (lambda: gp.LatentAttentionPool(10, num_heads=4), r"channels=10 must be divisible by num_heads=4"),
    (lambda: gp.LatentAttentionPool(16, num_heads=0), r"num_heads must be a positive int, got 0"),
    (lambda: gp.LatentAttentionPool(16, latent_len=0), r"latent_len must be an int >= 1.*got 0"),
    (lambda: gp.LatentAttentionPool(16, pool="max"), r"pool must be one of .*got 'max'"),
    (lambda: gp.LatentAttentionPool(16, mlp_ratio=-1), r"mlp_ratio must be .*>= 0, got -1"),
    (lambda: gp.LatentAttentionPool(16, mlp_act="relu"), r"mlp_act must be one of"),
    (lambda: gp.SimPool(16, num_heads=3), r"channels=16 must be divisible by num_heads=3"),
    (lambda: gp.SimPool(16, gamma=0), r"gamma must be None or a finite real number > 0, got 0"),
    (lambda: gp.CLIPAttentionPool(12, (7, 7), num_heads=8), r"channels=12 .* num_heads=8"),
    (lambda: gp.CLIPAttentionPool(16, 7), r"spatial_size must be a tuple .* got 7"),
    (lambda: gp.CLIPAttentionPool(16, (7, 7), output_dim=0), r"output_dim must be a positive int"),
])
def test_bad_arguments_name_the_argument(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


@pytest.mark.parametrize("name", FAMILIES)
def test_bad_inputs_are_refused(name):
    module = make(name, size=(5,), layout="channels_first")
    x = torch.randn(2, C, 5)
    with pytest.raises(ValueError, match=r"mask must have shape \(N, \*S\) = \(2, 5\), got \(2, 4\)"):
        module(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must have dtype torch.bool"):
        module(x, torch.ones(2, 5))
    with pytest.raises(ValueError, match=r"\(channels=16\) got input with 8 channels"):
        module(torch.randn(2, 8, 5))


# --------------------------------------------------------------------------------------------
# heads


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_build_each_pool(name):
    params = {"map": {"num_heads": HEADS}, "simpool": {"gamma": 2.0},
              "clip": {"num_heads": HEADS}}[name]
    size = {"spatial_size": (3, 3)} if name == "clip" else {}
    head = gp.make_head(name, C, 5, **params, **size)
    assert isinstance(head.pool, LEARNED_POOLS[name])
    x = torch.randn(2, C, 3, 3)
    assert head(x).shape == (2, 5)
    assert head.feature_width == C and head(x, pre_logits=True).shape == (2, C)
    direct = gp.ClassifierHead(C, 5, pool=name, norm="layer", hidden=12, **params, **size)
    assert direct(x).shape == (2, 5) and direct.pooled_width == C and direct.feature_width == 12


def test_head_map_reduction_and_reset():
    head = gp.ClassifierHead(C, 5, pool="map", num_heads=HEADS, latent_len=3, latent_pool="avg")
    assert head.pool.pool == "avg" and head(torch.randn(2, C, 4)).shape == (2, 5)
    with pytest.raises(ValueError, match="latent_pool must be 'token' or 'avg'"):
        gp.ClassifierHead(C, 5, pool="map", latent_pool=None)
    with pytest.raises(TypeError, match=r"pool 'map' got unexpected argument\(s\) \['p'\]"):
        gp.make_head("map", C, 5, p=3.0)
    with pytest.raises(ValueError, match="pool 'clip' needs spatial_size"):
        gp.make_head("clip", C, 5)
    head = gp.ClassifierHead(C, 5).double()
    head.reset(3, pool="simpool")
    assert isinstance(head.pool, gp.SimPool) and head.pool.wq.weight.dtype == torch.float64
    assert head(torch.randn(2, C, 4, dtype=torch.float64)).shape == (2, 3)


def test_learned_pool_names_never_become_kinds():
    assert not set(LEARNED_POOLS) & set(registry.kinds())
    for name in LEARNED_POOLS:
        with pytest.raises(ValueError, match=f"name '{name}' is reserved"):
            gp.register_kind(name, lambda x, mask: x.sum(-1))
    with pytest.raises(ValueError, match="is a registered kind and cannot be reserved"):
        registry.reserve_name("avg", "a test")


# --------------------------------------------------------------------------------------------
# export


class _Masked(torch.nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, x, mask):
        return self.pool(x, mask)


def _exportable(name):
    torch.manual_seed(0)
    return _Masked(make(name, size=(3, 4), layout="channels_first")).eval()


def _inputs(n):
    x = torch.randn(n, C, 3, 4)
    mask = torch.rand(n, 3, 4) > 0.3
    mask[:, 0, 0] = True
    if n > 2:
        mask[-1] = False  # an all-padded sample
    return x, mask


@pytest.mark.parametrize("name", FAMILIES)
def test_torch_export_with_dynamic_batch(name):
    model = _exportable(name)
    batch = torch.export.Dim("N", min=1, max=64)
    program = torch.export.export(model, _inputs(2), dynamic_shapes=({0: batch}, {0: batch}))
    for n in (1, 5):
        x, mask = _inputs(n)
        torch.testing.assert_close(program.module()(x, mask), model(x, mask))


@pytest.mark.parametrize("name", FAMILIES)
def test_onnx_export_runs_in_onnxruntime(name, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _exportable(name)
    batch = torch.export.Dim("N", min=1, max=64)
    path = str(tmp_path / "pool.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, _inputs(2), path, dynamo=True, input_names=["x", "mask"],
                          dynamic_shapes={"x": {0: batch}, "mask": {0: batch}}, verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for n in (1, 4):
        x, mask = _inputs(n)
        (got,) = session.run(None, {"x": x.numpy(), "mask": mask.numpy()})
        torch.testing.assert_close(torch.from_numpy(got), model(x, mask), rtol=1e-5, atol=1e-5)


def test_compiles_as_one_graph():
    model = _exportable("map")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x, mask = _inputs(3)
    torch.testing.assert_close(compiled(x, mask), model(x, mask))


# --------------------------------------------------------------------------------------------
# docstring examples of the new modules


@pytest.mark.parametrize("module", [
    "globalpool.attention.query", "globalpool.attention.latent", "globalpool.attention.simpool",
    "globalpool.attention.clip", "globalpool.learned_pools",
])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
