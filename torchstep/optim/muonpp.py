"""MuonPP (Muon++, our reading of arXiv 2601.01306): every update meets μP's spectral condition.

The paper has no public code and its algorithm box could not be read from this machine (only the abstract
and secondary summaries); the class docstring states which parts are confirmed and which are our choices.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from ._base import invalid
from .matrix import MUON, MatrixRule, certified_spectral_scale, check_newton_schulz
from .muon import Muon


def _check(group):
    check_newton_schulz(group)
    if group["adjust_lr"] != "spectral_norm":   # the step scale is part of the rule
        raise invalid("adjust_lr", group["adjust_lr"], "'spectral_norm' (MuonPP's scale is √(d_out/d_in))")
    lr = group["lr"]
    if not torch.is_tensor(lr) and lr * group["weight_decay"] > 1:
        raise invalid("weight_decay", lr * group["weight_decay"], "lr·weight_decay ≤ 1 (the spectral bound needs it)")


MUONPP = MatrixRule("muonpp", lmo=MUON.lmo, direction=MUON.direction, init=MUON.init,
                    scale=certified_spectral_scale, check=_check)


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
    (:func:`torchstep.ops.newton_schulz.singular_value_bound`: 1.202 for 5 quintic steps, ≈1.002 for the
    convergent quintic), so ``‖ΔW‖₂ ≤ η√(d_out/d_in)`` is *certified* without any power iteration or SVD.
    With decoupled decay, ``‖W_{t+1}‖₂ ≤ (1-ηλ)‖W_t‖₂ + η√(d_out/d_in)``, hence for every t

    .. math:: \|W_t\|_2 \le \max\big(\|W_0\|_2,\ \sqrt{d_{out}/d_{in}}/\lambda\big) \quad (\eta\lambda \le 1)

    — a width-independent multiple of √(d_out/d_in): the weight condition's upper half holds for the
    whole run (:meth:`weight_bound`).  Every ``ndim >= 2`` weight uses the flattened (out, prod(rest)) shape.

    Confirmed from the paper: the goal (spectral conditions for Muon throughout training) and that the
    control sits at the update level only.  Our choices: the certified ``1/ν`` factor, deriving the
    weight bound from decoupled weight decay, and the defaults.  Not implemented: the paper's "adaptive
    spectral condition with data-dependent effects" (its form could not be checked).

    Args:
        params: as :class:`Muon`.
        lr: η (default 0.02).
        weight_decay: decoupled λ (default 0.1); ``lr·weight_decay > 1`` is refused (the bound needs ηλ ≤ 1).
        **kwargs: :class:`Muon`'s other arguments (momentum 0.95, Nesterov, NS settings, fallback AdamW);
            ``adjust_lr`` must stay ``"spectral_norm"``.

    Fallback AdamW as :class:`Muon`.  bf16 Newton–Schulz rounding can exceed ν by ≲1 % (measured in the tests).
    Memory: Muon's (one momentum buffer per matrix).
    """

    matrix_rule = MUONPP

    def __init__(self, params: Any, lr: float = 0.02, weight_decay: float = 0.1, **kwargs: Any) -> None:
        kwargs.setdefault("adjust_lr", "spectral_norm")
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)

    @staticmethod
    def weight_bound(initial_spectral_norm: float, shape: tuple[int, ...], weight_decay: float) -> float:
        """The guaranteed ``max_t ‖W_t‖₂`` for a matrix of ``shape`` (out, in, …) started at the given norm."""
        m = shape[0]
        n = math.prod(shape[1:])
        return max(initial_spectral_norm, math.sqrt(m / n) / weight_decay if weight_decay > 0 else math.inf)
