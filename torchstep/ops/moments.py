"""Adam-type moments and bias correction, written once for every rule that keeps them."""
from __future__ import annotations

import math

from torch import Tensor


def update_moments_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float, beta2: float, *,
                    lerp: bool = True) -> None:
    """``m ← β1 m + (1−β1) g`` and ``v ← β2 v + (1−β2) g²``, in place.

    ``lerp=True`` spells the first moment as torch's AdamW does (``m.lerp_(g, 1−β1)``); ``False`` as
    ``m.mul_(β1).add_(g, alpha=1−β1)`` — the same number up to one rounding, kept so that methods whose
    reference code uses that spelling (SPAM, Stable-SPAM, diffGrad) reproduce it bit for bit."""
    if lerp:
        exp_avg.lerp_(grad, 1 - beta1)
    else:
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def update_moments_scaled_(exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, beta1: float | Tensor,
                           one_minus_beta1: float | Tensor, beta2: float) -> None:
    """``update_moments_(..., lerp=False)`` for a β1 that changes every step (Stable-SPAM's β1·s_t), given with
    ``1 − β1`` as Python floats (then the same operations, bit for bit) or as 0-d tensors in a compiled step."""
    exp_avg.mul_(beta1)
    if isinstance(one_minus_beta1, Tensor):
        exp_avg.add_(grad * one_minus_beta1)
    else:
        exp_avg.add_(grad, alpha=one_minus_beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


def bias_corrections(t: int, beta1: float, beta2: float) -> tuple[float, float]:
    """``(1 − β1ᵗ, 1 − β2ᵗ)`` for the 1-based step ``t``."""
    return 1 - beta1 ** t, 1 - beta2 ** t


def adam_denominator(exp_avg_sq: Tensor, t: int, beta2: float, eps: float) -> Tensor:
    """torch's AdamW denominator ``√v/√(1 − β2ᵗ) + ε`` (a new tensor)."""
    return corrected_root(exp_avg_sq, math.sqrt(1 - beta2 ** t), eps)


def corrected_root(exp_avg_sq: Tensor, root_bc2: float | Tensor, eps: float) -> Tensor:
    """``√v/root_bc2 + ε`` with ``root_bc2 = √(1 − β2ᵗ)`` given (a float, or a 0-d tensor in a compiled step)."""
    return exp_avg_sq.sqrt().div_(root_bc2).add_(eps)


def adam_direction(exp_avg: Tensor, exp_avg_sq: Tensor, t: int, beta1: float, beta2: float, eps: float,
                   eps_inside: bool = False) -> tuple[Tensor, float]:
    """``(direction, multiplier)`` with ``θ ← θ − η·multiplier·direction`` the bias-corrected Adam step.

    ``eps_inside=False`` is torch's flavour ``(m/bc1)/(√v/√bc2 + ε)``; ``True`` the HF / original-paper
    implementation flavour ``(m/(√v + ε))·√bc2/bc1``.  Returns a new tensor (the moments are untouched)."""
    bc1, bc2 = bias_corrections(t, beta1, beta2)
    if eps_inside:
        return exp_avg / exp_avg_sq.sqrt().add_(eps), math.sqrt(bc2) / bc1
    return exp_avg / adam_denominator(exp_avg_sq, t, beta2, eps), 1.0 / bc1
