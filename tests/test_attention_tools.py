"""The query-based attention pools (map, simpool, clip) in the tools around a pool: gp.monitor's
per-head attention entropy, the attention maps of gp.class_activation_maps (and the gradient
maps beside them), gp.swap_pool into a ViT over tokens and a ResNet-like CNN, and bad input.

The attention is checked against float64 compositions written here from the definitions
(``softmax(q kᵀ / √d)`` over the real keys, by hand), never against the pools' own code."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import globalpool as gp
from globalpool.attention import query

C, HEADS = 16, 4
FAMILIES = ("map", "simpool", "clip")

# --------------------------------------------------------------------------------------------
# float64 compositions of each pool's attention over (N, L, C) tokens


def _heads(t, h):
    n, length, c = t.shape
    return t.reshape(n, length, h, c // h).permute(0, 2, 1, 3)


def _linear(t, sd, name):
    out = t @ sd[f"{name}.weight"].T
    return out + sd[f"{name}.bias"] if f"{name}.bias" in sd else out


def _layer_norm(t, weight, bias, eps=1e-6):
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(var + eps) * weight + bias


def _softmax_attention(q, k, keys):
    """softmax(q kᵀ / √d) over the keys allowed by ``keys`` (N, K): (N, H, Lq, K)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~keys[:, None, None, :], float("-inf"))
    return torch.softmax(scores, -1)


def attention_by_hand(pool, tokens, real):
    """The attention of ``pool`` on float64 tokens (N, L, C) with real positions (N, L):
    ``(probs (N, H, Lq, K), real keys (N, K))``; a sample with none attends over all."""
    sd = {k: v.double() for k, v in pool.state_dict().items()}
    h = pool.num_heads
    keys = real | ~real.any(1, keepdim=True)
    tokens = torch.where(real[..., None], tokens, 0.0)
    w = keys.to(tokens.dtype)[..., None]
    mean = (tokens * w).sum(1, keepdim=True) / w.sum(1, keepdim=True)
    if isinstance(pool, gp.LatentAttentionPool):
        c = tokens.shape[-1]
        q = _heads(_linear(sd["latent"].expand(len(tokens), -1, -1), sd, "q"), h)
        k = _heads(tokens @ sd["kv.weight"][:c].T + sd["kv.bias"][:c], h)
        if "q_norm.weight" in sd:
            q = _layer_norm(q, sd["q_norm.weight"], sd["q_norm.bias"])
            k = _layer_norm(k, sd["k_norm.weight"], sd["k_norm.bias"])
    elif isinstance(pool, gp.SimPool):
        q = _heads(_linear(mean, sd, "wq"), h)
        v = _layer_norm(tokens, sd["norm_patches.weight"], sd["norm_patches.bias"])
        k = _heads(_linear(v, sd, "wk"), h)
    else:
        seq = torch.cat([mean, tokens], 1) + sd["positional_embedding"]
        keys = torch.cat([torch.ones_like(keys[:, :1]), keys], 1)
        q = _heads(_linear(seq[:, :1], sd, "q_proj"), h)
        k = _heads(_linear(seq, sd, "k_proj"), h)
    return _softmax_attention(q, k, keys), keys


def entropy_by_hand(probs, keys, real):
    """Per (query, head) the mean over the counted samples of -sum p log p / log(real keys)."""
    p = probs.clamp_min(1e-300)
    h = -(probs * torch.log(p)).sum(-1)  # (N, H, Lq)
    n_keys = keys.sum(1).double()
    counted = real.any(1) & (n_keys > 1)
    h = h[counted] / torch.log(n_keys[counted])[:, None, None]
    return h.mean(0).T  # (Lq, H)


def make(name, *, size=(6,), layout="channels_last", **kw):
    torch.manual_seed(0)
    if name == "map":
        return gp.LatentAttentionPool(C, num_heads=HEADS, layout=layout, **kw)
    if name == "simpool":
        return gp.SimPool(C, num_heads=kw.pop("num_heads", 2), layout=layout, **kw)
    return gp.CLIPAttentionPool(C, size, num_heads=HEADS, layout=layout, **kw)


