"""Query-based attention pooling: latent queries (MAP), SimPool and CLIP-style pooling, one
contract for masks, layouts, ranks and dtypes (``F.scaled_dot_product_attention`` underneath).

>>> import torch, globalpool as gp
>>> gp.LatentAttentionPool(64, num_heads=4)(torch.randn(2, 64, 7, 7)).shape
torch.Size([2, 64])
"""

from globalpool.attention.clip import CLIPAttentionPool
from globalpool.attention.latent import LatentAttentionPool
from globalpool.attention.simpool import SimPool

#: The query-based attention pools (what :func:`globalpool.monitor`, the attention maps of
#: :func:`globalpool.class_activation_maps` and :func:`globalpool.swap_pool` recognise).
QUERY_POOLS = (LatentAttentionPool, SimPool, CLIPAttentionPool)

__all__ = ["QUERY_POOLS", "CLIPAttentionPool", "LatentAttentionPool", "SimPool"]
