"""Matrix functions via coupled Newton–Schulz: inverse square roots, whitening, soft spectral clipping."""
from __future__ import annotations

import torch
from torch import Tensor

from .shapes import from_wide, to_wide


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
    X, tall = to_wide(Z.float())
    return from_wide(inverse_sqrt(X @ X.mT, steps) @ X, tall).to(Z.dtype)


def soft_spectral_clip(U: Tensor, c: float, steps: int = 10, dtype: torch.dtype = torch.float32) -> Tensor:
    """σ ↦ σ/√(1 + σ²/c²) on every singular value: ``(I + U Uᵀ/c²)^{-1/2} U`` (SPECTRA, arXiv 2603.14315).

    The output's singular values stay below ``c``; σ ≪ c is left almost unchanged.  0-/1-D tensors follow
    the official code (mlolab/llm-spectral-clipping ``post_process.py``): unchanged when ``‖U‖ ≤ c``,
    else rescaled by ``1/√(1 + (‖U‖/c)²)`` (discontinuous at ‖U‖ = c, where the norm drops from c to c/√2;
    the paper's vector map could not be read here).
    """
    if U.dim() < 2:
        norm = torch.linalg.vector_norm(U)
        return torch.where(norm <= c, U, U / (1 + (norm / c) ** 2).sqrt())
    X, tall = to_wide(U.to(dtype))
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    return from_wide(inverse_sqrt(eye + X @ X.mT / c ** 2, steps) @ X, tall).to(U.dtype)