def _batch(n=5, length=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, length, C, generator=g, dtype=torch.float64)
    real = torch.rand(n, length, generator=g) > 0.4
    real[:, 0] = True
    real[1] = False  # an all-padded sample: pools to 0, left out of the entropy
    real[2, 1:] = False  # one real position: entropy undefined for map/simpool
    tokens = torch.where(real[..., None], tokens, math.nan)  # padding never reaches anything
    return tokens, real


# --------------------------------------------------------------------------------------------
# gp.monitor: attention entropy per head (and per latent query)


@pytest.mark.parametrize(("name", "kw"), [
    ("map", {"latent_len": 3, "pool": None, "qk_norm": True}),
    ("map", {}),
    ("simpool", {"gamma": 2.0}),
    ("clip", {}),
])
def test_monitor_entropy_per_head_matches_the_composition(name, kw):
    pool = make(name, **kw).double()
    net = nn.Sequential(pool)
    calls = [_batch(seed=1), _batch(n=3, seed=2)]
    with gp.monitor(net) as stats:
        for tokens, real in calls:
            pool(tokens, real)
        pool(calls[0][0][:, :, :].nan_to_num())  # no mask: every position real
    record = stats["0"]
    wants, counts = [], []
    for tokens, real in [*calls, (calls[0][0].nan_to_num(), torch.ones_like(calls[0][1]))]:
        p, k = attention_by_hand(pool, tokens.nan_to_num(), real)
        keep = real.any(1) & (k.sum(1) > 1)
        wants.append(entropy_by_hand(p, k, real) * int(keep.sum()))
        counts.append(int(keep.sum()))
    want = sum(wants) / sum(counts)  # (Lq, H), mean over every counted sample of every call
    heads = torch.tensor(record["attention_entropy_heads"], dtype=torch.float64)
    torch.testing.assert_close(heads, want.mean(0), rtol=1e-9, atol=1e-9)
    assert record["attention_entropy"] == pytest.approx(float(want.mean()), abs=1e-9)
    if kw.get("latent_len", 1) > 1:
        latents = torch.tensor(record["attention_entropy_latents"], dtype=torch.float64)
        torch.testing.assert_close(latents, want, rtol=1e-9, atol=1e-9)
        assert latents.shape == (3, HEADS)
    else:
        assert "attention_entropy_latents" not in record
    assert len(record["attention_entropy_heads"]) == pool.num_heads
    assert record["kind"] == name and record["nan"] == 0 and record["errors"] == 0
    assert record["empty_samples"] == 2 * (3 if kw.get("pool", "token") is None else 1)
    json.loads(stats.to_json())  # plain, finite values
    assert "entropy" in str(stats) and query._RECORDERS == []


def test_monitor_float32_entropy_and_uniform_attention():
    pool = make("simpool", num_heads=1)
    with torch.no_grad():  # a zero query: uniform attention, entropy exactly 1
        pool.wq.weight.zero_()
    tokens, real = _batch()
    with gp.monitor(nn.Sequential(pool)) as stats:
        pool(tokens.float(), real)
    assert stats["0"]["attention_entropy"] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("name", FAMILIES)
def test_monitor_leaves_forward_and_gradient_unchanged(name):
    pool = make(name)
    tokens, real = _batch()
    x = tokens.float().requires_grad_(True)
    plain = pool(x, real)
    (g_plain,) = torch.autograd.grad(plain.square().sum(), x)
    with gp.monitor(nn.Sequential(pool)) as stats:
        watched = pool(x, real)
        (g_watched,) = torch.autograd.grad(watched.square().sum(), x)
    assert torch.equal(plain, watched) and torch.equal(g_plain, g_watched)
    assert stats["0"]["calls"] == 1 and torch.isfinite(g_watched).all()
    assert not pool._forward_hooks and not pool._forward_pre_hooks


def test_monitor_recording_closes_when_the_forward_raises():
    pool = make("map")
    tokens, real = _batch()
    with gp.monitor(nn.Sequential(pool)) as stats:
        with pytest.raises(ValueError, match="mask must have shape"):
            pool(tokens.float(), real[:, :3])
        assert query._RECORDERS == []
        pool(tokens.float(), real)
    assert stats["0"]["calls"] == 1 and stats["0"]["attention_entropy"] is not None
    assert query._RECORDERS == []


def test_monitor_records_no_entropy_before_a_sample_counts():
    pool = make("simpool")
    tokens, real = _batch()
    with gp.monitor(nn.Sequential(pool)) as stats:
        pool(tokens[1:2].float(), real[1:2])  # all padded
    assert stats["0"]["attention_entropy"] is None
    assert stats["0"]["attention_entropy_heads"] is None


