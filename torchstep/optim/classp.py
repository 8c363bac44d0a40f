"""CLASSP — AdaGrad generalisation with a gradient threshold, for continual learning."""
from __future__ import annotations

from typing import Any

import torch

from ._base import TorchstepOptimizer, check_choice, check_range, scalar


class CLASSP(TorchstepOptimizer):
    r"""CLASSP: Continual Learning through Adjustment Suppression and Sparsity Promotion.

    Per coordinate *i*, with ``p`` the power and ``τ`` the threshold:

    .. math::
        a_i &= \mathbb{1}[g_i^2 > \tau] \\
        S_i &\leftarrow S_i + a_i\,|g_i|^p \\
        \theta_i &\leftarrow \theta_i - a_i\,\frac{\eta\, g_i}{(\epsilon + S_i)^{1/p}}

    * adjustment suppression: weights that were adjusted often (large accumulated ``S``) get
      smaller steps; with ``p = 2, τ = 0`` this is AdaGrad (ε inside the root);
    * sparsity promotion: a coordinate whose squared gradient does not exceed ``τ`` is
      neither moved nor charged — its capacity stays free for later tasks.

    Defaults: ``lr=0.2, threshold=0.5, eps=1e-5, power=1`` (official repository's defaults).

    Paper: O. Ludwig, "CLASSP: a Biologically-Inspired Approach to Continual Learning through
    Adjustment Suppression and Sparsity Promotion", arXiv 2405.09637.
    Choices and deviations (``compat``):

    * ``compat="paper"`` (default) implements the equation above.  The paper prints the sum
      over k = 0…t−1; we include the current gradient as AdaGrad (which the paper says it
      generalises) and the official code do — otherwise the first step divides by ε^{1/p}.
      Only adjusted coordinates are charged ("accumulated adjustments").
    * ``compat="official"`` reproduces oswaldoludwig/CLASSP ``CLASSP.py``: the threshold test
      ``(grad ** 2).any() > threshold`` is a per-tensor boolean, so every coordinate of a tensor
      with any non-zero gradient is updated (and nothing is ever updated when ``threshold >= 1``); the accumulator adds ``|g|`` (the ``** power`` is
      discarded), and the step is ``η g / (S + ε)^{1/p}``.
    No pip package exists, so parity with the official code is tested against a transcription
    of its equations.  Memory: 1 buffer (``grad_sum``).
    """

    def __init__(self, params: Any, lr: float = 0.2, threshold: float = 0.5, eps: float = 1e-5,
                 power: float = 1.0, compat: str = "paper", *, maximize: bool = False,
                 nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, threshold=threshold, eps=eps, power=power,
                                      compat=compat, maximize=maximize, nonfinite=nonfinite))

    def _validate(self, group):
        super()._validate(group)
        check_range("threshold", group["threshold"], 0.0)
        check_range("power", group["power"], 0.0, lo_open=True)
        check_choice("compat", group["compat"], ("paper", "official"))

    def _init_state(self, p, state, group):
        state["grad_sum"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, p, grad, state, group):
        self._advance(state)
        lr, power, eps = scalar(group["lr"]), group["power"], group["eps"]
        grad_sum = state["grad_sum"]
        if group["compat"] == "official":
            # `(g**2).any() > threshold` compares a bool with the threshold: True > τ iff τ < 1.
            if group["threshold"] >= 1:
                return
            grad_sum.add_(grad.abs())
            p.add_(grad / (grad_sum + eps).pow_(1.0 / power), alpha=-lr)
            return
        adjusted = grad.square() > group["threshold"]
        charge = grad.abs().pow_(power) if power != 1 else grad.abs()
        grad_sum.add_(charge.mul_(adjusted))
        step = (grad_sum + eps).pow_(1.0 / power).reciprocal_().mul_(grad).mul_(adjusted)
        p.add_(step, alpha=-lr)
