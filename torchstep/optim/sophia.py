"""Sophia — clipped, diagonal-Hessian-preconditioned sign momentum (SophiaG, SophiaH)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ..ops.hessian import hutchinson_diagonal_groups
from ._base import (_LOW_PRECISION, ElementwiseRule, TorchstepOptimizer, add_scaled_, check_choice, check_range, scalar,
                    zeros_state)


def _sophia_plan(state, group) -> dict:
    lr = scalar(group["lr"])
    return dict(decay=1.0 - lr * group["weight_decay"], step=-lr)


def _sophia_kernel(denominator):
    def kernel(p, grad, state, group, c) -> None:
        beta1 = group["betas"][0]
        exp_avg = state["exp_avg"]
        if group["weight_decay"] != 0:
            p.mul_(c["decay"])
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        # sign(m)·min(|m|/d, 1) ≡ clamp(m/d, −1, 1) for the positive denominator d
        add_scaled_(p, exp_avg.div(denominator(state["hessian"], group)).clamp_(-1.0, 1.0), c["step"])
    return kernel


def gnb_denominator(hessian: Tensor, group: dict) -> Tensor:
    """Official Sophia-G: ρ·b·h + ε (the GNB estimate is never negative)."""
    return hessian.mul(group["rho"] * group["bs"]).add_(group["eps"])


def hutchinson_denominator(hessian: Tensor, group: dict) -> Tensor:
    """Paper form max(ρ·h, ε): Hutchinson estimates can be negative on non-convex losses."""
    return hessian.mul(group["rho"] * group["bs"]).clamp_min_(group["eps"])


def _check_sophia(group) -> None:
    check_range("rho", group["rho"], 0.0, lo_open=True)
    check_range("bs", group["bs"], 0.0, lo_open=True)


def _check_sophia_h(group) -> None:
    _check_sophia(group)
    check_range("samples", group["samples"], 1)
    check_choice("distribution", group["distribution"], ("rademacher", "gaussian"))


_INIT = zeros_state("exp_avg", "hessian")
SOPHIA_G = ElementwiseRule("sophiag", plan=_sophia_plan, kernel=_sophia_kernel(gnb_denominator), init=_INIT,
                           check=_check_sophia)
SOPHIA_H = ElementwiseRule("sophiah", plan=_sophia_plan, kernel=_sophia_kernel(hutchinson_denominator), init=_INIT,
                           check=_check_sophia_h)


class _Sophia(TorchstepOptimizer):
    """Shared Hessian refresh; the two variants differ in their rule (denominator) and estimator."""

    @torch.no_grad()
    def _accumulate_hessian(self, items: Sequence[tuple[dict, Tensor, Tensor]]) -> None:
        """``h ← β2 h + (1−β2)·estimate``; non-finite estimates follow the group's ``nonfinite`` policy."""
        for group, p, estimate in self._finite_only(list(items), "Hessian-diagonal estimate"):
            hessian = self.state_for(p, group)["hessian"]
            beta2 = group["betas"][1]
            hessian.mul_(beta2).add_(estimate.to(hessian.dtype), alpha=1 - beta2)


class SophiaG(_Sophia):
    r"""Sophia-G: Sophia with the Gauss–Newton–Bartlett (GNB) Hessian-diagonal estimator.

    Every step:

    .. math::
        \theta &\leftarrow \theta (1-\eta\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        \theta &\leftarrow \theta - \eta\, \mathrm{clip}\!\left(\frac{m}{\rho\, b\, h + \epsilon}, 1\right)

    Every *k* steps (you call :meth:`update_hessian` after a backward pass of the GNB loss,
    i.e. cross-entropy against labels sampled from the model,
    :func:`torchstep.ops.gnb_sampled_loss`): ``h ← β2 h + (1−β2) ĝ⊙ĝ``.  ``b`` (``bs``) is the
    number of tokens/examples per step: it enters the step, not the stored ``h``.  Before the
    first estimate ``h = 0`` and the update is ``−η·sign(m)`` (sign momentum).

    Args:
        params: parameters or groups.
        lr: η (default 1e-4, official code; GPT-2 125M used 6e-4 with ``k = 10`` steps between refreshes).
        betas: (β1 of the momentum, β2 of the Hessian EMA) (default (0.965, 0.99)).
        rho: ρ (default 0.04; GPT-2 125M 0.05).
        weight_decay: decoupled λ (default 0.1; GPT-2 125M 0.2).
        bs: b, tokens/examples per step — pass the real one (default 5120).
        eps: ε of the denominator (default 1e-15).
        maximize, nonfinite: the policies of every torchstep optimizer (a non-finite Hessian estimate follows
            ``nonfinite`` too).
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.
    Keep the share of unclipped coordinates in 0.1–0.5.  bf16/fp16 gradients are squared in fp32.

    Training loop (the official script clips the GNB gradient to norm 1 before the refresh, as it clips
    the training gradient)::

        opt = SophiaG(model.parameters(), lr=6e-4, rho=0.05, weight_decay=0.2, bs=batch_tokens)
        for step, (x, y) in enumerate(loader):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            if step % k == k - 1:                          # refresh the Hessian estimate
                gnb_sampled_loss(model(x)).backward()       # labels sampled from the model
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.update_hessian(); opt.zero_grad(set_to_none=True)

    Paper: Liu et al., "Sophia: A Scalable Stochastic Second-order Optimizer for Language
    Model Pre-training", ICLR 2024, arXiv 2305.14342.  Official code: Liuhong99/Sophia; parity
    tested against pip ``sophia-opt``.  The paper writes ``θ ← θ − η·clip(m/max(γh, ε), 1)``; the
    code computes ``−lr·sign(m)·min(|m|/(ρ·bs·h + ε), 1)``: the same η (``lr``), with the paper's γ
    equal to ``ρ·bs`` (the stored ``h`` is the estimate from the mini-batch-mean GNB gradient, ``bs``
    rescales it per token) and ``+ε`` instead of ``max(·, ε)``.  We follow the code.  Memory: 2 buffers.
    """

    rule = SOPHIA_G

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 0.1, bs: float = 5120, eps: float = 1e-15,
                 *, maximize: bool = False, nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, bs=bs,
                                      eps=eps, maximize=maximize, nonfinite=nonfinite, compile=compile))

    @torch.no_grad()
    def update_hessian(self) -> None:
        """``h ← β2 h + (1−β2) ĝ⊙ĝ`` from the current ``.grad`` (the GNB loss's gradient)."""
        # square in fp32: a bf16/fp16 gradient of 1e-4 squares to 0 in fp16 before reaching fp32 state
        self._accumulate_hessian([(g, p, p.grad.float().square() if p.grad.dtype in _LOW_PRECISION
                                   else p.grad.square()) for g in self.param_groups for p in g["params"]
                                  if p.grad is not None])


