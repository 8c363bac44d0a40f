"""Schedule-Free AdamW and SGD (Defazio et al., "The Road Less Scheduled", arXiv 2405.15682)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._base import ElementwiseRule, TorchstepOptimizer, add_scaled_, check_range, invalid, scalar, step_of


def _sub_scaled_(x: Tensor, y: Tensor, c: float | Tensor) -> Tensor:
    """``x ← x − c·y`` (the official ``sub_(y, alpha=c)`` for a float, a 0-d tensor in a compiled step)."""
    return x.sub_(y, alpha=c) if not isinstance(c, Tensor) else x.sub_(y * c)


def _plan(adam: bool):
    def plan(state, group) -> dict:
        """Host side: the warmed-up lr γ, the running max of γ and the weight sum (Python floats in the state,
        updated here), the averaging weight c, the y step size γ(β(1 − c) − 1) and 1 − β2ᵗ."""
        k = step_of(state) - 1
        warmup = group["warmup_steps"]
        lr = scalar(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
        state["lr_max"] = max(lr, state["lr_max"])
        weight = (k + 1) ** group["r"] * state["lr_max"] ** group["weight_lr_power"]
        state["weight_sum"] += weight
        ckp1 = weight / state["weight_sum"] if state["weight_sum"] else 0.0
        beta = group["betas"][0] if adam else group["momentum"]
        c = dict(lr=lr, ckp1=ckp1, y_step=lr * (beta * (1 - ckp1) - 1))
        if adam:
            c["bc2"] = 1 - group["betas"][1] ** (k + 1)
        return {key: float(v) for key, v in c.items()}
    return plan


def _kernel(adam: bool):
    def kernel(p, grad, state, group, c) -> None:
        """One step in the y-form of the official ``*ScheduleFree`` classes (the parameter holds y):

        ``g̃ = g/(√(v/bc2) + ε)`` (AdamW; SGD: g) ``+ λ·y``;  ``y ← lerp(y, z, c) + η(β(1 − c) − 1)·g̃``;
        ``z ← z − η·g̃``;  ``c = w_t/Σw``, ``w_t = t^r·(max lr so far)^p_w``."""
        z = state["z"]
        if adam:
            beta2 = group["betas"][1]
            exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            direction = grad / exp_avg_sq.div(c["bc2"]).sqrt_().add_(group["eps"])
        else:
            direction = grad.clone()
        if group["weight_decay"] != 0:
            direction.add_(p, alpha=group["weight_decay"])
        p.lerp_(end=z, weight=c["ckp1"])
        add_scaled_(p, direction, c["y_step"])
        _sub_scaled_(z, direction, c["lr"])
    return kernel


def _init(adam: bool):
    def init(p, state, group):
        state["z"] = p.detach().clone(memory_format=torch.preserve_format)
        if adam:
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["weight_sum"], state["lr_max"] = 0.0, -1.0      # Python floats: no device sync, plain data
    return init


def _check(group):
    check_range("warmup_steps", group["warmup_steps"], 0)
    check_range("r", group["r"], 0.0)
    check_range("weight_lr_power", group["weight_lr_power"], 0.0)
    if "momentum" in group:
        check_range("momentum", group["momentum"], 0.0, 1.0, lo_open=True, hi_open=True)


_PLAN_STATE = ("lr_max", "weight_sum")   # host floats the plan reads and updates
SF_ADAMW = ElementwiseRule("schedulefree-adamw", plan=_plan(True), kernel=_kernel(True),
                           init=_init(True), check=_check, plan_state=_PLAN_STATE)
SF_SGD = ElementwiseRule("schedulefree-sgd", plan=_plan(False), kernel=_kernel(False),
                         init=_init(False), check=_check, plan_state=_PLAN_STATE)


class ScheduleFree(TorchstepOptimizer):
    """Base of the Schedule-Free optimizers: the parameters hold the gradient point y while training;
    :meth:`eval` swaps in the averaged point x (evaluate, save the weights), :meth:`train` swaps y back.

    Args:
        params: parameters or groups.
        defaults: the hyperparameters.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        super().__init__(params, {**defaults, "train_mode": True})

    def _interpolation(self, group) -> float:
        return group["momentum"] if "momentum" in group else group["betas"][0]

    @torch.no_grad()
    def eval(self) -> None:
        """Parameters ← x = y + (1 − 1/β)(z − y) (the averaged iterate).  BatchNorm statistics were gathered
        at y: recompute them at x (a few forward passes in train mode) before evaluating."""
        self._switch(False)

    @torch.no_grad()
    def train(self) -> None:
        """Parameters ← y = (1 − β)z + βx (where gradients are taken)."""
        self._switch(True)

    def _switch(self, train: bool) -> None:
        """eval() keeps the training point y aside (one copy of the parameters while in eval mode) so that
        train() restores it bit-exactly — the official lerp back and forth does not round-trip."""
        for group in self.param_groups:
            if group["train_mode"] == train:
                continue
            beta = self._interpolation(group)
            for p in group["params"]:
                state = self.state.get(p, {})
                if "z" not in state:
                    continue
                if train:
                    p.copy_(state.pop("y"))
                else:
                    state["y"] = p.detach().clone(memory_format=torch.preserve_format)
                    p.lerp_(end=state["z"].to(p.dtype), weight=1 - 1 / beta)
            group["train_mode"] = train

    def _validate(self, group):
        if not isinstance(group["train_mode"], bool):
            raise invalid("train_mode", group["train_mode"], "True or False")
        super()._validate(group)

    @torch.no_grad()
    def step(self, closure=None):
        if not all(g["train_mode"] for g in self.param_groups):
            raise RuntimeError(f"{type(self).__name__}.step() in eval mode: call optimizer.train() first")
        return super().step(closure)


