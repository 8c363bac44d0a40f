"""Input checks shared by the token-level stages (surrogates, aggregation)."""
from __future__ import annotations

from torch import Tensor


def check_token_pair(a: Tensor, b: Tensor, a_name: str, b_name: str) -> None:
    """Two token tensors of one shape, flat ``(N,)`` or padded ``(B, T)``, not empty; ValueError otherwise."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        raise ValueError(f"{a_name} and {b_name} must be tensors")
    if a.shape != b.shape:
        raise ValueError(f"{a_name} shape {tuple(a.shape)} != {b_name} shape {tuple(b.shape)}")
    if a.dim() not in (1, 2):
        raise ValueError(f"{a_name} must be (N,) flat tokens or (B, T) padded, got {a.dim()}-D")
    if a.numel() == 0:
        raise ValueError(f"{a_name} is empty")
