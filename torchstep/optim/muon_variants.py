"""Muon variants that change *how large* each layer's step is: MuonPP (μP spectral control) and Lanton
(noise-adaptive layerwise learning rates).  Both are :class:`~torchstep.optim.muon.Muon` hybrids: same
routing, AdamW fallback, one scheduler and one checkpoint.

Neither paper has public code, and the paper bodies (algorithm boxes) could not be read from this
machine — only their abstracts and secondary summaries.  Each class therefore states, line by line, which
part of its rule is confirmed and which is our choice; the tests check the rules as written here.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import torch
from torch import Tensor

from ..ops.newton_schulz import as_matrix, singular_value_bound
from ._base import check_choice, check_range, invalid
from .muon import Muon, shape_scale

_bound = functools.lru_cache(maxsize=None)(singular_value_bound)


def _certified_spectral_scale(u: Tensor, group) -> float:
    """√(d_out/d_in)/ν: with it, ‖step‖₂ ≤ lr·√(d_out/d_in) for any Newton–Schulz output (see MuonPP)."""
    return shape_scale("spectral_norm", u.shape[0], u.shape[1]) / _bound(group["ns_steps"], group["ns_preset"])


class MuonPP(Muon):
    r"""Muon++ (our reading): every update meets μP's spectral condition, so the weights do throughout.

    μP's spectral condition (Yang, Simon, Bernstein, arXiv 2310.17813) asks for
    ``‖W‖₂ = Θ(√(d_out/d_in))`` and ``‖ΔW‖₂ = Θ(√(d_out/d_in))`` for every hidden matrix at every step.
    The paper's key claim (abstract, arXiv 2601.01306) is that controlling the **updates** suffices —
    no spectral normalisation of the weights.  The rule implemented here:

    .. math::
        b &\leftarrow \mu b + (1-\mu) g,\quad u = (1-\mu)g + \mu b \text{ (Nesterov) else } b \\
        \Delta W &= -\eta\,\sqrt{d_{out}/d_{in}}\;\mathrm{NS}(u)/\nu, \qquad
            \nu = \sup_{x\in[0,1]} p_{\mathrm{NS}}(x) \\
        W &\leftarrow (1-\eta\lambda)\,W + \Delta W

    ``ν`` is the largest singular value the Newton–Schulz polynomial can output
    (:func:`torchstep.ops.newton_schulz.singular_value_bound`: 1.202 for 5 quintic steps, 1.0 for the
    convergent cubic), so ``‖ΔW‖₂ ≤ η√(d_out/d_in)`` is *certified* without any power iteration or SVD.
    With decoupled decay, ``‖W_{t+1}‖₂ ≤ (1-ηλ)‖W_t‖₂ + η√(d_out/d_in)``, hence for every t

    .. math:: \|W_t\|_2 \le \max\big(\|W_0\|_2,\ \sqrt{d_{out}/d_{in}}/\lambda\big) \quad (\eta\lambda \le 1)

    — a width-independent multiple of √(d_out/d_in): the weight condition's upper half holds for the
    whole run (:meth:`weight_bound`).  Conv weights use the flattened (out, in·kh·kw) shape.

    Confirmed from the paper: the goal (spectral conditions for Muon throughout training) and that the
    control sits at the update level only.  Our choices: the certified ``1/ν`` factor, deriving the
    weight bound from decoupled weight decay, and the defaults.  Not implemented: the paper's "adaptive
    spectral condition with data-dependent effects" (its form could not be checked).

    Defaults: ``lr=0.02, momentum=0.95, nesterov=True, weight_decay=0.1, ns_steps=5,
    ns_preset="quintic"``; fallback AdamW as :class:`Muon`.  ``lr·weight_decay > 1`` is refused (the
    bound needs ηλ ≤ 1).  bf16 Newton–Schulz rounding can exceed ν by ≲1 % (measured in the tests).
    Memory: Muon's (one momentum buffer per matrix).
    """

    matrix_algo = "muonpp"

    def __init__(self, params: Any, lr: float = 0.02, weight_decay: float = 0.1, **kwargs: Any) -> None:
        kwargs.setdefault("adjust_lr", "spectral_norm")
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)

    def _validate(self, group):
        super()._validate(group)
        if group["algo"] != "muonpp":
            return
        if group["adjust_lr"] != "spectral_norm":   # the step scale is part of the rule
            raise invalid("adjust_lr", group["adjust_lr"], "'spectral_norm' (MuonPP's scale is √(d_out/d_in))")
        lr = group["lr"]
        if not torch.is_tensor(lr) and lr * group["weight_decay"] > 1:
            raise invalid("weight_decay", lr * group["weight_decay"], "lr·weight_decay ≤ 1 (the spectral bound needs it)")

    def _scale(self, u, group):
        return _certified_spectral_scale(u, group)

    @staticmethod
    def weight_bound(initial_spectral_norm: float, shape: tuple[int, ...], weight_decay: float) -> float:
        """The guaranteed ``max_t ‖W_t‖₂`` for a matrix of ``shape`` (out, in, …) started at the given norm."""
        m = shape[0]
        n = math.prod(shape[1:])
        return max(initial_spectral_norm, math.sqrt(m / n) / weight_decay if weight_decay > 0 else math.inf)


class Lanton(Muon):
    r"""LANTON (our reconstruction): LMO steps with noise-adaptive layerwise learning rates per group.

    Each tensor ℓ of a group (a "layer") keeps the paper's momentum and a running estimate of its
    gradient noise measured in the dual norm of the group's LMO; the group lr is then shared out so
    that noisier layers take proportionally smaller steps:

    .. math::
        D_\ell &= G_\ell - \hat B_\ell \quad(\text{innovation w.r.t. the bias-corrected momentum},\ t\ge 2) \\
        H_\ell &\leftarrow \beta_2 H_\ell + (1-\beta_2)\,\|D_\ell\|_*^2 \\
        B_\ell &\leftarrow \beta_1 B_\ell + (1-\beta_1) G_\ell \\
        \eta_\ell &= \eta\,\min\Big(1,\ \sqrt{\mathrm{mean}_j H_j / H_\ell}\Big)
            \in [\eta/\sqrt L,\ \eta] \quad(\text{all } \eta \text{ at } t = 1;\ L \text{ tensors in the group}) \\
        W_\ell &\leftarrow (1-\eta\lambda) W_\ell + \eta_\ell\,\mathrm{LMO}(B_\ell)

    LMOs (``lmo`` group key) and their dual norms:

    - ``"spectral"`` (hidden matrices; RMS→RMS operator norm): LMO = −√(d_out/d_in)·NS(B) / ν,
      ‖D‖_* = √(d_out/d_in)·‖D‖_nuclear;
    - ``"sign"`` (embeddings / head / any shape; ℓ1→ℓ∞ operator norm = max entry): LMO = −sign(B),
      ‖D‖_* = ‖D‖₁.

    Confirmed from the paper (abstract and a public summary of Algorithm 1, arXiv 2510.14009): momentum
    ``B = β1 B + (1-β1) G``; a per-layer noise estimate in the dual norm of the chosen LMO, computed on
    the fly; time-varying layerwise lrs within each group on top of an LMO optimizer; RMS→RMS for hidden
    layers and ℓ1→ℓ∞ for embedding/head.  **Our choices** (the algorithm box could not be read here):
    the innovation estimator (no second mini-batch, no extra buffer), the EMA, and the map
    ``min(1, √(mean_j H_j / H_ℓ))`` — layers noisier than the group's mean noise power are slowed by the
    ratio of noise levels, the others keep the group lr, so the lr you tune is an upper bound, uniform
    noise gives plain Muon, and no layer is ever slowed below η/√L (a noiseless layer cannot freeze the
    others, as a ratio to the minimum would); ``ν`` as in :class:`MuonPP`, and ``noise_norm="frobenius"``
    (√min(m,n)·‖D‖_F·√(d_out/d_in), an upper bound on the nuclear norm without an SVD) as a cheap option.

    Defaults: ``lr=0.02, momentum (β1)=0.95, nesterov=False, beta2=0.99, lmo="spectral",
    noise_norm="nuclear", weight_decay=0``; fallback AdamW as :class:`Muon`.  With one tensor per group
    (or equal noise) it is exactly ``Muon(nesterov=False, adjust_lr="spectral_norm")`` with lr/ν (tested).
    Memory: Muon's plus one scalar per tensor; compute: one SVD per matrix per step for
    ``noise_norm="nuclear"``.
    """

    matrix_algo = "lanton"

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, beta2: float = 0.99,
                 lmo: str = "spectral", noise_norm: str = "nuclear", nesterov: bool = False, **kwargs: Any) -> None:
        self._lanton = dict(beta2=beta2, lmo=lmo, noise_norm=noise_norm)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, **kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return self._lanton

    def _validate(self, group):
        super()._validate(group)
        if group["algo"] == "lanton":
            check_range("beta2", group["beta2"], 0.0, 1.0, hi_open=True)
            check_choice("lmo", group["lmo"], ("spectral", "sign"))
            check_choice("noise_norm", group["noise_norm"], ("nuclear", "frobenius"))

    def _init_matrix_state(self, p, state, group):
        super()._init_matrix_state(p, state, group)
        state["noise_sq"] = torch.zeros((), dtype=p.dtype, device=p.device)

    def _direction(self, p, grad, state, group):
        t = int(state["step"]) + 1          # state["step"] is a CPU tensor: no device sync
        if t >= 2:
            beta1, beta2 = group["momentum"], group["beta2"]
            innovation = grad - state["momentum_buffer"] / (1 - beta1 ** (t - 1))
            noise = state["noise_sq"]
            noise.lerp_(self._dual_norm(innovation, group).square().to(noise.dtype), 1 - beta2)
        return super()._direction(p, grad, state, group)

    def _dual_norm(self, d: Tensor, group) -> Tensor:
        if group["lmo"] == "sign":
            return d.abs().sum()
        d = as_matrix(d)
        m, n = d.shape
        if group["noise_norm"] == "nuclear":
            nuclear = torch.linalg.svdvals(d).sum()
        else:
            nuclear = math.sqrt(min(m, n)) * torch.linalg.matrix_norm(d)
        return math.sqrt(m / n) * nuclear

    def _orthogonalise(self, directions, group):
        if group["lmo"] == "sign":
            return [d.sign() for d in directions]
        return super()._orthogonalise(directions, group)

    def _scale(self, u, group):
        return 1.0 if group["lmo"] == "sign" else _certified_spectral_scale(u, group)

    def _layer_factors(self, states, group):
        t = int(states[0]["step"]) + 1 if states else 1
        if t < 2 or len(states) < 2:
            return [None] * len(states)
        noise = torch.stack([s["noise_sq"] for s in states])     # bias correction cancels in the ratio
        factors = (noise.mean() / noise.clamp_min(torch.finfo(noise.dtype).tiny)).sqrt().clamp_max(1.0)
        return list(factors.unbind())
