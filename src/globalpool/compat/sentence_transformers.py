"""Sentence-transformers' ``Pooling`` module, on globalpool's masked kinds.

:class:`SentencePooling` (also importable as ``Pooling`` from this module) takes the same
constructor arguments, reads and writes the same ``features`` dict and saves the same
``config.json`` as ``sentence_transformers.models.Pooling``, and computes every mode with
:func:`globalpool.pool`:

============================ =================== ==========================================
sentence-transformers mode   globalpool kind     what it computes
============================ =================== ==========================================
``cls``                      ``first``           the first real token
``max``                      ``max``             the maximum over real tokens
``mean``                     ``avg``             the mean over real tokens
``mean_sqrt_len_tokens``     ``mean_sqrt_len``   the sum over real tokens / sqrt(their number)
``weightedmean``             ``weightedmean``    the mean weighted 1, 2, ..., k over real tokens
``lasttoken``                ``last``            the last real token
============================ =================== ==========================================

It is right for left and right padding alike, a padded token never reaches the output or the
gradient (even if it holds NaN), and a sentence with no real token pools to 0 in every mode.

>>> import torch
>>> from globalpool.compat.sentence_transformers import Pooling
>>> pool = Pooling(4, pooling_mode="mean")
>>> tokens = torch.ones(2, 3, 4)
>>> features = {"token_embeddings": tokens, "attention_mask": torch.tensor([[1, 1, 0], [0, 1, 1]])}
>>> pool(features)["sentence_embedding"].shape
torch.Size([2, 4])
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from globalpool.compose import rank_weights
from globalpool.functional import pool

__all__ = ["MODES", "Pooling", "SentencePooling"]

#: The pooling modes, in the order sentence-transformers concatenates them when they are chosen
#: with the ``pooling_mode_*`` flags.
MODES: tuple[str, ...] = (
    "cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken",
)

# each mode's flag, in the concatenation order of MODES
_FLAGS: dict[str, str] = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

# the keys of config.json, in the order sentence-transformers writes them
_CONFIG_ORDER: tuple[str, ...] = (
    "word_embedding_dimension",
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
    "include_prompt",
)

# every key config.json may hold: the flags format and the newer one (embedding_dimension and
# pooling_mode as a name or a list of names)
_CONFIG_KEYS: frozenset[str] = frozenset(
    {*_CONFIG_ORDER, "embedding_dimension", "pooling_mode"}
)

_KIND: dict[str, str] = {
    "cls": "first",
    "max": "max",
    "mean": "avg",
    "mean_sqrt_len_tokens": "mean_sqrt_len",
    "weightedmean": "weightedmean",
    "lasttoken": "last",
}

CONFIG_NAME = "config.json"


class SentencePooling(nn.Module):
    """Sentence embeddings from token embeddings, as sentence-transformers' ``Pooling`` makes
    them, with every mode right for left and right padding.

    Args:
        word_embedding_dimension: ``C``, the size of each token embedding (``embedding_dimension``
            is accepted as its other name).
        pooling_mode: a mode name (see :data:`MODES`) or a sequence of them, concatenated in the
            order given. Takes precedence over the flags, which must then agree with it.
        pooling_mode_cls_token, pooling_mode_max_tokens, pooling_mode_mean_tokens,
            pooling_mode_mean_sqrt_len_tokens, pooling_mode_weightedmean_tokens,
            pooling_mode_lasttoken: choose modes by flag (keyword only); the chosen ones are
            concatenated in the order of :data:`MODES`. With neither ``pooling_mode`` nor any
            flag the mode is ``mean``.
        include_prompt: if False, the first ``features["prompt_length"]`` real tokens of each
            sentence are left out of every mode (keyword only).

    Shape:
        ``features["token_embeddings"]`` ``(N, L, C)``, ``features["attention_mask"]``
        ``(N, L)`` of 0/1 or bool (optional: all tokens real); writes
        ``features["sentence_embedding"]`` ``(N, len(modes) * C)`` (0 for a sentence with no
        real token, L == 0 included). The mask's values are checked in eager calls, not
        under ``torch.compile``.

    >>> import torch, globalpool as gp
    >>> pool = gp.SentencePooling(2, pooling_mode=("cls", "lasttoken"))
    >>> tokens = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [3.0, 4.0]]])   # left-padded
    >>> pool({"token_embeddings": tokens, "attention_mask": torch.tensor([[0, 1, 1]])})[
    ...     "sentence_embedding"]
    tensor([[1., 2., 3., 4.]])
    >>> pool.get_sentence_embedding_dimension()
    4
    """

    def __init__(
        self,
        word_embedding_dimension: int | None = None,
        pooling_mode: str | Sequence[str] | None = None,
        *,
        pooling_mode_cls_token: bool | None = None,
        pooling_mode_max_tokens: bool | None = None,
        pooling_mode_mean_tokens: bool | None = None,
        pooling_mode_mean_sqrt_len_tokens: bool | None = None,
        pooling_mode_weightedmean_tokens: bool | None = None,
        pooling_mode_lasttoken: bool | None = None,
        include_prompt: bool = True,
        embedding_dimension: int | None = None,
    ) -> None:
        super().__init__()
        flags = {
            "pooling_mode_cls_token": pooling_mode_cls_token,
            "pooling_mode_max_tokens": pooling_mode_max_tokens,
            "pooling_mode_mean_tokens": pooling_mode_mean_tokens,
            "pooling_mode_mean_sqrt_len_tokens": pooling_mode_mean_sqrt_len_tokens,
            "pooling_mode_weightedmean_tokens": pooling_mode_weightedmean_tokens,
            "pooling_mode_lasttoken": pooling_mode_lasttoken,
        }
        self.word_embedding_dimension = _dimension(word_embedding_dimension, embedding_dimension)
        self.modes: tuple[str, ...] = _modes(pooling_mode, flags)
        _check_bool("include_prompt", include_prompt)
        self.include_prompt = include_prompt
        self.pooling_output_dimension = len(self.modes) * self.word_embedding_dimension

    @property
    def pooling_mode(self) -> str | tuple[str, ...]:
        """The mode name, or the tuple of names when there are several."""
        return self.modes[0] if len(self.modes) == 1 else self.modes

    def get_sentence_embedding_dimension(self) -> int:
        """The size of ``sentence_embedding``: ``len(modes) * word_embedding_dimension``."""
        return self.pooling_output_dimension

    get_embedding_dimension = get_sentence_embedding_dimension

    def forward(self, features: dict[str, Any]) -> dict[str, Any]:
        """Pool ``features["token_embeddings"]`` into ``features["sentence_embedding"]``.

        Reads ``attention_mask`` (optional), ``prompt_length`` (when ``include_prompt`` is
        False: an int, or an integer tensor of one value or one per sentence),
        ``token_weights_sum`` (optional ``(N,)``: the divisor of ``mean``,
        ``mean_sqrt_len_tokens`` and ``weightedmean``, as a word-weighting module before
        this one sets it) and ``cls_token_embeddings`` (optional ``(N, C)``: taken as the
        ``cls`` mode's output).

        Returns:
            ``features``, with ``sentence_embedding`` ``(N, len(modes) * C)`` added.
        """
        if not isinstance(features, dict):
            raise TypeError(f"features must be a dict of tensors, got {type(features).__name__}")
        if "cu_seq_lens_q" in features:
            raise ValueError(
                "features['cu_seq_lens_q'] is set: unpadded (flattened) batches are not "
                "supported; pass padded token_embeddings (N, L, C) with an attention_mask"
            )
        x = self._token_embeddings(features)
        mask = _attention_mask(features, x)
        if x.shape[1] == 0:  # no token at all: every sentence is empty and pools to 0
            x = torch.cat([x, x.new_zeros((x.shape[0], 1, x.shape[2]))], dim=1)
            mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        kept = mask
        if not self.include_prompt and "prompt_length" in features:
            full = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                            device=x.device)
            kept = _without_prompt(full, _prompt_length(features["prompt_length"], x))
        weights_sum = _token_weights_sum(features, x)
        parts = [self._pool_mode(mode, x, mask, kept, weights_sum, features)
                 for mode in self.modes]
        features["sentence_embedding"] = torch.cat(parts, dim=-1)
        return features

    def _token_embeddings(self, features: dict[str, Any]) -> torch.Tensor:
        if "token_embeddings" not in features:
            raise ValueError(
                f"features must hold 'token_embeddings' (N, L, C), got keys {sorted(features)}"
            )
        x = features["token_embeddings"]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            what = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise TypeError(
                f"features['token_embeddings'] must be a floating tensor (N, L, C), got {what}"
            )
        if x.ndim != 3:
            raise ValueError(
                f"features['token_embeddings'] must be a floating tensor (N, L, C), got shape "
                f"{tuple(x.shape)}"
            )
        if x.shape[-1] != self.word_embedding_dimension:
            raise ValueError(
                f"features['token_embeddings'] has {x.shape[-1]} channels, but "
                f"word_embedding_dimension is {self.word_embedding_dimension}"
            )
        return x

    def _pool_mode(
        self,
        mode: str,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        kept: torch.Tensor | None,
        weights_sum: torch.Tensor | None,
        features: dict[str, Any],
    ) -> torch.Tensor:
        if mode == "cls" and "cls_token_embeddings" in features:
            return _cls_token_embeddings(features, x)
        prompt_left_out = kept is not mask
        if mode == "weightedmean" and (prompt_left_out or weights_sum is not None):
            # the tokens keep the weights of their rank in the whole sentence, prompt included
            real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool,
                                                            device=x.device)
            w = torch.where(kept, rank_weights(real, _accumulation(x.dtype)), 0.0)
            if weights_sum is None:
                return pool(x, "attention", layout="channels_last", mask=kept, weights=w)
            # sum(w x) / token_weights_sum, the weighted mean times sum(w)
            y = pool(x.to(w.dtype), "attention", layout="channels_last", mask=kept, weights=w)
            return _divided(y * w.sum(1, keepdim=True), weights_sum, x, False)
        if mode in ("mean", "mean_sqrt_len_tokens") and weights_sum is not None:
            total = pool(x.to(_accumulation(x.dtype)), "sum", layout="channels_last", mask=kept)
            return _divided(total, weights_sum, x, mode == "mean_sqrt_len_tokens")
        return pool(x, _KIND[mode], layout="channels_last", mask=kept)

    def get_config_dict(self) -> dict[str, Any]:
        """The configuration, as sentence-transformers writes it in ``config.json``: the
        dimension, one flag per mode and ``include_prompt``; sentence-transformers 5 and 6 read
        it. Modes not in the order of :data:`MODES` (which the flags alone cannot say) add
        ``pooling_mode``, the list of names: sentence-transformers 6 reads that, 5 cannot."""
        config: dict[str, Any] = {"word_embedding_dimension": self.word_embedding_dimension}
        for key in _CONFIG_ORDER[1:-1]:
            config[key] = _FLAGS[key] in self.modes
        config["include_prompt"] = self.include_prompt
        if self.modes != tuple(m for m in MODES if m in self.modes):
            config["pooling_mode"] = list(self.modes)
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SentencePooling:
        """Build one from a configuration dict (:meth:`get_config_dict`'s, or sentence-
        transformers' in either of its formats); an unknown key is an error.

        >>> SentencePooling.from_config({"embedding_dimension": 8, "pooling_mode": "max"})
        SentencePooling({'word_embedding_dimension': 8, 'pooling_mode_cls_token': False, \
'pooling_mode_mean_tokens': False, 'pooling_mode_max_tokens': True, \
'pooling_mode_mean_sqrt_len_tokens': False, 'pooling_mode_weightedmean_tokens': False, \
'pooling_mode_lasttoken': False, 'include_prompt': True})
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        unknown = sorted(set(config) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"config holds unknown keys {unknown}; expected keys among {sorted(_CONFIG_KEYS)}"
            )
        return cls(**config)

    def save(self, output_path: str | os.PathLike) -> None:
        """Write ``config.json`` into the directory ``output_path`` (made if missing), in
        sentence-transformers' format: its ``Pooling.load`` reads it (for modes not in the order
        of :data:`MODES`, sentence-transformers 6 only; see :meth:`get_config_dict`), and so
        does :meth:`load`.
        """
        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(self.get_config_dict(), f, indent=4)

    @classmethod
    def load(cls, input_path: str | os.PathLike) -> SentencePooling:
        """Read ``config.json`` from the directory ``input_path``: one written by :meth:`save`
        or by sentence-transformers (a model's ``1_Pooling`` folder).

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     SentencePooling(8, "cls").save(folder)
        ...     SentencePooling.load(folder).pooling_mode
        'cls'
        """
        path = os.path.join(input_path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input_path {str(input_path)!r} holds no {CONFIG_NAME}")
        with open(path, encoding="utf-8") as f:
            return cls.from_config(json.load(f))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config_dict()})"


def _flag_property(mode: str) -> property:
    return property(lambda self: mode in self.modes, doc=f"Whether the {mode!r} mode is used.")


# sentence-transformers' attributes pooling_mode_cls_token, ..., read-only
for _flag, _mode in _FLAGS.items():
    setattr(SentencePooling, _flag, _flag_property(_mode))
del _flag, _mode

#: sentence-transformers' name for it.
Pooling = SentencePooling


# -- argument checks --------------------------------------------------------------------------


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def _dimension(word_embedding_dimension: Any, embedding_dimension: Any) -> int:
    given = {k: v for k, v in (("word_embedding_dimension", word_embedding_dimension),
                               ("embedding_dimension", embedding_dimension)) if v is not None}
    if not given:
        raise TypeError("word_embedding_dimension is required: the size C of a token embedding")
    if len(given) == 2 and word_embedding_dimension != embedding_dimension:
        raise ValueError(
            f"word_embedding_dimension ({word_embedding_dimension!r}) and embedding_dimension "
            f"({embedding_dimension!r}) are the same setting and disagree"
        )
    name, value = next(iter(given.items()))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _modes(pooling_mode: Any, flags: dict[str, Any]) -> tuple[str, ...]:
    given = {name: value for name, value in flags.items() if value is not None}
    for name, value in given.items():
        _check_bool(name, value)
    if pooling_mode is None:
        if not given:
            return ("mean",)
        modes = tuple(mode for name, mode in _FLAGS.items() if given.get(name))
        if not modes:
            raise ValueError(
                "no pooling mode selected: every pooling_mode_* flag given is False; set one to "
                f"True or pass pooling_mode (one of {MODES})"
            )
        return modes
    names = [pooling_mode] if isinstance(pooling_mode, str) else pooling_mode
    if not isinstance(names, Sequence) or not names:
        raise ValueError(
            f"pooling_mode must be a mode name or a non-empty sequence of them, among {MODES}; "
            f"got {pooling_mode!r}"
        )
    modes = tuple(m.lower() if isinstance(m, str) else m for m in names)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"pooling_mode must be among {MODES}, got {m!r}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"pooling_mode names a mode twice: {pooling_mode!r}")
    disagree = sorted(name for name, value in given.items() if value != (_FLAGS[name] in modes))
    if disagree:
        raise ValueError(
            f"pooling_mode={pooling_mode!r} disagrees with {', '.join(disagree)}: give one or "
            "the other"
        )
    return modes


def _attention_mask(features: dict[str, Any], x: torch.Tensor) -> torch.Tensor | None:
    """The mask as bool ``(N, L)`` (None: every token real); 0/1 or bool, x's shape and device."""
    mask = features.get("attention_mask")
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"features['attention_mask'] must be a torch.Tensor, got {type(mask).__name__}"
        )
    if tuple(mask.shape) != tuple(x.shape[:2]):
        raise ValueError(
            f"features['attention_mask'] must have shape (N, L) = {tuple(x.shape[:2])} like "
            f"token_embeddings {tuple(x.shape)}, got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(
            f"features['attention_mask'] is on {mask.device}, token_embeddings on {x.device}"
        )
    if mask.dtype == torch.bool:
        return mask
    # a value check reads the mask on the host: skipped while torch.compile records the call
    # (it would break the graph), made in eager calls
    if not torch.compiler.is_compiling() and bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError(
            "features['attention_mask'] must hold 0 (padding) and 1 (real token) only, got "
            f"values {sorted(set(mask.unique().tolist()))[:8]}"
        )
    return mask != 0