# --------------------------------------------------------------------------------------------
# class_activation_maps: attention maps, and the gradient maps beside them


@pytest.mark.parametrize(("name", "kw"), [
    ("map", {"latent_len": 2, "qk_norm": True}), ("simpool", {}), ("clip", {})
])
def test_attention_maps_are_the_pools_attention(name, kw):
    pool = make(name, size=(2, 3), layout="channels_first", **kw).double().eval()
    tokens, real = _batch()
    x = tokens.transpose(1, 2).reshape(5, C, 2, 3)  # (N, C, 2, 3), NaN at padding
    mask = real.reshape(5, 2, 3)
    maps = gp.class_activation_maps(pool, x, method="attention", mask=mask)
    probs, keys = attention_by_hand(pool, tokens.nan_to_num(), real)
    want = probs[..., probs.shape[-1] - 6:].transpose(1, 2).reshape(5, -1, pool.num_heads, 2, 3)
    want = torch.where(mask[:, None, None] & real.any(1)[:, None, None, None, None], want, 0.0)
    assert maps.shape == (5, kw.get("latent_len", 1), pool.num_heads, 2, 3)
    torch.testing.assert_close(maps, want, rtol=1e-10, atol=1e-12)
    assert (maps[1] == 0).all() and (maps[~mask[:, None, None].expand_as(maps)] == 0).all()
    totals = maps.sum((-2, -1))[real.any(1)]
    if name == "clip":  # the mean token takes its share
        assert (totals < 1).all() and (totals > 0).all()
    else:
        torch.testing.assert_close(totals, torch.ones_like(totals))
    mean = gp.class_activation_maps(pool, x, method="attention", mask=mask, reduce="mean")
    torch.testing.assert_close(mean, want.mean((1, 2)))
    auto = gp.class_activation_maps(pool, x, mask=mask)  # auto: the averaged attention
    torch.testing.assert_close(auto, mean)
    upsampled = gp.class_activation_maps(pool, x, method="attention", mask=mask, upsample=(4, 6))
    assert upsampled.shape == (5, kw.get("latent_len", 1), pool.num_heads, 4, 6)
    assert query._RECORDERS == [] and not pool._forward_hooks and not pool._forward_pre_hooks


@pytest.mark.parametrize("name", FAMILIES)
def test_heads_auto_method_and_gradient_maps(name):
    params = {"map": {"num_heads": HEADS}, "simpool": {}, "clip": {"spatial_size": (5, 4),
                                                                     "num_heads": HEADS}}[name]
    torch.manual_seed(0)
    head = gp.ClassifierHead(C, 3, pool=name, **params).double().eval()
    net = nn.Sequential(nn.Conv2d(2, C, 1), head).double().eval()
    x = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    assert gp.cam.auto_method(head) == gp.cam.auto_method(net) == "attention"
    maps = gp.class_activation_maps(net, x, method="attention")
    assert maps.shape == (2, 1, head.pool.num_heads, 5, 4)
    torch.testing.assert_close(gp.class_activation_maps(net, x), maps.mean((1, 2)))
    # the gradient methods still work: Grad-CAM by hand from autograd
    feats = net[0](x).detach().requires_grad_(True)
    logits = head(feats)
    target = logits.argmax(1)
    (grad,) = torch.autograd.grad(logits[torch.arange(2), target].sum(), feats)
    want = torch.relu((grad.mean((2, 3), keepdim=True) * feats.detach()).sum(1))
    torch.testing.assert_close(gp.class_activation_maps(net, x, method="gradcam"), want)
    mask = torch.ones(2, 5, 4, dtype=torch.bool)
    mask[1, :, 2:] = False
    for method in ("gradcam++", "layercam"):
        got = gp.class_activation_maps(head, feats.detach(), method=method, mask=mask)
        assert got.shape == (2, 5, 4) and torch.isfinite(got).all()
        assert (got[1, :, 2:] == 0).all()
    with pytest.raises(ValueError, match="method='cam' is exact only"):
        gp.class_activation_maps(head, feats.detach(), method="cam")


