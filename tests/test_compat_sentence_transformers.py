"""globalpool.compat.sentence_transformers: every mode and combination of modes against a float64
oracle written here (token by token), left and right padding, NaN in padding, empty sentences,
prompt exclusion, token_weights_sum, gradients, the config.json format, bad input; and against
sentence-transformers' own Pooling where it is installed."""

from __future__ import annotations

import itertools
import json
import warnings

import numpy as np
import pytest
import torch

import globalpool as gp
from globalpool.compat.sentence_transformers import MODES, Pooling, SentencePooling

FLAGS = {
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
    "weightedmean": "pooling_mode_weightedmean_tokens",
    "lasttoken": "pooling_mode_lasttoken",
}
# every non-empty set of modes, in the flags' order
MODE_SETS = [m for r in range(1, 7) for m in itertools.combinations(MODES, r)]
LENGTHS = (5, 1, 0, 7, 3)  # real tokens per sentence (one empty); L = 7
PADDINGS = ("right", "left")


def make_mask(lengths, total, side):
    pos = np.arange(total)
    n = np.array(lengths)[:, None]
    real = pos < n if side == "right" else pos >= total - n
    return torch.tensor(real.astype(np.int64))


def make_batch(side, lengths=LENGTHS, total=7, c=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), total, c, generator=g, dtype=dtype)
    return x, make_mask(lengths, total, side)


def oracle(x, mask, modes, prompt_length=0, weights_sum=None, cls_tokens=None):
    """Token by token in float64: each mode over a sentence's real tokens after its first
    ``prompt_length`` real ones; weightedmean weighs each token by its rank among the sentence's
    real tokens (prompt included); a sentence with nothing left pools to 0."""
    x = x.detach().double().numpy()
    mask = mask.numpy().astype(bool)
    n, _, c = x.shape
    prompts = np.broadcast_to(np.asarray(prompt_length), (n,))
    rows = []
    for i in range(n):
        real = np.flatnonzero(mask[i])
        rank = {int(p): j + 1 for j, p in enumerate(real)}
        kept = real[int(prompts[i]):]
        parts = []
        for mode in modes:
            if mode == "cls" and cls_tokens is not None:
                parts.append(cls_tokens[i].double().numpy())
                continue
            if len(kept) == 0:
                parts.append(np.zeros(c))
                continue
            xs = x[i, kept]
            count = len(kept) if weights_sum is None else float(weights_sum[i])
            if mode == "cls":
                parts.append(xs[0])
            elif mode == "lasttoken":
                parts.append(xs[-1])
            elif mode == "max":
                parts.append(xs.max(0))
            elif mode == "mean":
                parts.append(xs.sum(0) / count)
            elif mode == "mean_sqrt_len_tokens":
                parts.append(xs.sum(0) / np.sqrt(count))
            else:
                w = np.array([rank[int(p)] for p in kept], dtype=np.float64)
                den = w.sum() if weights_sum is None else float(weights_sum[i])
                parts.append(w @ xs / den)
        rows.append(np.concatenate(parts))
    return np.stack(rows)


def run(pool, x, mask, **extra):
    return pool({"token_embeddings": x, "attention_mask": mask, **extra})["sentence_embedding"]


# -- values -----------------------------------------------------------------------------------


@pytest.mark.parametrize("side", PADDINGS)
def test_every_mode_and_combination_matches_the_oracle(side):
    x, mask = make_batch(side)
    for modes in MODE_SETS:
        flags = {FLAGS[m]: True for m in modes}
        for pool in (SentencePooling(3, pooling_mode=modes), SentencePooling(3, **flags)):
            assert pool.modes == modes
            y = run(pool, x, mask)
            assert y.shape == (5, 3 * len(modes)) and y.dtype == torch.float64
            np.testing.assert_allclose(y.numpy(), oracle(x, mask, modes), rtol=1e-12,
                                       atol=1e-12, err_msg=f"{modes} {side}")


def test_modes_given_by_name_are_concatenated_in_the_order_given():
    x, mask = make_batch("left")
    modes = ("lasttoken", "mean", "cls")
    y = run(SentencePooling(3, pooling_mode=list(modes)), x, mask)
    np.testing.assert_allclose(y.numpy(), oracle(x, mask, modes), rtol=1e-12, atol=1e-12)


