"""AdamP and SGDP — remove the radial component of updates to scale-invariant weights."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import required

from ..ops.materialise import materialise
from ..ops.moments import bias_corrections, corrected_root, update_moments_
from ._base import (ElementwiseRule, TorchstepOptimizer, add_scaled_, check_choice, check_range, scalar, step_of,
                    zeros_state)


def project_radial(p: Tensor, grad: Tensor, update: Tensor, delta: float, wd_ratio: float,
                   eps: float, sync_free: bool | None = None) -> tuple[Tensor, Tensor | float]:
    """AdamP/SGDP projection (arXiv 2006.08217, Alg. 1–2).

    Views tried in order: per output channel (``p.view(p.shape[0], -1)``), then the whole
    tensor.  The first view whose max |cos(g_i, θ_i)| is below ``delta/sqrt(row length)``
    gets ``u_i ← u_i − θ̂_i⟨θ̂_i, u_i⟩`` and the weight-decay factor ``wd_ratio``.
    Returns the update (a new tensor when projected) and the decay multiplier.

    Execution path (chosen by measurement, docs/speed.md): on CPU the trigger is read with a
    Python branch (no device sync exists there) and only the firing view is computed; on
    accelerators (``sync_free``) both views are computed and selected with ``torch.where``, so
    the step never waits on the host.  Both paths are tested to agree.
    """
    if p.dim() <= 1:
        return update, 1.0
    if sync_free is None:   # a compiled step cannot branch on a tensor either
        sync_free = p.device.type != "cpu" or torch.compiler.is_compiling()
    # Row statistics are computed once; the whole-tensor view reuses them (no extra passes).
    # cos = |⟨g,θ⟩| / (max(‖g‖,ε)·max(‖θ‖,ε)) equals F.cosine_similarity's definition.
    rows = p.shape[0]
    pv, gv, uv = p.reshape(rows, -1), grad.reshape(rows, -1), update.reshape(rows, -1)
    g_dot_p = torch.linalg.vecdot(gv, pv, dim=1)
    g_norm, p_norm = torch.linalg.vector_norm(gv, dim=1), torch.linalg.vector_norm(pv, dim=1)
    u_dot_p = torch.linalg.vecdot(uv, pv, dim=1)
    views = (
        (g_dot_p.abs() / (g_norm.clamp_min(eps) * p_norm.clamp_min(eps)), pv.shape[1],
         u_dot_p / (p_norm + eps).square()),
        (g_dot_p.sum().abs() / (g_norm.square().sum().sqrt().clamp_min(eps) *
                                p_norm.square().sum().sqrt().clamp_min(eps)), p.numel(),
         u_dot_p.sum() / (p_norm.square().sum().sqrt() + eps).square()),
    )
    expand = [-1] + [1] * (p.dim() - 1)
    fired_before = torch.zeros((), dtype=torch.bool, device=p.device)
    for cos, length, coef in views:
        fires = materialise(cos.max() < delta / math.sqrt(length))
        coef = materialise(coef)
        # radial part of u along θ̂ = θ/(‖θ‖+ε): θ̂⟨θ̂,u⟩ = θ·⟨θ,u⟩/(‖θ‖+ε)²
        coef = coef.view(expand) if coef.dim() else coef
        if not sync_free:
            if fires:
                return update - p * coef, wd_ratio
            continue
        fires = fires & ~fired_before
        update = update - p * coef * fires
        fired_before = fired_before | fires
    if not sync_free:
        return update, 1.0
    ratio = torch.full((), wd_ratio, dtype=p.dtype, device=p.device)  # exact in p's dtype
    return update, ratio.where(fired_before, 1.0)


def check_projection(group) -> None:
    check_range("delta", group["delta"], 0.0)
    check_range("wd_ratio", group["wd_ratio"], 0.0, 1.0)


def adamp_plan(state, group) -> dict:
    t, lr = step_of(state), scalar(group["lr"])
    beta1, beta2 = group["betas"]
    return dict(lr=lr, step=-lr / bias_corrections(t, beta1, beta2)[0], root_bc2=math.sqrt(1 - beta2 ** t))


def adamp_kernel(p, grad, state, group, c) -> None:
    lr, eps = c["lr"], group["eps"]
    beta1, beta2 = group["betas"]
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2)
    denom = corrected_root(exp_avg_sq, c["root_bc2"], eps)
    if group["nesterov"]:
        update = (beta1 * exp_avg + (1 - beta1) * grad).div_(denom)
    else:
        update = torch.div(exp_avg, denom, out=denom)   # reuse the temporary
    update, ratio = project_radial(p, grad, update, group["delta"], group["wd_ratio"], eps)
    if group["weight_decay"] > 0:
        p.mul_(1 - lr * group["weight_decay"] * ratio)
    add_scaled_(p, update, c["step"])


def sgdp_plan(state, group) -> dict:
    lr = scalar(group["lr"])
    return dict(lr=lr, step=-lr)


def sgdp_kernel(p, grad, state, group, c) -> None:
    lr, mu = c["lr"], group["momentum"]
    buf = state["momentum_buffer"]
    buf.mul_(mu).add_(grad, alpha=1 - group["dampening"])
    update = grad + mu * buf if group["nesterov"] else buf
    update, ratio = project_radial(p, grad, update, group["delta"], group["wd_ratio"], group["eps"])
    if group["compat"] == "official" and not group["nesterov"] and update is not buf:
        buf.copy_(update)
    if group["weight_decay"] > 0:
        p.mul_(1 - lr * group["weight_decay"] * ratio / (1 - mu))
    add_scaled_(p, update, c["step"])


def _check_sgdp(group) -> None:
    check_projection(group)
    check_range("dampening", group["dampening"], 0.0, 1.0)
    check_choice("compat", group["compat"], ("paper", "official"))


ADAMP = ElementwiseRule("adamp", plan=adamp_plan, kernel=adamp_kernel, init=zeros_state("exp_avg", "exp_avg_sq"),
                        check=check_projection)
SGDP_RULE = ElementwiseRule("sgdp", plan=sgdp_plan, kernel=sgdp_kernel, init=zeros_state("momentum_buffer"),
                            check=_check_sgdp)


class AdamP(TorchstepOptimizer):
    r"""AdamP: Adam whose update to scale-invariant weights has its radial part removed.

    .. math::
        d &= \sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon,\quad u = m_t/d
            \ (\text{nesterov: } u = (\beta_1 m_t + (1-\beta_1) g)/d) \\
        u &\leftarrow \Pi(u)\ \text{and } r = \text{wd\_ratio if the projection fires, else } 1 \\
        \theta &\leftarrow \theta(1 - \eta\lambda r) - \frac{\eta}{1-\beta_1^t} u

    ``Π`` removes ``θ̂_i⟨θ̂_i, u_i⟩`` per output channel (or for the whole tensor) when
    ``max_i |cos(g_i, θ_i)| < δ/√dim``; only tensors with ``ndim > 1`` are projected.
    Args:
        params: parameters or groups.
        lr: η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε after the bias-corrected square root (torch flavour) and in the cosines (default 1e-8).
        weight_decay: decoupled λ, times ``wd_ratio`` where the projection fires (default 0).
        delta: δ of the projection trigger (default 0.1).
        wd_ratio: decay multiplier for projected tensors (default 0.1).
        nesterov: Nesterov momentum in the update (default False).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.

    Defaults are the paper's / official code's.

    Paper: Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", ICLR 2021, arXiv 2006.08217.  Official code: clovaai/AdamP
    (pip ``adamp`` 0.3.0) — parity tested.  Deviation: the projection trigger is evaluated
    without a host sync (``torch.where``), numerically identical.  Memory: 2 buffers.
    """

    rule = ADAMP

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1,
                 wd_ratio: float = 0.1, nesterov: bool = False, *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      delta=delta, wd_ratio=wd_ratio, nesterov=nesterov,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))


class SGDP(TorchstepOptimizer):
    r"""SGDP: SGD with momentum whose update to scale-invariant weights is projected.

    .. math::
        b &\leftarrow \mu b + (1-\text{dampening})\, g,\quad
            u = g + \mu b\ (\text{nesterov})\ \text{else}\ b \\
        u &\leftarrow \Pi(u),\quad r = \text{wd\_ratio if projected else } 1 \\
        \theta &\leftarrow \theta\,(1 - \eta\lambda r/(1-\mu)) - \eta u

    ``Π`` as in :class:`AdamP`.

    Args:
        params: parameters or groups.
        lr: η, required (as torch SGD).
        momentum: μ (default 0).
        dampening: (default 0).
        weight_decay: decoupled λ, scaled by 1/(1−μ) and ``wd_ratio`` where projected (default 0).
        nesterov: (default False).
        eps, delta, wd_ratio: as :class:`AdamP` (defaults 1e-8, 0.1, 0.1).
        compat: ``"paper"`` (default) or ``"official"`` (below).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.
    Paper: arXiv 2006.08217; official code clovaai/AdamP (pip ``adamp``) — parity tested.

    Deviation (``compat``): without Nesterov the official code projects ``u = b`` **in place**,
    so the momentum buffer itself loses its radial part whenever the projection fires.  The
    paper's algorithm keeps ``b`` unprojected — our default ``compat="paper"``;
    ``compat="official"`` reproduces the package bit for bit.  Memory: 1 buffer.
    """

    rule = SGDP_RULE

    def __init__(self, params: Any, lr: float = required, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
                 eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1, compat: str = "paper", *,
                 maximize: bool = False, nonfinite: str = "skip", compile: bool | str = False) -> None:
        if lr is required:
            raise ValueError("Invalid lr: required (SGDP has no default learning rate)")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, eps=eps,
                                      delta=delta, wd_ratio=wd_ratio, compat=compat, maximize=maximize,
                                      nonfinite=nonfinite, compile=compile))
