"""SPAM and Stable-SPAM — spike-aware Adam with periodic momentum resets."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.spike import clip_spikes, clip_to_running_max
from ._base import TorchstepOptimizer, check_choice, check_range, decay_, scalar


def _cosine(progress: float) -> float:
    """0.5·(1 + cos(π·progress)): 1 at progress 0, 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _adam_direction(state, grad, t: int, beta1: float, beta2: float, eps: float, eps_inside: bool):
    """Update the moments in place and return (direction, step multiplier) for bias-corrected Adam.

    ``eps_inside`` selects the HF flavour ``(m/(√v+ε))·√bc2/bc1``; otherwise torch's
    ``(m/bc1)/(√v/√bc2 + ε)``.
    """
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** t, 1 - beta2 ** t
    if eps_inside:
        return exp_avg / exp_avg_sq.sqrt().add_(eps), math.sqrt(bc2) / bc1
    return exp_avg / exp_avg_sq.sqrt().div_(math.sqrt(bc2)).add_(eps), 1.0 / bc1


class SPAM(TorchstepOptimizer):
    r"""SPAM: Adam with spike clipping, periodic momentum reset and a post-reset warm-up.

    With ``t`` the parameter's step (1-based), ``ΔT = reset_interval``, ``N = warmup_steps``:

    .. math::
        &\text{if } t \bmod \Delta T = 0:\ m = v = 0 \quad(\text{momentum reset}) \\
        &\text{if } \tau>0,\ t \ge A,\ t \bmod \Delta T \ge A:\
          g_i \leftarrow \mathrm{sign}(g_i)\sqrt{\tau v_i}\ \text{where}\ g_i^2 > \tau v_i \\
        &m, v \leftarrow \text{Adam moments};\quad u = \frac{m}{\sqrt v + \epsilon}\frac{\sqrt{1-\beta_2^{s}}}{1-\beta_1^{s}} \\
        &\theta \leftarrow \theta - \eta\, w_t\, u;\qquad \theta \leftarrow \theta - \eta\lambda\theta \\
        &w_t = 1 - 0.99\cdot\tfrac12\bigl(1+\cos(\pi \min(r,N)/N)\bigr),\ r = t \bmod \Delta T
          \ (w_t = 1 \text{ before the first reset})

    ``τ = threshold`` (spike threshold θ in the paper), ``A = grad_accu_steps``.  The clip uses
    ``v`` from the previous step and acts on a copy of the gradient.  ``s`` is the bias-correction
    step: ``compat="paper"`` (default) restarts it with the moments (``s = t mod ΔT + 1``) so the
    first post-reset step is a normal-size Adam step scaled only by the warm-up;
    ``compat="official"`` keeps counting (``s = t``), as TianjinYellow/SPAM-Optimizer does, which
    shrinks the first post-reset step a further ~0.5×.

    Defaults: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0, threshold=5000,
    reset_interval=500, warmup_steps=150, grad_accu_steps=20`` (paper recipe; note the official
    training script passed its lr warm-up as ``warmup_steps`` — use 150).  ``threshold=0``
    disables clipping, ``reset_interval=0`` disables resets (then SPAM = HF-flavour AdamW with
    decay applied after the step).

    Paper: Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
    ICLR 2025, arXiv 2501.06842.  Official code: TianjinYellow/SPAM-Optimizer (no pip package;
    its quirks are reproduced under ``compat="official"`` and tested at equation level).
    Not implemented: the sparse-momentum ``density`` groups.  Official-code quirks never
    reproduced: clipping ``p.grad`` in place.  Memory: 2 buffers.
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, threshold: float = 5000,
                 reset_interval: int = 500, warmup_steps: int = 150, grad_accu_steps: int = 20,
                 compat: str = "paper", *, maximize: bool = False, nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      threshold=threshold, reset_interval=reset_interval,
                                      warmup_steps=warmup_steps, grad_accu_steps=grad_accu_steps,
                                      compat=compat, maximize=maximize, nonfinite=nonfinite))

    def _validate(self, group):
        super()._validate(group)
        check_range("threshold", group["threshold"], 0.0)
        check_range("reset_interval", group["reset_interval"], 0)
        check_range("warmup_steps", group["warmup_steps"], 0)
        check_range("grad_accu_steps", group["grad_accu_steps"], 0)
        check_choice("compat", group["compat"], ("paper", "official"))

    def _init_state(self, p, state, group):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @staticmethod
    def warmup_factor(t: int, reset_interval: int, warmup_steps: int) -> float:
        """Post-reset learning-rate multiplier: 0.01 at a reset step, 1.0 after ``warmup_steps``."""
        if reset_interval <= 0 or t < reset_interval:
            return 1.0
        r = t % reset_interval
        if warmup_steps <= 0 or r >= warmup_steps:
            return 1.0
        return 1.0 - 0.99 * _cosine(r / warmup_steps)

    def _update(self, p, grad, state, group):
        t = self._advance(state)
        lr, dt, accu = scalar(group["lr"]), group["reset_interval"], group["grad_accu_steps"]
        if dt > 0 and t % dt == 0:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        since_reset = t % dt if dt > 0 and t >= dt else t
        if group["threshold"] > 0 and t >= accu and since_reset >= accu:
            grad = clip_spikes(grad, state["exp_avg_sq"], group["threshold"])
        bc_step = t if group["compat"] == "official" or dt <= 0 or t < dt else since_reset + 1
        direction, scale = _adam_direction(state, grad, bc_step, *group["betas"], group["eps"], eps_inside=True)
        p.add_(direction, alpha=-lr * scale * self.warmup_factor(t, dt, group["warmup_steps"]))
        decay_(p, lr, group["weight_decay"])


class StableSPAM(TorchstepOptimizer):
    r"""Stable-SPAM: AdaClip + AdaGN gradient normalisation, annealed β1, momentum resets.

    Per tensor at step ``t`` with schedule factor ``s_t`` (cosine from 1 to ``eta_min`` over
    ``total_T``; 1 when ``total_T`` is None):

    .. math::
        \theta &\leftarrow \theta(1-\eta\lambda) \\
        M &\leftarrow \gamma_3 M + (1-\gamma_3)\max|g|,\ \hat M = M/(1-\gamma_3^t),\
          g_i \leftarrow g_i \hat M/\max|g| \text{ where } |g_i| > \hat M \quad(\text{AdaClip}) \\
        a &\leftarrow \gamma_1 s_t\, a + (1-\gamma_1 s_t)\|g\|,\ c \leftarrow \gamma_2 c + (1-\gamma_2)\|g\|^2 \\
        \kappa &= \frac{a/(1-(\gamma_1 s_t)^t)}{\sqrt{c/(1-\gamma_2^t)}+\epsilon},\ g \leftarrow \kappa\, g/\|g\| \quad(\text{AdaGN}) \\
        &\text{torch-flavour Adam}(\beta_1 s_t, \beta_2) \text{ on } g,\ \text{moments reset every } \Delta T

    ``s_t = η_min + (1−η_min)·½(1+cos(π t/(T+1)))`` (the official ``CosineAnnealingLR(T+1)``
    values: 0.9999 / 0.7539 / 0.5001 at t = 1 / 50 / 100 for T = 100).

    Reset (``t mod ΔT = 0``), ``compat``:
    ``"paper"`` (default) zeroes the moments **before** the update and restarts bias correction,
    so the reset step uses this step's gradient, and ``s_t`` stays at ``η_min`` after ``total_T``.
    ``"official"`` (TianjinYellow/StableSPAM) updates and applies the **old** moments with
    step-1 bias corrections (≈1.8× a normal step), then replaces them by zeros (that step's
    gradient is lost, so the next step is ≈0.74×), ``s_t`` is periodic past ``total_T``, and the
    bias corrections of AdaClip/AdaGN use the per-parameter counter that the reset sets back to
    1 (so clipping is nearly off for a while after each reset); ``"paper"`` uses the total step
    there, because those running statistics are never reset.

    Defaults: ``lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, gamma1=0.7, gamma2=0.9,
    gamma3=0.999, total_T=None, eta_min=0.5, reset_interval=1000`` (BF16 recipe:
    ``gamma1=0.85, gamma2=0.99999``).  ``adaclip``/``adagn`` switch the two transforms;
    with both off, ``reset_interval=0`` and ``total_T=None`` this is ``torch.optim.AdamW``.
    A zero gradient makes AdaGN output zero (the official code divides by zero).

    Paper: Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
    arXiv 2502.17055.  Official code: TianjinYellow/StableSPAM (no pip package; equation-level
    tests).  Memory: 2 buffers + 3 scalars (``max_abs_avg``, ``norm_avg``, ``norm_sq_avg``).
    """

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9,
                 gamma3: float = 0.999, total_T: int | None = None, eta_min: float = 0.5,
                 reset_interval: int = 1000, adaclip: bool = True, adagn: bool = True,
                 compat: str = "paper", *, maximize: bool = False, nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, total_T=total_T,
                                      eta_min=eta_min, reset_interval=reset_interval, adaclip=adaclip,
                                      adagn=adagn, compat=compat, maximize=maximize, nonfinite=nonfinite))

    def _validate(self, group):
        super()._validate(group)
        for name in ("gamma1", "gamma2", "gamma3"):
            check_range(name, group[name], 0.0, 1.0, hi_open=True)
        check_range("eta_min", group["eta_min"], 0.0, 1.0)
        check_range("reset_interval", group["reset_interval"], 0)
        if group["total_T"] is not None:
            check_range("total_T", group["total_T"], 1)
        check_choice("compat", group["compat"], ("paper", "official"))

    def _init_state(self, p, state, group):
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        for key in ("max_abs_avg", "norm_avg", "norm_sq_avg"):
            state[key] = torch.zeros((), dtype=p.dtype, device=p.device)

    @staticmethod
    def schedule_factor(t: int, total_T: int | None, eta_min: float, periodic: bool) -> float:
        if total_T is None:
            return 1.0
        if not periodic:
            t = min(t, total_T + 1)
        return eta_min + (1.0 - eta_min) * _cosine(t / (total_T + 1))

    def _update(self, p, grad, state, group):
        t = self._advance(state)
        lr, eps = scalar(group["lr"]), group["eps"]
        official = group["compat"] == "official"
        s = self.schedule_factor(t, group["total_T"], group["eta_min"], periodic=official)
        dt = group["reset_interval"]
        # official: the counter used by AdaClip/AdaGN restarts at 1 after each reset
        ema_t = t if not official or dt <= 0 or t <= dt else t - dt * ((t - 1) // dt) + 1
        decay_(p, lr, group["weight_decay"])
        if group["adaclip"]:
            g3 = group["gamma3"]
            absmax = grad.abs().max()
            state["max_abs_avg"].mul_(g3).add_(absmax, alpha=1 - g3)
            grad = clip_to_running_max(grad, state["max_abs_avg"] / (1 - g3 ** ema_t), absmax)
        if group["adagn"]:
            g1, g2 = group["gamma1"] * s, group["gamma2"]
            norm = torch.linalg.vector_norm(grad)
            state["norm_avg"].mul_(g1).add_(norm, alpha=1 - g1)
            state["norm_sq_avg"].mul_(g2).add_(norm.square(), alpha=1 - g2)
            kappa = (state["norm_avg"] / (1 - g1 ** ema_t)) / ((state["norm_sq_avg"] / (1 - g2 ** ema_t)).sqrt() + eps)
            grad = grad * (kappa / norm.clamp_min(torch.finfo(norm.dtype).tiny))
        reset = dt > 0 and t % dt == 0
        adam_t = t if dt <= 0 or t < dt else t % dt + 1
        if reset and not official:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        beta1, beta2 = group["betas"]
        direction, scale = _adam_direction(state, grad, adam_t, beta1 * s, beta2, eps, eps_inside=False)
        p.add_(direction, alpha=-lr * scale)
        if reset and official:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