def test_left_and_right_padding_give_the_same_sentence_embedding():
    xr, mr = make_batch("right")
    xl = torch.zeros_like(xr)
    for i, k in enumerate(LENGTHS):  # the same real tokens, moved to the right end
        xl[i, 7 - k:] = xr[i, :k]
    ml = make_mask(LENGTHS, 7, "left")
    pool = SentencePooling(3, pooling_mode=MODES)
    torch.testing.assert_close(run(pool, xl, ml), run(pool, xr, mr), rtol=1e-12, atol=1e-12)


def test_no_attention_mask_means_every_token_is_real():
    x, _ = make_batch("right")
    pool = SentencePooling(3, pooling_mode=MODES)
    y = pool({"token_embeddings": x})["sentence_embedding"]
    np.testing.assert_allclose(y.numpy(), oracle(x, torch.ones(5, 7), MODES), rtol=1e-12)


def test_bool_mask_and_the_dict_returned():
    x, mask = make_batch("left")
    features = {"token_embeddings": x, "attention_mask": mask.bool(), "other": 1}
    out = SentencePooling(3)(features)
    assert out is features and out["other"] == 1 and set(out) == {
        "token_embeddings", "attention_mask", "other", "sentence_embedding"}
    np.testing.assert_allclose(out["sentence_embedding"].numpy(), oracle(x, mask, ("mean",)))


def test_the_features_given_are_not_modified():
    x, mask = make_batch("right")
    features = {"token_embeddings": x.clone(), "attention_mask": mask.clone(), "prompt_length": 2}
    SentencePooling(3, pooling_mode=MODES, include_prompt=False)(features)
    assert torch.equal(features["token_embeddings"], x)
    assert torch.equal(features["attention_mask"], mask)


@pytest.mark.parametrize("side", PADDINGS)
def test_nan_in_padding_reaches_neither_output_nor_gradient(side):
    x, mask = make_batch(side)
    poisoned = x.clone().masked_fill(mask.bool().logical_not().unsqueeze(-1), float("nan"))
    poisoned.requires_grad_(True)
    pool = SentencePooling(3, pooling_mode=MODES)
    y = run(pool, poisoned, mask)
    np.testing.assert_allclose(y.detach().numpy(), oracle(x, mask, MODES), rtol=1e-12,
                               atol=1e-12)
    y.sum().backward()
    grad = poisoned.grad
    assert torch.isfinite(grad).all()
    assert (grad[~mask.bool()] == 0).all()
    # the naive masked mean (x * mask) lets the NaN through: the pitfall this module avoids
    naive = (poisoned.detach() * mask.unsqueeze(-1)).sum(1)
    assert torch.isnan(naive[[0, 1, 2, 4]]).all()  # every sentence with padding


def test_a_sentence_with_no_real_token_pools_to_zero_in_every_mode():
    x, _ = make_batch("right")
    mask = torch.zeros(5, 7, dtype=torch.int64)
    x.requires_grad_(True)
    y = run(SentencePooling(3, pooling_mode=MODES), x, mask)
    assert (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all()


def test_no_token_at_all_pools_to_zero_in_every_mode():
    """L == 0 (with or without a mask, with a prompt to leave out): every sentence is empty."""
    x = torch.randn(2, 0, 3, dtype=torch.float16, requires_grad=True)
    for mask in (torch.zeros(2, 0, dtype=torch.int64), None):
        pool = SentencePooling(3, pooling_mode=MODES, include_prompt=False)
        y = run(pool, x, mask, prompt_length=1)
        assert y.shape == (2, 6 * 3) and y.dtype == torch.float16 and (y == 0).all()
        y.sum().backward()
        assert x.grad.shape == (2, 0, 3)


def test_compiles_without_a_graph_break_and_checks_the_mask_eagerly():
    pool = SentencePooling(3, pooling_mode=("mean", "weightedmean", "cls"))
    x, mask = make_batch("left", dtype=torch.float32)
    compiled = torch.compile(lambda t, m: run(pool, t, m), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, mask), run(pool, x, mask))
    with pytest.raises(ValueError, match="must hold 0 .* and 1"):
        run(pool, x, mask * 2)


@pytest.mark.parametrize("side", PADDINGS)
def test_gradients_of_every_mode_pass_gradcheck(side):
    x, mask = make_batch(side, lengths=(3, 0, 4), total=5, c=2)
    x.requires_grad_(True)
    pool = SentencePooling(2, pooling_mode=MODES, include_prompt=False)
    assert torch.autograd.gradcheck(lambda t: run(pool, t, mask), (x,))
    assert torch.autograd.gradcheck(lambda t: run(pool, t, mask, prompt_length=1), (x,))