def _prompt_length(value: Any, x: torch.Tensor) -> int | torch.Tensor:
    """An int, or a ``(N, 1)`` integer tensor (one value per sentence)."""
    n = x.shape[0]
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(
                f"features['prompt_length'] must be an int or an integer tensor, got dtype "
                f"{value.dtype}"
            )
        if value.numel() == 1:
            value = int(value.reshape(()).item())
        elif tuple(value.shape) == (n,):
            if bool((value < 0).any()):
                raise ValueError(
                    f"features['prompt_length'] must be >= 0, got {value.tolist()}"
                )
            return value.to(x.device).reshape(n, 1)
        else:
            raise ValueError(
                f"features['prompt_length'] must be an int, a one-element tensor or one value "
                f"per sentence ({n},), got shape {tuple(value.shape)}"
            )
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"features['prompt_length'] must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"features['prompt_length'] must be >= 0, got {value}")
    return value


def _without_prompt(mask: torch.Tensor, prompt_length: int | torch.Tensor) -> torch.Tensor:
    """``mask`` less the first ``prompt_length`` real tokens of each row (they follow any left
    padding)."""
    length = mask.shape[1]
    pos = torch.arange(length, device=mask.device)
    first = torch.where(mask, pos, length).amin(1, keepdim=True)
    return mask & (pos >= first + prompt_length)


