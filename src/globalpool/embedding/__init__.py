"""Embedding heads for retrieval and metric learning: a pooled, projected, optionally BN-necked,
whitened and L2-normalised descriptor, PCA whitening fitted from descriptors, and multi-scale
extraction.

>>> import torch, globalpool as gp
>>> head = gp.EmbeddingHead(32, "gem", dim=16).eval()
>>> head(torch.randn(2, 32, 7, 7)).shape
torch.Size([2, 16])
"""

from globalpool.embedding.head import BNNeckOutput, EmbeddingHead
from globalpool.embedding.multiscale import extract_multiscale
from globalpool.embedding.whitening import Whitening, fit_whitening

__all__ = ["BNNeckOutput", "EmbeddingHead", "Whitening", "extract_multiscale", "fit_whitening"]
