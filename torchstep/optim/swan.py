"""SWAN: stateless GradNorm + GradWhitening for hidden matrices, AdamW for the rest."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.spectral import whiten
from ._base import check_range
from .hybrid import MatrixHybrid, hybrid_defaults
from .matrix import MatrixRule


def grad_norm(G: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-row standardisation over the input dimension (mean 0, variance 1).

    The std is floored at ``eps·max(1, |mean|)``: a (near-)constant row's centred values are rounding
    residuals of size ulp(mean), which an absolute floor would blow up to ~ulp(mean)/eps."""
    mean = G.mean(-1, keepdim=True)
    floor = mean.abs().clamp_min(1.0).mul_(eps)
    return (G - mean) / torch.maximum(G.std(-1, keepdim=True, correction=0), floor)


def _lmo(matrices, group):
    out = []
    for d in matrices:
        z = grad_norm(d, group["eps"])
        delta = whiten(z, group["ns_steps"])
        if group["rescale"]:   # ΔW ← (‖G̃‖_F/‖ΔW‖_F)·ΔW, G̃ the GradNorm output (0 stays 0)
            norm = torch.linalg.matrix_norm(delta)
            delta = delta * (torch.linalg.matrix_norm(z) / norm.clamp_min(torch.finfo(norm.dtype).tiny))
        out.append(delta)
    return out


def _check(group):
    check_range("ns_steps", group["ns_steps"], 1)
    if not isinstance(group["rescale"], bool):
        raise ValueError(f"Invalid rescale: {group['rescale']!r} (valid range: True or False)")


SWAN_RULE = MatrixRule("swan", lmo=_lmo, check=_check)


class SWAN(MatrixHybrid):
    r"""SWAN: stateless GradNorm + GradWhitening for hidden matrices, AdamW for the rest.

    .. math::
        \tilde G = (G - \bar g\,\mathbf 1^\top) \oslash (s\,\mathbf 1^\top) \ \text{(per-row mean / std over inputs)},\quad
        \Delta = (\tilde G \tilde G^\top)^{-1/2} \tilde G \\
        \Delta \leftarrow \frac{\|\tilde G\|_F}{\|\Delta\|_F}\,\Delta \ (\text{rescale}),\quad
        \theta \leftarrow \theta(1-\eta\lambda) - \eta\,\Delta

    Whitening by the coupled Newton–Schulz inverse square root in fp32
    (:func:`torchstep.ops.spectral.whiten`, ``ns_steps``), so ``Δ ≈ U·Vᵀ`` of ``G̃``.  The paper's optional
    rescale gives the update the Frobenius norm of ``G̃`` (≈ √(mn), RMS 1 per entry): without it the update is
    √max(m, n) smaller (RMS 1/√max(m, n)).  Any ``ndim >= 2`` tensor is treated as its (out, prod(rest)) matrix.

    Args:
        params: parameters or groups (routing as :class:`~torchstep.optim.Muon`).
        lr: η (default 1e-3, used with the rescale).
        ns_steps: inverse-square-root iterations (default 10).
        rescale: the paper's norm-restoring rescale (default True; False: the bare whitened direction,
            this library's behaviour before 2026-12).
        weight_decay: decoupled λ with the base lr (default 0).
        fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay: AdamW fallback (defaults 1e-3,
            (0.9, 0.999), 1e-8, 0).  ``eps`` of GradNorm's std is ``fallback_eps``.
        maximize, nonfinite: the policies of every torchstep optimizer.

    Paper: Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and Whitening Enables Stateless LLM
    Training", ICML 2025, arXiv 2412.13148; no official code — the whitening iteration and its step count
    are our choices; that ``G̃`` in the rescale is the GradNorm output is read from a third-party
    transcription (the paper body could not be read here).  Memory: none for matrices.
    Under FSDP2 each matrix's normalisation runs once, on the whole matrix, on its owner rank
    (:func:`torchstep.optim.matrix.owner_lmo`); under DDP every rank computes every matrix (no split).
    """

    matrix_rule = SWAN_RULE
    grad_norm = staticmethod(grad_norm)

    def __init__(self, params: Any, lr: float = 1e-3, ns_steps: int = 10, rescale: bool = True,
                 weight_decay: float = 0.0, fallback_lr: float = 1e-3,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8,
                 fallback_weight_decay: float = 0.0, *, maximize: bool = False, nonfinite: str = "skip") -> None:
        super().__init__(params, hybrid_defaults(
            self.matrix_rule, fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay, maximize, nonfinite,
            lr=lr, ns_steps=ns_steps, rescale=rescale, weight_decay=weight_decay))
