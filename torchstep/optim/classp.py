"""CLASSP — AdaGrad generalisation with a gradient threshold, for continual learning."""
from __future__ import annotations

from typing import Any

import torch

from ._base import ElementwiseRule, TorchstepOptimizer, add_scaled_, check_choice, check_range, scalar, zeros_state


def classp_plan(state, group) -> dict:
    return dict(step=-scalar(group["lr"]))


def classp_kernel(p, grad, state, group, c) -> None:
    power, eps = group["power"], group["eps"]
    grad_sum = state["grad_sum"]
    if group["compat"] == "official":
        # `(g**2).any() > threshold` compares a bool with the threshold: True > τ iff τ < 1.
        if group["threshold"] >= 1:
            return
        grad_sum.add_(grad.abs())
        add_scaled_(p, grad / (grad_sum + eps).pow_(1.0 / power), c["step"])
        return
    grad_sum.add_(grad.abs().pow_(power) if power != 1 else grad.abs())   # every coordinate is charged
    grad_sum.clamp_max_(torch.finfo(grad_sum.dtype).max)     # saturate: an inf sum would freeze the coordinate
    # where(), not a 0/1 product: (ε + S)^(1/p) underflows to 0 for small p, and inf·0 would be NaN
    step = torch.where(grad.square() > group["threshold"], (grad_sum + eps).pow_(1.0 / power).reciprocal_().mul_(grad),
                       0.0)
    add_scaled_(p, step, c["step"])


def _check(group):
    check_range("threshold", group["threshold"], 0.0)
    check_range("power", group["power"], 0.0, lo_open=True)
    check_choice("compat", group["compat"], ("paper", "official"))


CLASSP_RULE = ElementwiseRule("classp", plan=classp_plan, kernel=classp_kernel, init=zeros_state("grad_sum"),
                              check=_check)


class CLASSP(TorchstepOptimizer):
    r"""CLASSP: Continual Learning through Adjustment Suppression and Sparsity Promotion.

    Per coordinate *i*, with ``p`` the power and ``τ`` the threshold:

    .. math::
        a_i &= \mathbb{1}[g_i^2 > \tau] \\
        S_i &\leftarrow S_i + |g_i|^p \quad(\text{every coordinate, every step: the paper's sum over all past gradients}) \\
        \theta_i &\leftarrow \theta_i - a_i\,\frac{\eta\, g_i}{(\epsilon + S_i)^{1/p}}

    * adjustment suppression: weights that were adjusted often (large accumulated ``S``) get
      smaller steps; with ``p = 2, τ = 0`` this is AdaGrad (ε inside the root);
    * sparsity promotion: a coordinate whose squared gradient does not exceed ``τ`` is not moved.

    Args:
        params: parameters or groups.
        lr: η (default 0.2, official repository).
        threshold: τ on g² (default 0.5).
        eps: ε inside the root (default 1e-5).
        power: p (default 1); any p > 0 — unadjusted coordinates are exactly 0 even where
            ε^(−1/p) overflows (p ≲ 0.13 in fp32).
        compat: ``"paper"`` (default) or ``"official"`` (below).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.

    Paper: O. Ludwig, "CLASSP: a Biologically-Inspired Approach to Continual Learning through
    Adjustment Suppression and Sparsity Promotion", arXiv 2405.09637.
    Choices and deviations (``compat``):

    * ``compat="paper"`` (default) implements the equation above: the paper's accumulator is the sum
      of |g_k|^p over *all* past gradients of the coordinate (arXiv 2405.09637, as transcribed), whether
      or not the coordinate was adjusted at step k.  Deviation (our choice): the paper prints the sum over
      k = 0…t−1; we include the current gradient, as AdaGrad (which the paper says it generalises) and the
      official code do — otherwise the first step divides by ε^{1/p}.
    * ``compat="official"`` reproduces oswaldoludwig/CLASSP ``CLASSP.py``: the threshold test
      ``(grad ** 2).any() > threshold`` is a per-tensor boolean, so every coordinate of a tensor
      with any non-zero gradient is updated (and nothing is ever updated when ``threshold >= 1``); the accumulator adds ``|g|`` (the ``** power`` is
      discarded), and the step is ``η g / (S + ε)^{1/p}``.
    No pip package exists, so parity with the official code is tested against a transcription
    of its equations.  Memory: 1 buffer (``grad_sum``).
    """

    rule = CLASSP_RULE

    def __init__(self, params: Any, lr: float = 0.2, threshold: float = 0.5, eps: float = 1e-5,
                 power: float = 1.0, compat: str = "paper", *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, threshold=threshold, eps=eps, power=power,
                                      compat=compat, maximize=maximize, nonfinite=nonfinite, compile=compile))
