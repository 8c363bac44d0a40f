"""SPAM and Stable-SPAM — spike-aware Adam with periodic momentum resets."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.curves import cosine
from ..ops.materialise import materialise
from ..ops.moments import bias_corrections, corrected_root, update_moments_, update_moments_scaled_
from ..ops.spike import clip_spikes, clip_to_running_max
from ._base import (ElementwiseRule, TorchstepOptimizer, add_scaled_, check_choice, check_range, scalar, step_of,
                    zeros_state)
from ._dtensor import full_state


def _reset_moments(state) -> None:
    state["exp_avg"].zero_()
    state["exp_avg_sq"].zero_()


def spam_warmup_factor(t: int, reset_interval: int, warmup_steps: int, official: bool = False) -> float:
    """SPAM's post-reset lr multiplier: 0.01 at a reset step, rising on a cosine to 1.0 after
    ``warmup_steps``; ``official`` uses the official code's ``CosineAnnealingLR(T_max=N+1)`` curve
    cos(πr/(N+1)) instead of cos(πr/N).  1.0 before the first reset."""
    if reset_interval <= 0 or t < reset_interval:
        return 1.0
    r = t % reset_interval
    if warmup_steps <= 0 or r >= warmup_steps:
        return 1.0
    return 1.0 - 0.99 * cosine(r / (warmup_steps + 1 if official else warmup_steps))


def spam_plan(state, group) -> dict:
    """Host side: the reset and clip decisions (bools: one compiled graph per combination — at most three),
    the step size −η·√(1−β2ˢ)/(1−β1ˢ)·w_t and the decay factor."""
    t, lr = step_of(state), scalar(group["lr"])
    dt, accu = group["reset_interval"], group["grad_accu_steps"]
    since_reset = t % dt if dt > 0 and t >= dt else t
    restart = group["reset_step_counter"] and dt > 0 and t >= dt
    bc1, bc2 = bias_corrections(since_reset + 1 if restart else t, *group["betas"])
    warm = spam_warmup_factor(t, dt, group["warmup_steps"], official=group["compat"] == "official")
    return dict(reset=dt > 0 and t % dt == 0,
                clip=group["threshold"] > 0 and t >= accu and since_reset >= accu,
                step=float(-lr * (math.sqrt(bc2) / bc1) * warm), decay=float(1.0 - lr * group["weight_decay"]))


def spam_kernel(p, grad, state, group, c) -> None:
    """Reset, clip against the previous v, HF-flavour Adam (ε inside the root, the official spelling of the
    moments), then the decay after the step."""
    if c["reset"]:
        _reset_moments(state)
    if c["clip"]:
        grad = clip_spikes(grad, state["exp_avg_sq"], group["threshold"])
    update_moments_(state["exp_avg"], state["exp_avg_sq"], grad, *group["betas"], lerp=False)   # official spelling
    add_scaled_(p, state["exp_avg"] / state["exp_avg_sq"].sqrt().add_(group["eps"]), c["step"])
    if group["weight_decay"] != 0:
        p.mul_(c["decay"])


def _check_spam(group) -> None:
    check_range("threshold", group["threshold"], 0.0)
    check_range("reset_interval", group["reset_interval"], 0)
    check_range("warmup_steps", group["warmup_steps"], 0)
    # with A ≤ 1 the first step clips against v = 0 (no earlier step): every entry becomes 0, v stays 0, forever
    check_range("grad_accu_steps", group["grad_accu_steps"], 2 if group["threshold"] > 0 else 0)
    check_choice("compat", group["compat"], ("paper", "official"))
    if not isinstance(group["reset_step_counter"], bool):
        raise ValueError(f"Invalid reset_step_counter: {group['reset_step_counter']!r} (valid range: True or False)")


SPAM_RULE = ElementwiseRule("spam", plan=spam_plan, kernel=spam_kernel, init=zeros_state("exp_avg", "exp_avg_sq"),
                           check=_check_spam)


def stablespam_schedule_factor(t: int, total_T: int | None, eta_min: float, periodic: bool) -> float:
    """Stable-SPAM's β1 anneal s_t = η_min + (1 − η_min)·cosine(t/(T+1)); 1 without ``total_T``."""
    if total_T is None:
        return 1.0
    if not periodic:
        t = min(t, total_T + 1)
    return eta_min + (1.0 - eta_min) * cosine(t / (total_T + 1))


