"""Sinkhorn-style alternating row / column normalisation (SinkGD's multi-normalisation)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sinkhorn_normalize(G: Tensor, iters: int = 5, eps: float = 1e-8) -> Tensor:
    """Alternately rescale rows to ℓ2 norm √n and columns to ℓ2 norm √m (rows first), ``iters`` times.

    For an m×n matrix (or a batch …×m×n) the fixed point satisfies ``X ⊙ X = diag(u)(G ⊙ G)diag(w)``
    with row sums n and column sums m (the Sinkhorn scaling of ``G ⊙ G``); signs are preserved, the
    result does not depend on the scale of ``G``, and zero rows/columns stay zero (norms clamped by
    ``eps``).  arXiv 2502.06742.
    """
    m, n = G.shape[-2], G.shape[-1]
    X = G
    for _ in range(iters):
        X = X * (math.sqrt(n) / torch.linalg.vector_norm(X, dim=-1, keepdim=True).clamp_min(eps))
        X = X * (math.sqrt(m) / torch.linalg.vector_norm(X, dim=-2, keepdim=True).clamp_min(eps))
    return X
