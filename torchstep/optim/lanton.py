"""LANTON (our reconstruction of arXiv 2510.14009): LMO steps with noise-adaptive layerwise learning rates.

No public code exists and the paper's algorithm box could not be read from this machine; the class
docstring states which parts are confirmed and which are our choices.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..ops.shapes import as_matrix
from ._base import check_choice, check_range, step_of
from .matrix import (MatrixRule, certified_spectral_scale, check_newton_schulz, init_momentum, momentum_direction,
                     newton_schulz_lmo, sign_lmo, zeros_scalar)
from .muon import Muon


def _init(p, state, group):
    init_momentum(p, state, group)
    state["noise_sq"] = zeros_scalar(p)
    if group["noise_estimator"] == "previous_gradient":
        state["previous_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def dual_norm(d: Tensor, group) -> Tensor:
    """The dual norm of the group's LMO: ℓ1 for ``sign``; √(d_out/d_in)·nuclear for ``spectral``
    (or its SVD-free upper bound √min(m, n)·‖D‖_F with ``noise_norm="frobenius"``)."""
    if group["lmo"] == "sign":
        return d.abs().sum()
    d = as_matrix(d)
    m, n = d.shape
    if group["noise_norm"] == "nuclear":
        nuclear = torch.linalg.svdvals(d).sum()
    else:
        nuclear = math.sqrt(min(m, n)) * torch.linalg.matrix_norm(d)
    return math.sqrt(m / n) * nuclear


def _direction(grad, state, group):
    """Update the noise EMA from this step's noise sample, then the momentum (the paper's B)."""
    t, beta1 = step_of(state), group["momentum"]
    if group["noise_estimator"] == "previous_gradient":
        if "previous_grad" not in state:     # a checkpoint written with the innovation estimator
            state["previous_grad"] = torch.zeros_like(grad)
        previous = state["previous_grad"]
        sample = grad - previous if t >= 2 else None
        previous.copy_(grad)
    else:   # innovation against the bias-corrected momentum of the previous step
        sample = grad - state["momentum_buffer"] / (1 - beta1 ** (t - 1)) if t >= 2 else None
    if sample is not None:
        noise = state["noise_sq"]
        # saturate instead of overflowing: ‖D‖²_* of a huge (still finite) gradient can exceed the float range
        squared = dual_norm(sample, group).square().to(noise.dtype).clamp_max(torch.finfo(noise.dtype).max)
        noise.lerp_(squared, 1 - group["beta2"])
    return momentum_direction(grad, state, group)


def _lmo(matrices, group):
    return sign_lmo(matrices, group) if group["lmo"] == "sign" else newton_schulz_lmo(matrices, group)


def _scale(u, group) -> float:
    return 1.0 if group["lmo"] == "sign" else certified_spectral_scale(u, group)


def layer_factors(states, group) -> list:
    """``min(1, √(mean_j H_j / H_ℓ))`` per tensor; a tensor with zero noise (or all zero) keeps the group lr."""
    if not states or step_of(states[0]) < 2 or len(states) < 2:
        return [None] * len(states)
    noise = torch.stack([s["noise_sq"] for s in states])     # bias correction cancels in the ratio
    # noise is finite (saturated, see _direction), so a mean that overflows gives inf/finite → factor 1, never NaN
    ratio = (noise.mean() / noise.clamp_min(torch.finfo(noise.dtype).tiny)).sqrt().clamp_max(1.0)
    return list(torch.where(noise > 0, ratio, torch.ones_like(ratio)).unbind())


def _check(group):
    check_newton_schulz(group)
    check_range("beta2", group["beta2"], 0.0, 1.0, hi_open=True)
    check_choice("lmo", group["lmo"], ("spectral", "sign"))
    check_choice("noise_norm", group["noise_norm"], ("nuclear", "frobenius"))
    check_choice("noise_estimator", group["noise_estimator"], ("previous_gradient", "innovation"))


LANTON = MatrixRule("lanton", lmo=_lmo, direction=_direction, init=_init, layer_factors=layer_factors, scale=_scale,
                    check=_check, accepts_vectors=lambda group: group["lmo"] == "sign")


class Lanton(Muon):
    r"""LANTON (our reconstruction): LMO steps with noise-adaptive layerwise learning rates per group.

    Each tensor ℓ of a group (a "layer") keeps the paper's momentum and a running estimate of its
    gradient noise measured in the dual norm of the group's LMO; the group lr is then shared out so
    that noisier layers take proportionally smaller steps:

    .. math::
        D_\ell &= G_{\ell,t} - G_{\ell,t-1} \quad(\text{``previous_gradient'', default; } t\ge 2)
            \quad\text{or}\quad G_{\ell,t} - \hat B_{\ell,t-1} \quad(\text{``innovation''}) \\
        H_\ell &\leftarrow \beta_2 H_\ell + (1-\beta_2)\,\|D_\ell\|_*^2 \\
        B_\ell &\leftarrow \beta_1 B_\ell + (1-\beta_1) G_\ell \\
        \eta_\ell &= \eta\,\min\Big(1,\ \sqrt{\mathrm{mean}_j H_j / H_\ell}\Big)
            \in [\eta/\sqrt L,\ \eta] \quad(\eta \text{ at } t = 1,\ \text{and where } H_\ell = 0) \\
        W_\ell &\leftarrow (1-\eta\lambda) W_\ell + \eta_\ell\,\mathrm{LMO}(B_\ell)

    LMOs (``lmo`` group key) and their dual norms:

    - ``"spectral"`` (hidden matrices; RMS→RMS operator norm): LMO = −√(d_out/d_in)·NS(B) / ν,
      ‖D‖_* = √(d_out/d_in)·‖D‖_nuclear (any ``ndim >= 2`` tensor as out × prod(rest));
    - ``"sign"`` (embeddings / head / any shape; ℓ1→ℓ∞ operator norm = max entry): LMO = −sign(B),
      ‖D‖_* = ‖D‖₁.

    Args:
        params: as :class:`Muon`.
        lr: the group lr η, an upper bound of every layer's lr (default 0.02).
        momentum: β1 (default 0.95).
        beta2: EMA of the squared noise norms (default 0.99).
        lmo: ``"spectral"`` (default) or ``"sign"``.
        noise_norm: ``"nuclear"`` (default; one SVD per matrix per step) or ``"frobenius"`` (an SVD-free
            upper bound √min(m, n)·‖D‖_F).
        noise_estimator: ``"previous_gradient"`` (default; one extra buffer) or ``"innovation"`` (no buffer).
        nesterov: default False (the paper's momentum).
        **kwargs: :class:`Muon`'s other arguments (NS settings, weight decay, fallback AdamW, policies).

    Confirmed from the paper (abstract and a public summary of Algorithm 1, arXiv 2510.14009): momentum
    ``B = β1 B + (1-β1) G``; a per-layer noise estimate in the dual norm of the chosen LMO, computed on
    the fly; time-varying layerwise lrs within each group on top of an LMO optimizer; RMS→RMS for hidden
    layers and ℓ1→ℓ∞ for embedding/head; the practical estimator H ← β2·H + (1−β2)·‖G_t − G_{t−1}‖²_*
    (previous gradient) as far as that secondary summary shows — hence the default.  **Unverified / our
    choices** (the algorithm box could not be read here): the map ``min(1, √(mean_j H_j / H_ℓ))`` —
    layers noisier than the group's mean noise power are slowed by the ratio of noise levels, the others
    keep the group lr, uniform noise gives plain Muon, no layer is slowed below η/√L, and a layer whose
    noise estimate is exactly 0 (a constant gradient; or every layer so) keeps η instead of freezing;
    the innovation estimator as an alternative; ``ν`` as in :class:`MuonPP`; the defaults.

    With one tensor per group (or equal noise) it is exactly ``Muon(nesterov=False, adjust_lr="spectral_norm")``
    with lr/ν (tested).  Memory: Muon's plus one scalar per tensor, plus one gradient copy per tensor with
    ``noise_estimator="previous_gradient"``.

    FSDP2: the LMO runs on each matrix's owner (:func:`torchstep.optim.matrix.owner_lmo`); ``noise_sq`` is a
    replicated 0-D DTensor.  The ``nuclear`` noise norm goes through DTensor's replicate-only ``svdvals``
    (the noise sample is all-gathered and every rank runs the same SVD — correct, full cost on every rank);
    ``noise_norm="frobenius"`` is one all-reduce.  ``lmo="sign"`` is element-wise but still gathered to
    owners (correct, not free).
    """

    matrix_rule = LANTON

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, beta2: float = 0.99,
                 lmo: str = "spectral", noise_norm: str = "nuclear", noise_estimator: str = "previous_gradient",
                 nesterov: bool = False, **kwargs: Any) -> None:
        self._rule_hyperparameters = dict(beta2=beta2, lmo=lmo, noise_norm=noise_norm, noise_estimator=noise_estimator)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, **kwargs)