def stablespam_plan(state, group) -> dict:
    """Host side: the schedule factor s_t and everything that depends on it or on the step — the decay
    factor, AdaClip's and AdaGN's bias corrections (at the official per-reset counter or the total step),
    γ1·s_t, β1·s_t and 1 − each, the Adam step size −η/(1−(β1 s_t)ᵗ) and √(1−β2ᵗ); the reset decision is a
    bool (two compiled graphs: reset step or not)."""
    t, lr = step_of(state), scalar(group["lr"])
    official = group["compat"] == "official"
    s = stablespam_schedule_factor(t, group["total_T"], group["eta_min"], periodic=official)
    dt = group["reset_interval"]
    # official: the counter used by AdaClip/AdaGN restarts at 1 after each reset
    ema_t = t if not official or dt <= 0 or t <= dt else t - dt * ((t - 1) // dt) + 1
    adam_t = t if dt <= 0 or t < dt else t % dt + 1
    beta1, beta2 = group["betas"]
    beta1 = beta1 * s
    bc1, bc2 = bias_corrections(adam_t, beta1, beta2)
    c = dict(reset=dt > 0 and t % dt == 0, decay=1.0 - lr * group["weight_decay"], beta1=beta1,
             one_minus_beta1=1 - beta1, step=-lr * (1.0 / bc1), root_bc2=math.sqrt(bc2))
    if group["adaclip"]:
        c["bc3"] = 1 - group["gamma3"] ** ema_t
    if group["adagn"]:
        g1 = group["gamma1"] * s
        c.update(g1=g1, one_minus_g1=1 - g1, bc_g1=1 - g1 ** ema_t, bc_g2=1 - group["gamma2"] ** ema_t)
    return {k: v if isinstance(v, bool) else float(v) for k, v in c.items()}


def stablespam_kernel(p, grad, state, group, c) -> None:
    """Decay, AdaClip, AdaGN, torch-flavour Adam with β1·s_t (the official spelling of the moments); the
    moments are reset before the update (``compat="paper"``) or after it (``"official"``)."""
    eps, official = group["eps"], group["compat"] == "official"
    if group["weight_decay"] != 0:
        p.mul_(c["decay"])
    if group["adaclip"]:
        g3 = group["gamma3"]
        absmax = grad.abs().max()
        state["max_abs_avg"].mul_(g3).add_(absmax, alpha=1 - g3)
        grad = clip_to_running_max(grad, state["max_abs_avg"] / c["bc3"], absmax)
    if group["adagn"]:
        g2 = group["gamma2"]
        norm = torch.linalg.vector_norm(grad)
        add_scaled_(state["norm_avg"].mul_(c["g1"]), norm, c["one_minus_g1"])
        state["norm_sq_avg"].mul_(g2).add_(norm.square(), alpha=1 - g2)
        kappa = (state["norm_avg"] / c["bc_g1"]) / ((state["norm_sq_avg"] / c["bc_g2"]).sqrt() + eps)
        # rescale only a non-zero gradient (as the official code): κ/‖g‖ at ‖g‖ = 0 is 0·inf
        scale = materialise(torch.where(norm > 0, kappa / norm.clamp_min(torch.finfo(norm.dtype).tiny), 1.0))
        grad = grad * scale
    if c["reset"] and not official:
        _reset_moments(state)
    update_moments_scaled_(state["exp_avg"], state["exp_avg_sq"], grad, c["beta1"], c["one_minus_beta1"],
                           group["betas"][1])
    add_scaled_(p, state["exp_avg"] / corrected_root(state["exp_avg_sq"], c["root_bc2"], eps), c["step"])
    if c["reset"] and official:
        _reset_moments(state)


def _init_stablespam(p, state, group) -> None:
    zeros_state("exp_avg", "exp_avg_sq")(p, state, group)
    for key in ("max_abs_avg", "norm_avg", "norm_sq_avg"):
        state[key] = full_state(p, (), 0.0)   # a replicated DTensor under FSDP2


def _check_stablespam(group) -> None:
    for name in ("gamma1", "gamma2", "gamma3"):
        check_range(name, group[name], 0.0, 1.0, hi_open=True)
    check_range("eta_min", group["eta_min"], 0.0, 1.0)
    check_range("reset_interval", group["reset_interval"], 0)
    if group["total_T"] is not None:
        check_range("total_T", group["total_T"], 1)
    check_choice("compat", group["compat"], ("paper", "official"))


STABLESPAM = ElementwiseRule("stablespam", plan=stablespam_plan, kernel=stablespam_kernel, init=_init_stablespam,
                            check=_check_stablespam)


class SPAM(TorchstepOptimizer):
    r"""SPAM: Adam with spike clipping, periodic momentum reset and a post-reset warm-up.

    With ``t`` the parameter's step (1-based), ``ΔT = reset_interval``, ``N = warmup_steps``:

    .. math::
        &\text{if } t \bmod \Delta T = 0:\ m = v = 0 \quad(\text{momentum reset}) \\
        &\text{if } \tau>0,\ t \ge A,\ t \bmod \Delta T \ge A:\
          g_i \leftarrow \mathrm{sign}(g_i)\sqrt{\tau v_i}\ \text{where}\ g_i^2 > \tau v_i \\
        &m, v \leftarrow \text{Adam moments};\quad u = \frac{m}{\sqrt v + \epsilon}\frac{\sqrt{1-\beta_2^{s}}}{1-\beta_1^{s}} \\
        &\theta \leftarrow \theta - \eta\, w_t\, u;\qquad \theta \leftarrow \theta - \eta\lambda\theta \\
        &w_t = 1 - 0.99\cdot\tfrac12\bigl(1+\cos(\pi r/N')\bigr) \text{ for } r = t \bmod \Delta T < N,
          \ 1 \text{ otherwise and before the first reset}

    ``τ = threshold`` (spike threshold θ in the paper), ``A = grad_accu_steps``.  The clip uses
    ``v`` from the previous step and acts on a copy of the gradient.  ``s`` is the bias-correction
    step: the global step ``s = t`` by default, as the official code (TianjinYellow/SPAM-Optimizer)
    does — the paper's Algorithm 1 could not be read here, so nothing shows the paper differs.
    Because ``s`` keeps counting while the moments restart from zero, the first post-reset step is not
    a normal Adam step: before the ramp it is ≈0.48× a normal step at ΔT = 10 but ≈1.98× at ΔT = 500
    (measured on a constant gradient; the ramp's 0.01 then makes it small).  ``reset_step_counter=True``
    restarts ``s`` with the moments (``s = t mod ΔT + 1``: a normal-size step scaled only by the ramp;
    this library's default before 2026-12).  ``N' = N`` for ``compat="paper"`` (a cosine ramp over N
    steps); ``N' = N + 1`` for ``compat="official"`` (the official ``CosineAnnealingLR(T_max=N+1)``,
    then exactly 1 at r = N).

    Args:
        params: parameters or groups.
        lr: η (default 1e-3).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √v (HF flavour, default 1e-6).
        weight_decay: λ, applied after the step as θ ← θ − ηλθ, without the ramp (default 0).
        threshold: spike threshold τ (default 5000; 0 disables clipping).
        reset_interval: ΔT (default 500; 0 disables resets, then SPAM = HF-flavour AdamW with decay after
            the step).
        warmup_steps: ramp length N (default 150; the official training script passed its lr warm-up here —
            use 150).
        grad_accu_steps: A, steps after each reset (and at the start) without clipping (default 20; ≥ 2
            when clipping: with A ≤ 1 the first step clips against v = 0 and freezes every entry forever).
        compat: ``"paper"`` (default) or ``"official"`` — the ramp's N' above.
        reset_step_counter: restart the bias-correction step at resets (default False).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled`.  At most three graphs per group: a reset step,
            a step that clips, one that does not.

    Paper: Huang et al., "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
    ICLR 2025, arXiv 2501.06842.  Official code: TianjinYellow/SPAM-Optimizer (no pip package;
    its quirks are reproduced under ``compat="official"`` and tested at equation level).
    Not implemented: the sparse-momentum ``density`` groups.  Official-code quirks never
    reproduced: clipping ``p.grad`` in place.  Memory: 2 buffers.
    """

    rule = SPAM_RULE

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, threshold: float = 5000,
                 reset_interval: int = 500, warmup_steps: int = 150, grad_accu_steps: int = 20,
                 compat: str = "paper", reset_step_counter: bool = False, *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      threshold=threshold, reset_interval=reset_interval,
                                      warmup_steps=warmup_steps, grad_accu_steps=grad_accu_steps,
                                      compat=compat, reset_step_counter=reset_step_counter,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))

    warmup_factor = staticmethod(spam_warmup_factor)


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
    step-1 bias corrections, then replaces them by zeros (that step's gradient is lost, so the next step
    is ≈0.74×).  The size of that reset step depends on the gap since the moments started: measured on a
    constant gradient with the official file, 2.06× a normal step at ΔT = 10 and 0.398× at ΔT = 1000.
    ``s_t`` is periodic past ``total_T``, and the
    bias corrections of AdaClip/AdaGN use the per-parameter counter that the reset sets back to
    1 (so clipping is nearly off for a while after each reset); ``"paper"`` uses the total step
    there, because those running statistics are never reset.

    Args:
        params: parameters or groups.
        lr: η (default 1e-3).
        betas: (β1, β2) of the Adam part (default (0.9, 0.999)).
        eps: ε (torch flavour, and in κ; default 1e-8).
        weight_decay: decoupled λ (default 0).
        gamma1, gamma2: AdaGN's EMAs of ‖g‖ and ‖g‖² (defaults 0.7, 0.9; BF16 recipe 0.85, 0.99999).
        gamma3: AdaClip's EMA of max|g| (default 0.999).
        total_T: length of the β1/γ1 anneal (default None: no anneal).
        eta_min: the anneal's floor (default 0.5).
        reset_interval: ΔT of the momentum resets (default 1000; 0: none).
        adaclip, adagn: switch the two transforms (default True); with both off, ``reset_interval=0`` and
            ``total_T=None`` this is ``torch.optim.AdamW``.
        compat: ``"paper"`` (default) or ``"official"`` (above).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled`.  At most two graphs per group: a reset step
            and any other step.

    A zero gradient is left as it is by AdaGN (only a non-zero gradient is rescaled, as in the official
    code; with κ > 4 — e.g. the BF16 recipe — κ/‖g‖ at ‖g‖ = 0 would overflow and 0·inf poison the state).

    Paper: Huang et al., "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
    arXiv 2502.17055.  Official code: TianjinYellow/StableSPAM (no pip package; equation-level
    tests).  Memory: 2 buffers + 3 scalars (``max_abs_avg``, ``norm_avg``, ``norm_sq_avg``).
    """

    rule = STABLESPAM

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, gamma1: float = 0.7, gamma2: float = 0.9,
                 gamma3: float = 0.999, total_T: int | None = None, eta_min: float = 0.5,
                 reset_interval: int = 1000, adaclip: bool = True, adagn: bool = True,
                 compat: str = "paper", *, maximize: bool = False, nonfinite: str = "skip",
                 compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      gamma1=gamma1, gamma2=gamma2, gamma3=gamma3, total_T=total_T,
                                      eta_min=eta_min, reset_interval=reset_interval, adaclip=adaclip,
                                      adagn=adagn, compat=compat, maximize=maximize, nonfinite=nonfinite,
                                      compile=compile))

    schedule_factor = staticmethod(stablespam_schedule_factor)