class ScheduleFreeAdamW(ScheduleFree):
    r"""Schedule-Free AdamW: no lr schedule; an online average of the iterates replaces it.

    .. math::
        y_t &= (1-\beta_1) z_t + \beta_1 x_t \quad(\text{gradient taken at } y)\\
        z_{t+1} &= z_t - \gamma_t\big(g_t/(\sqrt{v_t/(1-\beta_2^t)}+\epsilon) + \lambda y_t\big),\qquad
        x_{t+1} = (1-c_{t+1})\,x_t + c_{t+1} z_{t+1} \\
        c_{t+1} &= w_t/\textstyle\sum_{i\le t} w_i,\qquad w_t = t^r\,(\max_{i\le t}\gamma_i)^{p_w},\qquad
        \gamma_t = \eta\cdot\min(1, t/\text{warmup})

    Args:
        params: parameters or groups.
        lr: η (default 0.0025; the README: 1–10× a usual AdamW lr).
        betas: (β1 = the interpolation β, β2) (default (0.9, 0.999); 0.95/0.98 for long runs).
        eps: ε outside the root (default 1e-8).
        weight_decay: λ, applied at y inside the step (default 0).
        warmup_steps: linear warm-up of γ (default 0).
        r: polynomial weighting power of the average (default 0).
        weight_lr_power: p_w (default 2).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled` (one graph per group: the warm-up, the
            averaging weights and the lr reach it as numbers).

    Use no external lr scheduler.  Call ``opt.eval()`` before evaluating or saving weights and ``opt.train()``
    before training again (HF Trainer calls them when present); the optimizer starts in train mode (the
    official class starts in eval mode and refuses to step until ``train()``; here ``step()`` refuses only in
    eval mode).  BatchNorm: recompute the statistics at x.
    Paper: Defazio, Yang, Mehta, Mishchenko, Khaled, Cutkosky, "The Road Less Scheduled", arXiv 2405.15682.
    Parity: pip ``schedulefree`` ``AdamWScheduleFree`` (tested).  Deviations: the averaging weights are kept
    per parameter (the official per group; equal when every parameter steps every step, and a skipped
    non-finite step leaves them untouched here); ``p.grad`` is never modified (the official divides it in
    place); ``train()`` after ``eval()`` restores y bit-exactly from a copy kept during eval (the official
    re-interpolates, which does not round-trip).  Memory: z and v (2 buffers); x is never stored (recovered
    from y and z); in eval mode one more copy (y).
    """

    rule = SF_ADAMW

    def __init__(self, params: Any, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, *, maximize: bool = False, nonfinite: str = "skip",
                 compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r, weight_lr_power=weight_lr_power,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))


class ScheduleFreeSGD(ScheduleFree):
    r"""Schedule-Free SGD: :class:`ScheduleFreeAdamW`'s averaging over plain gradient steps
    (``z ← z − γ(g + λy)``, interpolation β = ``momentum``).

    Args:
        params: parameters or groups.
        lr: η (default 1.0; the README: 10–50× a usual SGD lr).
        momentum: the interpolation β in (0, 1) (default 0.9).
        weight_decay: λ at y (default 0).
        warmup_steps, r, weight_lr_power: as :class:`ScheduleFreeAdamW` (defaults 0, 0, 2).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a ``torch.compile``
            backend name — see :mod:`torchstep.optim._compiled` (one graph per group: the warm-up, the
            averaging weights and the lr reach it as numbers).

    Paper: arXiv 2405.15682.  Parity: pip ``schedulefree`` ``SGDScheduleFree`` (tested).  Memory: z (1 buffer).
    """

    rule = SF_SGD

    def __init__(self, params: Any, lr: float = 1.0, momentum: float = 0.9, weight_decay: float = 0.0,
                 warmup_steps: int = 0, r: float = 0.0, weight_lr_power: float = 2.0, *, maximize: bool = False,
                 nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                      r=r, weight_lr_power=weight_lr_power, maximize=maximize, nonfinite=nonfinite,
                                      compile=compile))


__all__ = ["ScheduleFree", "ScheduleFreeAdamW", "ScheduleFreeSGD"]