def test_attention_maps_of_tokens_channels_last():
    pool = make("map", latent_len=2, pool="avg")
    tokens, real = _batch()
    maps = gp.class_activation_maps(pool, tokens.float(), method="attention", mask=real)
    assert maps.shape == (5, 2, HEADS, 6) and maps.dtype == torch.float32
    assert (maps[~real[:, None, None].expand_as(maps)] == 0).all()


def test_attention_maps_refuse_bad_requests():
    x = torch.randn(2, C, 3, 3)
    avg = gp.ClassifierHead(C, 3, pool="avg")
    with pytest.raises(ValueError, match=r"method='attention' maps the attention of a query.*"
                                         r"ClassifierHead pooling with 'avg'.*'gradcam'"):
        gp.class_activation_maps(avg, x, method="attention")
    net = nn.Sequential(nn.Conv2d(C, C, 1), gp.ClassifierHead(C, 3, pool="simpool"))
    with pytest.raises(ValueError, match=r"got layer='0'"):
        gp.class_activation_maps(net, x, method="attention", layer="0")
    with pytest.raises(ValueError, match=r"reduce must be None .* or 'mean' .*got 'max'"):
        gp.class_activation_maps(net, x, method="attention", reduce="max")
    with pytest.raises(ValueError, match=r"mask must have the feature map's shape"):
        gp.class_activation_maps(net, x, method="attention", mask=torch.ones(2, 3, 4).bool())
    assert gp.class_activation_maps(net, x, layer="0", method="gradcam").shape == (2, 3, 3)


# --------------------------------------------------------------------------------------------
# swap_pool into a ViT over tokens and a ResNet-like CNN


class ClassToken(nn.Module):  # timm's global_pool="token": the class token of (N, L, C)
    def forward(self, x):
        return x[:, 0]


