"""Lion — evolved sign momentum."""
from __future__ import annotations

from typing import Any

import torch

from ._base import ElementwiseRule, TorchstepOptimizer, add_scaled_, scalar, zeros_state


def lion_direction(grad, exp_avg, betas) -> torch.Tensor:
    """``sign(β1 m + (1−β1) g)``, then ``m ← β2 m + (1−β2) g`` in place (also a low-rank projection base)."""
    beta1, beta2 = betas
    direction = exp_avg.lerp(grad, 1.0 - beta1).sign_()
    exp_avg.lerp_(grad, 1.0 - beta2)
    return direction


def lion_plan(state, group) -> dict:
    lr = scalar(group["lr"])
    return dict(decay=1.0 - lr * group["weight_decay"], step=-lr)


def lion_kernel(p, grad, state, group, c) -> None:
    if group["weight_decay"] != 0:
        p.mul_(c["decay"])
    add_scaled_(p, lion_direction(grad, state["exp_avg"], group["betas"]), c["step"])


LION = ElementwiseRule("lion", plan=lion_plan, kernel=lion_kernel, init=zeros_state("exp_avg"))


class Lion(TorchstepOptimizer):
    r"""Lion: sign of an interpolated momentum, decoupled weight decay.

    .. math::
        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= \theta_{t-1}(1-\eta\lambda) - \eta\,\mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    Args:
        params: parameters or groups.
        lr: η (default 1e-4, paper).
        betas: (β1, β2) — interpolation for the sign and momentum EMA (default (0.9, 0.99)).
        weight_decay: decoupled λ (default 0).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled`.

    Use an lr 3–10× smaller
    and a weight decay 3–10× larger than AdamW's.  optax's ``lion`` defaults ``weight_decay`` to
    1e-3 instead.

    With decoupled decay λ>0 and ηλ ≤ 1 the iterates satisfy
    ``|θ_{t+1}| ≤ (1−ηλ)|θ_t| + η`` elementwise, i.e. Lion solves
    ``min f(θ) s.t. ‖θ‖_∞ ≤ 1/λ`` (Chen et al., arXiv 2310.05898) — tested.

    Paper: Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675.
    Official code: google/automl ``lion/lion_pytorch.py``; parity tested against pip ``lion-pytorch``.
    Deviations: none.  Memory: one buffer (``exp_avg``) per parameter.
    """

    rule = LION

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))
