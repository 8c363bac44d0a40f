"""diffGrad — Adam with a friction coefficient from the change of the gradient."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.moments import bias_corrections, update_moments_
from ._base import ElementwiseRule, TorchstepOptimizer, add_scaled_, scalar, step_of, zeros_state


def diffgrad_plan(state, group) -> dict:
    t, lr = step_of(state), scalar(group["lr"])
    bc1, bc2 = bias_corrections(t, *group["betas"])
    return dict(step=-lr * math.sqrt(bc2) / bc1)


def diffgrad_kernel(p, grad, state, group, c) -> None:
    beta1, beta2 = group["betas"]
    if group["weight_decay"] != 0:
        grad = grad.add(p, alpha=group["weight_decay"])
    exp_avg, exp_avg_sq, previous = state["exp_avg"], state["exp_avg_sq"], state["previous_grad"]
    update_moments_(exp_avg, exp_avg_sq, grad, beta1, beta2, lerp=False)   # official v2 spelling
    friction = previous.sub_(grad).abs_().sigmoid_()   # reuse the buffer, then refill it
    step = friction.mul_(exp_avg).div_(exp_avg_sq.sqrt().add_(group["eps"]))
    add_scaled_(p, step, c["step"])
    previous.copy_(grad)


DIFFGRAD = ElementwiseRule("diffgrad", plan=diffgrad_plan, kernel=diffgrad_kernel,
                           init=zeros_state("exp_avg", "exp_avg_sq", "previous_grad"))


class DiffGrad(TorchstepOptimizer):
    r"""diffGrad: Adam step damped by ξ = sigmoid(|g_{t−1} − g_t|) elementwise.

    .. math::
        g' &= g + \lambda\theta \quad(\text{coupled L2, on a copy}) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g',\quad v \leftarrow \beta_2 v + (1-\beta_2) g'^2 \\
        \xi &= \sigma(|g_{\text{prev}} - g'|),\quad g_{\text{prev}} \leftarrow g' \ (g_{\text{prev}}=0 \text{ at } t=1) \\
        \theta &\leftarrow \theta - \eta \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m\odot\xi}{\sqrt{v}+\epsilon}

    (HF flavour: ε is not bias-corrected.)

    Args:
        params: parameters or groups.
        lr: η (default 1e-3, paper).
        betas: (β1, β2) (default (0.9, 0.999)).
        eps: ε added to √v (default 1e-8).
        weight_decay: coupled L2 λ added to the gradient copy (default 0).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.

    Paper: Dubey et al., "diffGrad: An Optimization Method for Convolutional Neural
    Networks", IEEE TNNLS 2019, arXiv 1909.11015.  Official code: shivram1987/diffGrad
    ``diffGrad_v2.py``.  Deviation avoided: the original ``diffGrad.py`` (v1) stored the
    gradient tensor without copying it, so with in-place reused ``.grad`` buffers
    ``Δg ≡ 0`` and ``ξ ≡ 0.5``; we keep a copy (v2 behaviour, the README's recommendation).
    No pip package of the official code exists, so parity is tested at equation level.
    Memory: 3 buffers (``exp_avg``, ``exp_avg_sq``, ``previous_grad``).
    """

    rule = DIFFGRAD

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))
