"""AdamW as a rule: the fallback of every hybrid optimizer and the benchmark's ``adamw`` arm (one code path)."""
from __future__ import annotations

import math
from typing import Any

from ..ops.moments import bias_corrections, corrected_root, update_moments_
from ._base import ElementwiseRule, TorchstepOptimizer, addcdiv_scaled_, scalar, step_of, zeros_state


def adamw_plan(state, group) -> dict:
    """Host side: the decay factor, the step size −η/(1−β1ᵗ) and √(1−β2ᵗ)."""
    t, lr = step_of(state), scalar(group["lr"])
    beta1, beta2 = group["betas"]
    bc1, bc2 = bias_corrections(t, beta1, beta2)
    return dict(decay=1.0 - lr * group["weight_decay"], step=-lr / bc1, root_bc2=math.sqrt(bc2))


def adamw_kernel(p, grad, state, group, c) -> None:
    """torch.optim.AdamW's for-loop update, operation for operation (ε after the bias-corrected root), except
    √(1−β2ᵗ) by ``math.sqrt`` (torch: ``** 0.5``, which can differ in the last bit)."""
    if group["weight_decay"] != 0:
        p.mul_(c["decay"])
    update_moments_(state["exp_avg"], state["exp_avg_sq"], grad, *group["betas"])
    addcdiv_scaled_(p, state["exp_avg"], corrected_root(state["exp_avg_sq"], c["root_bc2"], group["eps"]), c["step"])


ADAMW = ElementwiseRule("adamw", plan=adamw_plan, kernel=adamw_kernel, init=zeros_state("exp_avg", "exp_avg_sq"))


class AdamW(TorchstepOptimizer):
    r"""AdamW: Adam with decoupled weight decay, exactly ``torch.optim.AdamW`` (for-loop path).

    .. math::
        \theta &\leftarrow \theta(1-\eta\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        \theta &\leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,\frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    Args:
        params: parameters or groups.
        lr: learning rate η (default 1e-3).
        betas: (β1, β2), default (0.9, 0.999).
        eps: ε added after the bias-corrected square root (default 1e-8).
        weight_decay: decoupled decay λ, applied as θ(1 − ηλ) (default 1e-2, torch's).
        maximize, nonfinite: the policies of every torchstep optimizer (README).
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled`.

    Paper: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", arXiv 1711.05101.  Equal to
    ``torch.optim.AdamW(foreach=False)`` to ~1e-15 relative (tested; the same operations, but √(1−β2ᵗ) is
    ``math.sqrt`` here and ``** 0.5`` in torch); it is the rule every hybrid's fallback groups run (kept
    bit-identical to their 0.1.0 update) and the benchmark's ``adamw`` arm.
    Memory: 2 buffers.
    """

    rule = ADAMW

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))