class SophiaH(_Sophia):
    r"""Sophia-H: Sophia with Hutchinson's Hessian-diagonal estimator ``u ⊙ (∇²L u)``.

    Same step as :class:`SophiaG` with ``b = 1`` and the paper's guarded denominator:
    ``θ ← θ(1−ηλ) − η·clip(m/max(ρ h, ε), 1)`` (a Hutchinson estimate can be negative, where
    ``ρh + ε`` would flip the step's sign); ``h ← β2 h + (1−β2) u⊙(Hu)`` whenever you call
    :meth:`update_hessian` with a loss that still holds its graph::

        if step % k == 0:
            opt.update_hessian(loss_fn(model(x), y))   # builds grads with create_graph=True

    Args:
        params: parameters or groups.
        lr: η (default 6e-4).
        betas: (β1, β2) (default (0.96, 0.99)).
        rho: ρ (default 0.01).
        weight_decay: decoupled λ (default 0).
        eps: ε of ``max(ρh, ε)`` (default 1e-12).
        samples: Hutchinson probes per refresh, read per group (default 1).
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` probes, read per group.
        bs: multiplies ρ (default 1).
        maximize, nonfinite: the policies of every torchstep optimizer.
        compile: False (eager, the reference), True (one Inductor graph per group) or a
            ``torch.compile`` backend name — see :mod:`torchstep.optim._compiled`.
    A parameter the loss does not depend on gets zero curvature (no error).

    Relation to pip ``pytorch-optimizer``'s SophiaH (4.1), whose update is
    ``θ ← θ(1 − η'λ') − η'·clamp(m/max(h, ε'), ±p)`` with Gaussian probes at steps 1, 1+k, …:
    ``clamp(m/max(h, ε'), ±p) = p·clip(m/max(p·h, p·ε'), 1)``, so it equals this class with
    ``lr = η'·p, rho = p, eps = p·ε', weight_decay = λ'/p, distribution="gaussian"`` and
    :meth:`update_hessian` called before the step at those steps (tested to 1e-10 over 20 steps).
    The defaults differ: ours give η and ρ equal to theirs (6e-2·1e-2 and 1e-2), but our ε = 1e-12 is
    100× their equivalent p·ε' = 1e-14, and our probes are Rademacher.  Paper: arXiv 2305.14342 (Sophia-H
    variant); no official PyTorch code.  Memory: 2 buffers; one extra Hessian-vector product per refresh.
    """

    rule = SOPHIA_H

    def __init__(self, params: Any, lr: float = 6e-4, betas: tuple[float, float] = (0.96, 0.99),
                 rho: float = 0.01, weight_decay: float = 0.0, eps: float = 1e-12,
                 samples: int = 1, distribution: str = "rademacher", *, bs: float = 1.0,
                 maximize: bool = False, nonfinite: str = "skip", compile: bool | str = False) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay, eps=eps,
                                      samples=samples, distribution=distribution, bs=bs,
                                      maximize=maximize, nonfinite=nonfinite, compile=compile))

    def update_hessian(self, loss: Tensor | Callable[[], Tensor],
                       generator: torch.Generator | None = None) -> None:
        """Refresh ``h`` from ``loss`` (a tensor with graph, or a closure returning one)."""
        if callable(loss):
            with torch.enable_grad():
                loss = loss()
        groups = [(g, [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        estimates = hutchinson_diagonal_groups(loss, [(ps, g["samples"], g["distribution"]) for g, ps in groups],
                                               generator=generator)
        self._accumulate_hessian([(g, p, e) for (g, ps), es in zip(groups, estimates) for p, e in zip(ps, es)])