def _token_weights_sum(features: dict[str, Any], x: torch.Tensor) -> torch.Tensor | None:
    value = features.get("token_weights_sum")
    if value is None:
        return None
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != (x.shape[0],):
        what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(
            f"features['token_weights_sum'] must be a tensor of shape (N,) = ({x.shape[0]},), "
            f"got {what}"
        )
    return value


def _cls_token_embeddings(features: dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    value = features["cls_token_embeddings"]
    want = (x.shape[0], x.shape[2])
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != want:
        what = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"features['cls_token_embeddings'] must have shape {want}, got {what}")
    return value


def _accumulation(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _divided(
    total: torch.Tensor, weights_sum: torch.Tensor, x: torch.Tensor, sqrt: bool
) -> torch.Tensor:
    """``total / token_weights_sum`` (or its square root), the divisor floored at 1e-9 as
    sentence-transformers floors it; in the promoted dtype of x and the weights sum."""
    out_dtype = torch.promote_types(x.dtype, weights_sum.dtype)
    acc = torch.promote_types(_accumulation(x.dtype), weights_sum.dtype)
    den = weights_sum.to(acc).unsqueeze(-1).clamp(min=1e-9)
    return (total.to(acc) / (den.sqrt() if sqrt else den)).to(out_dtype)