def test_half_inputs_accumulate_in_float32_and_return_half():
    x, mask = make_batch("left", total=7, c=3)
    y = run(SentencePooling(3, pooling_mode=MODES), x.half(), mask)
    assert y.dtype == torch.float16
    want = oracle(x.half().double(), mask, MODES)
    np.testing.assert_allclose(y.double().numpy(), want, rtol=4e-3, atol=4e-3)


# -- prompt exclusion, token weights, cls token embeddings -------------------------------------


@pytest.mark.parametrize("side", PADDINGS)
@pytest.mark.parametrize("prompt", [2, torch.tensor([2]), torch.tensor([2, 2, 2, 2, 2]),
                                    torch.tensor([1, 0, 3, 7, 2])])
def test_prompt_tokens_are_left_out_when_include_prompt_is_false(side, prompt):
    x, mask = make_batch(side)
    pool = SentencePooling(3, pooling_mode=MODES, include_prompt=False)
    y = run(pool, x, mask, prompt_length=prompt)
    lengths = prompt if isinstance(prompt, int) else prompt.numpy()
    np.testing.assert_allclose(y.numpy(), oracle(x, mask, MODES, lengths), rtol=1e-12,
                               atol=1e-12)
    # include_prompt=True (the default) ignores prompt_length
    with_prompt = SentencePooling(3, pooling_mode=MODES)
    np.testing.assert_allclose(run(with_prompt, x, mask, prompt_length=prompt).numpy(),
                               oracle(x, mask, MODES), rtol=1e-12, atol=1e-12)


def test_prompt_length_zero_changes_nothing():
    x, mask = make_batch("left")
    pool = SentencePooling(3, pooling_mode=MODES, include_prompt=False)
    torch.testing.assert_close(run(pool, x, mask, prompt_length=0), run(pool, x, mask))


@pytest.mark.parametrize("side", PADDINGS)
@pytest.mark.parametrize("prompt", [0, 1])
def test_token_weights_sum_is_the_divisor_of_the_mean_modes(side, prompt):
    x, mask = make_batch(side)
    tws = torch.tensor([2.5, 1.0, 0.0, 4.0, 0.5], dtype=torch.float64)
    modes = ("mean", "mean_sqrt_len_tokens", "weightedmean", "max")
    pool = SentencePooling(3, pooling_mode=modes, include_prompt=False)
    y = run(pool, x, mask, token_weights_sum=tws, prompt_length=prompt)
    want = oracle(x, mask, modes, prompt, weights_sum=tws.clamp(min=1e-9))
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-12, atol=1e-12)


def test_cls_token_embeddings_are_taken_as_they_are():
    x, mask = make_batch("left")
    cls = torch.randn(5, 3, dtype=torch.float64)
    y = run(SentencePooling(3, pooling_mode=("cls", "mean")), x, mask, cls_token_embeddings=cls)
    np.testing.assert_allclose(y.numpy(), oracle(x, mask, ("cls", "mean"), cls_tokens=cls))


# -- constructor, attributes, config ----------------------------------------------------------


def test_flags_choose_modes_in_the_concatenation_order():
    assert SentencePooling(4).modes == ("mean",)
    assert SentencePooling(4, pooling_mode_cls_token=True).modes == ("cls",)
    assert SentencePooling(4, pooling_mode_lasttoken=True, pooling_mode_cls_token=True,
                           pooling_mode_mean_tokens=False).modes == ("cls", "lasttoken")
    p = SentencePooling(4, "MEAN", pooling_mode_mean_tokens=True, pooling_mode_max_tokens=False)
    assert p.modes == ("mean",) and p.pooling_mode == "mean"
    p = SentencePooling(embedding_dimension=4, pooling_mode=("max", "cls"))
    assert p.pooling_mode == ("max", "cls") and p.pooling_mode_max_tokens
    assert p.pooling_mode_cls_token and not p.pooling_mode_mean_tokens
    assert p.word_embedding_dimension == 4
    assert p.get_sentence_embedding_dimension() == p.get_embedding_dimension() == 8
    assert Pooling is SentencePooling and gp.SentencePooling is SentencePooling


def test_config_dict_is_sentence_transformers_format():
    p = SentencePooling(8, pooling_mode=("cls", "weightedmean"), include_prompt=False)
    assert p.get_config_dict() == {
        "word_embedding_dimension": 8,
        "pooling_mode_cls_token": True,
        "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": True,
        "pooling_mode_lasttoken": False,
        "include_prompt": False,
    }
    assert repr(p) == f"SentencePooling({p.get_config_dict()})"
    # an order the flags cannot say is written as a list besides
    assert SentencePooling(8, ("max", "cls")).get_config_dict()["pooling_mode"] == ["max", "cls"]


