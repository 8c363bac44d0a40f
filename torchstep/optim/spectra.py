"""SPECTRA — soft spectral clipping of any base optimizer's update (a wrapper)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..ops.newton_schulz import as_matrix
from ..ops.spectral import soft_spectral_clip
from ._base import check_choice, check_range, evaluate_closure, scalar


class Spectra(torch.optim.Optimizer):
    r"""Wrap ``base`` and replace its update ``U`` by a spectrally clipped one.

    With ``X_k`` the parameter before and ``X_{k+1}`` after ``base.step()``, η the group lr and λ its
    decoupled weight decay (``decoupled_weight_decay=True``; otherwise λ is taken as 0 and any decay
    stays inside ``U``):

    .. math::
        U &= (X_k - X_{k+1})/\eta - \lambda X_k \qquad\text{(the base direction)} \\
        U' &= (I + U U^\top/c^2)^{-1/2} U \qquad(\sigma \mapsto \sigma/\sqrt{1+\sigma^2/c^2} < c) \\
        X_{k+1} &= (1-\lambda\eta) X_k - s\,\eta\, U', \quad s = \sqrt{\max(1, \text{rows}/\text{cols})}

    1-D tensors (``apply_to="all"``) use ``U/√(1 + (‖U‖/c)²)``; conv weights are flattened to
    (out, in·kh·kw).  ``c = inf`` makes the wrapper a bit-exact no-op.  Optional ``pre_clip`` applies
    the same map with its own constant to the raw gradients the base optimizer sees (paper: not
    recommended together with post-clipping); the caller's ``.grad`` tensors are swapped for the
    clipped copies during ``base.step()`` and put back untouched.

    Hyperparameters live in the base's ``param_groups`` (``spectra_c``, ``spectra_pre_clip``) so schedules
    and checkpoints cover them; ``state``/``param_groups``/``state_dict`` delegate to the base, and the
    base's step hooks are shared (they run around the base's own step, i.e. before the clipping).
    Defaults: ``c=1.0, ns_steps=10, apply_to="2d"`` (official class defaults; the paper's scripts use
    c = 5 at 160M and c = 10 at 780M with ``apply_to="all"``).  The inverse square root runs in fp32
    (bf16 diverges for ≥ 15 steps in the official code).

    Paper: Jiang, Semenov, Stich, "SPECTRA: Spectral Clipping…", ICML 2026, arXiv 2603.14315; official
    code mlolab/llm-spectral-clipping.  ``c_warmup_steps=N`` applies the official c schedule: for the first N
    steps c_t = c·η_peak/η_t (c·η constant during lr warm-up; η_peak is the group's ``initial_lr``, which
    torch's lr schedulers set); the optional WSD-phase decay of c is left to the user (``group["spectra_c"]``
    is read every step).  Memory: the base's state plus a
    transient copy of each parameter during the step.
    """

    def __init__(self, base: torch.optim.Optimizer, c: float = 1.0, ns_steps: int = 10, apply_to: str = "2d",
                 pre_clip: float | None = None, decoupled_weight_decay: bool = True, c_warmup_steps: int = 0) -> None:
        check_range("c", c, 0.0, lo_open=True)
        check_range("c_warmup_steps", c_warmup_steps, 0)
        check_range("ns_steps", ns_steps, 1)
        check_choice("apply_to", apply_to, ("2d", "all"))
        if pre_clip is not None:
            check_range("pre_clip", pre_clip, 0.0, lo_open=True)
        self.base = base
        self.ns_steps, self.apply_to, self.decoupled = ns_steps, apply_to, decoupled_weight_decay
        for group in base.param_groups:
            group.setdefault("spectra_c", c)
            group.setdefault("spectra_pre_clip", pre_clip)
            group.setdefault("spectra_c_warmup_steps", c_warmup_steps)
            group.setdefault("spectra_step", 0)
        # share, do not copy: schedulers, hooks and checkpoints see one set of groups and state
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state
        self._optimizer_step_pre_hooks = base._optimizer_step_pre_hooks
        self._optimizer_step_post_hooks = base._optimizer_step_post_hooks
        self._optimizer_state_dict_pre_hooks = base._optimizer_state_dict_pre_hooks
        self._optimizer_state_dict_post_hooks = base._optimizer_state_dict_post_hooks
        self._optimizer_load_state_dict_pre_hooks = base._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_post_hooks = base._optimizer_load_state_dict_post_hooks

    def __repr__(self) -> str:
        return f"Spectra({self.base!r})"

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups = self.base.param_groups
        self.state = self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def _applies(self, p: Tensor) -> bool:
        return p.dim() >= 2 or self.apply_to == "all"

    def _clip(self, u: Tensor, c: float) -> Tensor:
        return soft_spectral_clip(as_matrix(u) if u.dim() >= 2 else u, c, self.ns_steps).view_as(u)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        targets = [(g, p) for g in self.param_groups for p in g["params"]
                   if p.grad is not None and self._applies(p) and math.isfinite(g["spectra_c"])]
        before = [p.detach().clone() for _, p in targets]
        originals = [(p, p.grad, g["spectra_pre_clip"]) for g in self.param_groups if g["spectra_pre_clip"]
                     for p in g["params"] if p.grad is not None and self._applies(p)]
        try:
            for p, grad, c in originals:
                p.grad = self._clip(grad, c)
            self.base.step()
        finally:
            for p, grad, _ in originals:   # the caller's gradient tensors, untouched
                p.grad = grad
        for (group, p), x0 in zip(targets, before):
            lr = scalar(group["lr"])
            if lr == 0:
                continue
            lam = group.get("weight_decay", 0.0) if self.decoupled else 0.0
            direction = (x0 - p) / lr - lam * x0
            clipped = self._clip(direction, self._effective_c(group, lr))
            rows, cols = as_matrix(p).shape if p.dim() >= 2 else (1, 1)
            p.copy_(x0 * (1 - lam * lr) - math.sqrt(max(1.0, rows / cols)) * lr * clipped)
        for group in self.param_groups:
            group["spectra_step"] += 1
        return loss

    @staticmethod
    def _effective_c(group: dict[str, Any], lr: float) -> float:
        """The official c schedule: during the first ``spectra_c_warmup_steps`` steps, c·η stays at its
        value at the peak lr (``initial_lr``, set by torch's lr schedulers), i.e. c_t = c·η_peak/η_t."""
        c = group["spectra_c"]
        if group["spectra_step"] < group["spectra_c_warmup_steps"] and "initial_lr" in group:
            return c * scalar(group["initial_lr"]) / lr
        return c