class TinyViT(nn.Module):
    """timm's layout: patch_embed -> [cls] + tokens + pos_embed -> blocks -> norm ->
    global_pool (tokens (N, L, C) to (N, C)) -> fc_norm -> head."""

    def __init__(self, global_pool=None, classes=5, patches=4):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, C, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, C) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + patches, C) * 0.02)
        layer = nn.TransformerEncoderLayer(C, 2, 2 * C, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(C)
        self.global_pool = global_pool if global_pool is not None else ClassToken()
        self.fc_norm = nn.LayerNorm(C)
        self.head = nn.Linear(C, classes)

    def forward(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(self.fc_norm(self.global_pool(x)))


class TinyResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.BatchNorm2d(C), nn.ReLU())
        self.layer1 = nn.Sequential(nn.Conv2d(C, C, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(C, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(self.layer1(self.stem(x))), 1))


SWAPS = {
    "map": {"num_heads": HEADS, "latent_len": 2, "latent_pool": "avg"},
    "simpool": {"num_heads": 2},
    "clip": {"num_heads": HEADS},
}


def _check_trainable(model, pool, x):
    model.train()
    before = [p.detach().clone() for p in pool.parameters()]
    assert before and all(p.requires_grad for p in pool.parameters())
    model(x).logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in pool.parameters())
    assert sum(float(p.grad.abs().sum()) for p in pool.parameters()) > 0
    with torch.no_grad():  # a plain SGD step (torch.optim's first step costs seconds of imports)
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
    assert any(not torch.equal(b, p) for b, p in zip(before, pool.parameters(), strict=True))


def _inputs_of(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    return seen, handle


@pytest.mark.parametrize("name", FAMILIES)
def test_swap_pool_into_a_vit_over_tokens(name):
    torch.manual_seed(0)
    vit = TinyViT().eval()
    x = torch.randn(3, 3, 8, 8)
    size = {"spatial_size": (5,)} if name == "clip" else {}
    with pytest.raises(ValueError, match=r"global_pool \(global_pool: ClassToken\) holds no .*"
                                         r"pass layout="):
        gp.swap_pool(vit, name, **SWAPS[name], **size)
    assert isinstance(vit.global_pool, ClassToken)  # a refused call changes nothing
    gp.swap_pool(vit, name, layout="channels_last", **SWAPS[name], **size)
    pool = vit.global_pool
    assert isinstance(pool, gp.LEARNED_POOLS[name]) and pool.layout == "channels_last"
    seen, handle = _inputs_of(pool)
    assert vit(x).shape == (3, 5)
    handle.remove()
    assert seen == [torch.Size([3, 5, C])]  # every token, class token included, as (N, L, C)
    assert gp.cam.auto_method(vit) == "attention"
    maps = gp.class_activation_maps(vit, x)
    assert maps.shape == (3, 5)  # one weight per token
    with gp.monitor(vit) as stats:
        vit(x)
    assert len(stats["global_pool"]["attention_entropy_heads"]) == pool.num_heads
    _check_trainable(vit, pool, x)


def test_swap_pool_reads_the_layout_of_globalpools_own_token_pool():
    vit = TinyViT(global_pool=gp.GlobalPool("first", layout="channels_last"))
    gp.swap_pool(vit, "simpool")
    assert isinstance(vit.global_pool, gp.SimPool) and vit.global_pool.layout == "channels_last"
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    vit = TinyViT(global_pool=gp.GlobalPool("first", layout="channels_last"))
    with pytest.raises(ValueError, match=r"layout='channels_first' contradicts the pool "
                                         r"'global_pool' it replaces"):
        gp.swap_pool(vit, "map", layout="channels_first")
    assert isinstance(vit.global_pool, gp.GlobalPool)
    gp.swap_pool(vit, "avg")  # a kind: the token pool's layout and keepdim are kept
    assert vit.global_pool.layout == "channels_last" and vit.global_pool.kind == "avg"
    assert vit(torch.randn(2, 3, 8, 8)).shape == (2, 5)


@pytest.mark.parametrize("name", FAMILIES)
def test_swap_pool_into_a_resnet_like_cnn(name):
    torch.manual_seed(0)
    net = TinyResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    size = {"spatial_size": (4, 4)} if name == "clip" else {}
    gp.swap_pool(net, name, **SWAPS[name], **size)
    pool = net.avgpool
    assert isinstance(pool, gp.LEARNED_POOLS[name]) and pool.layout == "channels_first"
    seen, handle = _inputs_of(pool)
    assert net(x).shape == (2, 5)
    handle.remove()
    assert seen == [torch.Size([2, C, 4, 4])]
    assert gp.class_activation_maps(net, x).shape == (2, 4, 4)
    assert gp.class_activation_maps(net, x, method="gradcam").shape == (2, 4, 4)
    _check_trainable(net, pool, x)


def test_swap_pool_clip_of_another_width_rebuilds_the_classifier():
    net = TinyResNet()
    gp.swap_pool(net, "clip", spatial_size=(4, 4), num_heads=HEADS, output_dim=24)
    assert net.fc.in_features == 24 and net(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    vit = TinyViT()
    with pytest.raises(ValueError, match=r"gives 24 features from 16 channels: 'fc_norm' "
                                         r"\(LayerNorm"):
        gp.swap_pool(vit, "clip", layout="channels_last", spatial_size=(5,), output_dim=24)
    assert isinstance(vit.global_pool, ClassToken)


def _state(model):
    return {n: type(m) for n, m in model.named_modules()}, {
        k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize(("build", "call", "error", "match"), [
    (TinyResNet, lambda m: gp.swap_pool(m, "clip"), ValueError, "pool 'clip' needs spatial_size"),
    (TinyResNet, lambda m: gp.swap_pool(m, "map", p=3.0), TypeError,
     r"pool 'map' got unexpected argument\(s\) \['p'\]"),
    (TinyResNet, lambda m: gp.swap_pool(m, "map", latent_pool=None), ValueError,
     "latent_pool must be 'token' or 'avg'"),
    (TinyResNet, lambda m: gp.swap_pool(m, "map", num_heads=3), ValueError,
     "channels=16 must be divisible by num_heads=3"),
    (TinyResNet, lambda m: gp.swap_pool(m, "simpool", layout="channels_last"), ValueError,
     r"layout='channels_last' contradicts the pool 'avgpool' it replaces: "
     r"AdaptiveAvgPool2d pools \(N, C, \*S\)"),
    (TinyResNet, lambda m: gp.swap_pool(m, "simpool", layout="nhwc"), ValueError,
     "layout must be one of"),
    (TinyViT, lambda m: gp.swap_pool(m, "clip", spatial_size=(5,)), ValueError,
     "pass layout="),
])
def test_swap_pool_refusals_change_nothing(build, call, error, match):
    model = build()
    names, weights = _state(model)
    with pytest.raises(error, match=match):
        call(model)
    after_names, after_weights = _state(model)
    assert after_names == names
    assert all(torch.equal(weights[k], after_weights[k]) for k in weights)


def test_swap_pool_of_a_lone_pool_needs_the_channel_count():
    with pytest.raises(ValueError, match="nothing gives the channel count that kind 'map'"):
        gp.swap_pool(nn.AdaptiveAvgPool2d(1), "map")


# --------------------------------------------------------------------------------------------
# bad input the pools refuse (beyond tests/test_attention_pools.py)


@pytest.mark.parametrize(("call", "error", "match"), [
    (lambda: gp.LatentAttentionPool(16, latent_len=1.5), ValueError,
     r"latent_len must be an int >= 1 \(learned queries\), got 1.5"),
    (lambda: gp.LatentAttentionPool(16, latent_len=True), ValueError, "latent_len .* got True"),
    (lambda: gp.LatentAttentionPool(16, latent_len=-2), ValueError, "latent_len .* got -2"),
    (lambda: gp.SimPool(16, num_heads=2.0), ValueError, "num_heads must be a positive int, got 2.0"),
    (lambda: gp.LatentAttentionPool(18, num_heads=4), ValueError,
     r"channels=18 must be divisible by num_heads=4"),
    (lambda: gp.CLIPAttentionPool(16, (0, 3)), ValueError, r"spatial_size must be .* got \(0, 3\)"),
    (lambda: gp.CLIPAttentionPool(16, (3, 3, 3, 3)), ValueError, "1 to 3 positive ints"),
    (lambda: gp.CLIPAttentionPool(16, (3,), interpolate=1), TypeError, "interpolate must be a bool"),
    (lambda: gp.LatentAttentionPool(16, qk_norm=1), TypeError, "qk_norm must be a bool"),
    (lambda: gp.SimPool(16, gamma=float("nan")), ValueError, "gamma must be None or a finite"),
    (lambda: gp.LatentAttentionPool(16, mlp_ratio=float("inf")), ValueError, "mlp_ratio must be"),
    (lambda: gp.SimPool(16, layout="nhwc"), ValueError, "layout must be one of"),
    (lambda: gp.CLIPAttentionPool(16, (3, 3), num_heads=4)(torch.randn(2, 16, 3, 4)), ValueError,
     r"spatial_size=\(3, 3\)\) got input of spatial size \(3, 4\).*interpolate=True"),
    (lambda: gp.CLIPAttentionPool(16, (3, 3), num_heads=4, interpolate=True)(
        torch.randn(2, 16, 3, 3, 3)), ValueError, "a table of another rank cannot be resized"),
    (lambda: gp.SimPool(16)(torch.randn(2, 16)), ValueError, "x must have rank 3, 4 or 5"),
    (lambda: gp.SimPool(16)(torch.ones(2, 16, 3, dtype=torch.long)), TypeError,
     "x must have a floating dtype"),
    (lambda: gp.SimPool(16)([[1.0]]), TypeError, "x must be a torch.Tensor, got list"),
    (lambda: gp.SimPool(16)(torch.randn(2, 16, 3, 4), torch.ones(2, 12, dtype=torch.bool)),
     ValueError, r"mask must have shape \(N, \*S\) = \(2, 3, 4\), got \(2, 12\)"),
    (lambda: gp.LatentAttentionPool(16, num_heads=4, layout="channels_last")(
        torch.randn(2, 3, 4, 16), torch.ones(2, 4, 3, dtype=torch.bool)),
     ValueError, r"mask must have shape \(N, \*S\) = \(2, 3, 4\), got \(2, 4, 3\)"),
    (lambda: gp.SimPool(16)(torch.randn(2, 16, 3), [True] * 3), TypeError,
     "mask must be a bool torch.Tensor or None, got list"),
    (lambda: gp.LatentAttentionPool(16, num_heads=4, layout="channels_last")(
        torch.randn(2, 16, 8)), ValueError, r"\(channels=16\) got input with 8 channels"),
])
def test_bad_input_is_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()
    assert query._RECORDERS == []


def test_a_positional_table_of_another_size_does_not_load():
    pool = gp.CLIPAttentionPool(16, (3, 3), num_heads=4)
    other = gp.CLIPAttentionPool(16, (4, 4), num_heads=4).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for positional_embedding"):
        pool.load_state_dict(other)
