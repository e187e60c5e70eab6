"""globalpool: global pooling for neural networks, every kind behind one contract.

>>> import torch, globalpool as gp
>>> x = torch.randn(8, 64, 7, 7)
>>> gp.pool(x, "gem", p=3.0).shape
torch.Size([8, 64])
>>> "gem" in gp.KINDS and "catavgmax" in gp.KINDS   # every registered kind (a live view)
True
"""

from globalpool import cam, registry
from globalpool.attention import CLIPAttentionPool, LatentAttentionPool, SimPool
from globalpool.cam import class_activation_maps
from globalpool.compat.sentence_transformers import SentencePooling
from globalpool.compat.timm import (
    SelectAdaptivePool,
    SelectAdaptivePool2d,
    create_classifier,
    global_pool_nlc,
)
from globalpool.embedding import (
    BNNeckOutput,
    EmbeddingHead,
    Whitening,
    extract_multiscale,
    fit_whitening,
)
from globalpool.functional import adaptive_pool, output_width, pool
from globalpool.heads import (
    HEADS,
    ClassifierHead,
    FlattenFCHead,
    NiNHead,
    make_head,
    swap_pool,
)
from globalpool.layers import (
    AdaptivePool,
    AttentionPool,
    GeM,
    GlobalPool,
    LSEPool,
    make_pool,
)
from globalpool.learned_pools import LEARNED_POOLS, make_learned_pool
from globalpool.monitor import MonitorStats, monitor
from globalpool.packed import pool_nested, pool_packed
from globalpool.registry import KINDS, KindSpec, Param, register_kind, unregister_kind
from globalpool.segments import pool_segments
from globalpool.warmup import warmup

__version__ = "0.1.0"

__all__ = [
    "HEADS",
    "KINDS",
    "LEARNED_POOLS",
    "KindSpec",
    "Param",
    "AdaptivePool",
    "AttentionPool",
    "BNNeckOutput",
    "CLIPAttentionPool",
    "ClassifierHead",
    "EmbeddingHead",
    "FlattenFCHead",
    "GeM",
    "GlobalPool",
    "LSEPool",
    "LatentAttentionPool",
    "MonitorStats",
    "NiNHead",
    "SelectAdaptivePool",
    "SelectAdaptivePool2d",
    "SentencePooling",
    "SimPool",
    "Whitening",
    "adaptive_pool",
    "cam",
    "class_activation_maps",
    "create_classifier",
    "extract_multiscale",
    "fit_whitening",
    "make_head",
    "make_learned_pool",
    "make_pool",
    "global_pool_nlc",
    "monitor",
    "output_width",
    "pool",
    "pool_nested",
    "pool_packed",
    "pool_segments",
    "register_kind",
    "registry",
    "swap_pool",
    "unregister_kind",
    "warmup",
]
