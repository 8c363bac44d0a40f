"""Matrix functions via coupled Newton–Schulz: inverse square roots, whitening, soft spectral clipping."""
from __future__ import annotations

import torch
from torch import Tensor


def inverse_sqrt(A: Tensor, steps: int = 10) -> Tensor:
    """``A^{-1/2}`` of symmetric positive-definite ``A`` (…, m, m) by the coupled Newton–Schulz iteration.

    ``A`` is first scaled by an upper bound of its top eigenvalue (the smaller of the Gershgorin and
    Frobenius bounds), then ``T = ½(3I − Z Y); Y ← Y T; Z ← T Z`` with ``Y₀ = A/s, Z₀ = I``; ``Z → (A/s)^{-1/2}``.
    Converges for every eigenvalue in (0, s]; small eigenvalues need more steps.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A)
    gershgorin = A.abs().sum(-1).amax(-1)
    frobenius = torch.linalg.matrix_norm(A)
    s = torch.minimum(gershgorin, frobenius).clamp_min(torch.finfo(A.dtype).tiny)[..., None, None]
    Y, Z = A / s, eye.clone()
    for _ in range(steps):
        T = 0.5 * (3 * eye - Z @ Y)
        Y, Z = Y @ T, T @ Z
    return Z / s.sqrt()


def whiten(Z: Tensor, steps: int = 10) -> Tensor:
    """``(Z Zᵀ)^{-1/2} Z`` (= U·Vᵀ of the SVD of ``Z``), computed in fp32 on the wide orientation."""
    X = Z.float()
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    out = inverse_sqrt(X @ X.mT, steps) @ X
    return (out.mT if tall else out).to(Z.dtype)


def soft_spectral_clip(U: Tensor, c: float, steps: int = 10, dtype: torch.dtype = torch.float32) -> Tensor:
    """σ ↦ σ/√(1 + σ²/c²) on every singular value: ``(I + U Uᵀ/c²)^{-1/2} U`` (SPECTRA, arXiv 2603.14315).

    The output's singular values stay below ``c``; σ ≪ c is left almost unchanged.  1-D tensors are
    rescaled by ``1/√(1 + (‖U‖/c)²)``.
    """
    if U.dim() < 2:
        return U / (1 + (torch.linalg.vector_norm(U) / c) ** 2).sqrt()
    X = U.to(dtype)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = X.mT
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    out = inverse_sqrt(eye + X @ X.mT / c ** 2, steps) @ X
    return (out.mT if tall else out).to(U.dtype)