def test_modes_in_the_flags_order_are_saved_as_flags_alone(tmp_path):
    """The format every sentence-transformers version reads: no pooling_mode key whenever the
    modes come in the order of MODES (every subset of it)."""
    flags_format = ["word_embedding_dimension", *(FLAGS[m] for m in
                    ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")),
                    "include_prompt"]
    for modes in MODE_SETS:
        p = SentencePooling(4, pooling_mode=modes)
        p.save(tmp_path)
        saved = json.loads((tmp_path / "config.json").read_text())
        assert list(saved) == flags_format, modes
        assert SentencePooling.load(tmp_path).modes == modes


@pytest.mark.parametrize("modes", [("mean",), ("cls", "lasttoken"), ("lasttoken", "max"), MODES])
@pytest.mark.parametrize("include_prompt", [True, False])
def test_save_and_load_round_trip(tmp_path, modes, include_prompt):
    p = SentencePooling(6, pooling_mode=modes, include_prompt=include_prompt)
    p.save(tmp_path / "1_Pooling")
    saved = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    assert saved == p.get_config_dict()
    q = SentencePooling.load(tmp_path / "1_Pooling")
    assert q.modes == modes and q.include_prompt == include_prompt
    assert q.get_config_dict() == p.get_config_dict()


def test_load_reads_the_newer_format_too(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"embedding_dimension": 16, "pooling_mode": ["lasttoken", "mean"], "include_prompt": True}
    ))
    p = SentencePooling.load(tmp_path)
    assert p.modes == ("lasttoken", "mean") and p.word_embedding_dimension == 16


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"pooling_mode": "median"}, ValueError, r"pooling_mode must be among .* got 'median'"),
        ({"pooling_mode": ()}, ValueError, "non-empty sequence"),
        ({"pooling_mode": ("max", "max")}, ValueError, "names a mode twice"),
        ({"pooling_mode_mean_tokens": False}, ValueError, "no pooling mode selected"),
        ({"pooling_mode": "cls", "pooling_mode_mean_tokens": True}, ValueError,
         "disagrees with pooling_mode_mean_tokens"),
        ({"pooling_mode_max_tokens": 1}, TypeError, "pooling_mode_max_tokens must be True or"),
        ({"include_prompt": "no"}, TypeError, "include_prompt must be True or False"),
        ({"embedding_dimension": 5}, ValueError, "disagree"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        SentencePooling(4, **kwargs)


@pytest.mark.parametrize("dim", [0, -3, 2.0, True, "8"])
def test_bad_dimension(dim):
    with pytest.raises(ValueError, match="word_embedding_dimension must be a positive int"):
        SentencePooling(dim)
    with pytest.raises(TypeError, match="word_embedding_dimension is required"):
        SentencePooling()


def test_unknown_config_keys_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['pooling_mode_median'\]"):
        SentencePooling.from_config({"word_embedding_dimension": 4, "pooling_mode_median": True})
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        SentencePooling.load(tmp_path)


@pytest.mark.parametrize(
    "features, error, match",
    [
        ({"token_embeddings": None}, ValueError, "must hold 'token_embeddings'"),
        ({"token_embeddings": torch.ones(2, 5)}, ValueError, r"floating tensor \(N, L, C\)"),
        ({"token_embeddings": torch.ones(2, 5, 4, dtype=torch.int64)}, TypeError,
         r"token_embeddings'\] must be a floating tensor \(N, L, C\), got dtype torch.int64"),
        ({"token_embeddings": torch.ones(2, 5, 3)}, ValueError,
         "has 3 channels, but word_embedding_dimension is 4"),
        ({"attention_mask": torch.ones(2, 6)}, ValueError,
         r"attention_mask'\] must have shape \(N, L\) = \(2, 5\)"),
        ({"attention_mask": torch.full((2, 5), 2)}, ValueError, "must hold 0 .* and 1"),
        ({"attention_mask": [[1] * 5] * 2}, TypeError, "attention_mask'] must be a torch.Tensor"),
        ({"prompt_length": -1}, ValueError, r"prompt_length'\] must be >= 0"),
        ({"prompt_length": 1.5}, TypeError, r"prompt_length'\] must be an int"),
        ({"prompt_length": torch.ones(3, dtype=torch.int64)}, ValueError, "one value per"),
        ({"token_weights_sum": torch.ones(3)}, ValueError, r"token_weights_sum'\] must be"),
        ({"cls_token_embeddings": torch.ones(2, 3)}, ValueError, "cls_token_embeddings"),
        ({"cu_seq_lens_q": torch.tensor([0, 5])}, ValueError, "unpadded"),
    ],
)
def test_bad_features_are_named(features, error, match):
    pool = SentencePooling(4, pooling_mode=("cls", "mean"), include_prompt=False)
    full = {"token_embeddings": torch.ones(2, 5, 4), **features}
    full = {k: v for k, v in full.items() if v is not None}
    with pytest.raises(error, match=match):
        pool(full)


# -- against sentence-transformers ------------------------------------------------------------


def _st_pooling():
    st = pytest.importorskip("sentence_transformers")
    from sentence_transformers.models import Pooling as STPooling

    return st, STPooling


def _st_from(ours, STPooling):
    with warnings.catch_warnings():  # the flag format is deprecated in newer versions
        warnings.simplefilter("ignore")
        return STPooling(**ours.get_config_dict())


@pytest.mark.parametrize("side", PADDINGS)
def test_matches_sentence_transformers_pooling(side):
    st, STPooling = _st_pooling()
    before_6 = int(st.__version__.split(".")[0]) < 6
    if side == "left" and before_6:
        pytest.skip("sentence-transformers < 6 takes cls and weightedmean from position 0 "
                    "whatever the padding")
    # no sentence left empty (by padding or by its prompt): there its max is -inf and its cls
    # the token at position 0, where every mode here gives 0
    lengths = (5, 2, 7, 3, 2)
    x, mask = make_batch(side, lengths=lengths, c=4, dtype=torch.float32)
    for modes in MODE_SETS:
        for include_prompt, extra in ((True, {}), (False, {"prompt_length": 1})):
            if not include_prompt and (len(modes) > 2 or before_6 and "cls" in modes):
                continue  # (before 6, cls is position 0 even after a prompt)
            ours = SentencePooling(4, pooling_mode=modes, include_prompt=include_prompt)
            theirs = _st_from(ours, STPooling)
            want = run(theirs, x.clone(), mask.clone(), **extra)
            got = run(ours, x, mask, **extra)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, modes=modes, e=extra: f"{modes} {e}: {m}")


@pytest.mark.parametrize("side", PADDINGS)
def test_token_weights_sum_and_cls_token_embeddings_as_sentence_transformers(side):
    st, STPooling = _st_pooling()
    if side == "left" and int(st.__version__.split(".")[0]) < 6:
        pytest.skip("sentence-transformers < 6 weighs tokens from position 0")
    x, mask = make_batch(side, lengths=(5, 2, 7), c=4, dtype=torch.float32)
    extra = {"token_weights_sum": torch.tensor([2.5, 0.5, 9.0]),
             "cls_token_embeddings": torch.randn(3, 4)}
    ours = SentencePooling(4, pooling_mode=("cls", "mean", "mean_sqrt_len_tokens",
                                            "weightedmean"))
    want = run(_st_from(ours, STPooling), x.clone(), mask.clone(), **extra)
    torch.testing.assert_close(run(ours, x, mask, **extra), want, rtol=1e-5, atol=1e-6)


def test_a_custom_order_is_read_by_sentence_transformers_6(tmp_path):
    st, STPooling = _st_pooling()
    if int(st.__version__.split(".")[0]) < 6:
        pytest.skip("sentence-transformers < 6 reads no pooling_mode list (docs/coming-from.md)")
    for modes in (("mean", "cls"), ("lasttoken", "max", "weightedmean")):
        SentencePooling(4, pooling_mode=modes).save(tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = STPooling.load(str(tmp_path))
        assert tuple(theirs.get_config_dict()["pooling_mode"]) == modes


def test_config_json_is_read_by_sentence_transformers_and_back(tmp_path):
    _, STPooling = _st_pooling()
    for modes in (("mean",), ("cls", "max"), MODES):
        ours = SentencePooling(12, pooling_mode=modes, include_prompt=False)
        ours.save(tmp_path / "ours")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = STPooling.load(str(tmp_path / "ours"))
        assert theirs.get_config_dict()["include_prompt"] is False
        (tmp_path / "theirs").mkdir(exist_ok=True)
        theirs.save(str(tmp_path / "theirs"))
        back = SentencePooling.load(tmp_path / "theirs")
        assert back.modes == modes and back.word_embedding_dimension == 12
        assert not back.include_prompt
