"""SPECTRA — soft spectral clipping of any base optimizer's update (a wrapper)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from ..ops.shapes import as_matrix, matrix_dims, shape_scale
from ..ops.spectral import soft_spectral_clip
from ._base import check_choice, check_range, evaluate_closure, scalar
from ._dtensor import is_dtensor, settled
from .wrapper import OptimizerWrapper


class Spectra(OptimizerWrapper):
    r"""Wrap ``base`` and replace its update ``U`` by a spectrally clipped one.

    With ``X_k`` the parameter before and ``X_{k+1}`` after ``base.step()``, η the group lr and λ its
    decoupled weight decay (``decoupled_weight_decay=True``; otherwise λ is taken as 0 and any decay
    stays inside ``U``):

    .. math::
        U &= (X_k - X_{k+1})/\eta - \lambda X_k \qquad\text{(the base direction)} \\
        U' &= (I + U U^\top/c^2)^{-1/2} U \qquad(\sigma \mapsto \sigma/\sqrt{1+\sigma^2/c^2} < c) \\
        X_{k+1} &= (1-\lambda\eta) X_k - s\,\eta\, U', \quad s = \sqrt{\max(1, \text{rows}/\text{cols})}

    Args:
        base: any ``torch.optim.Optimizer`` (torch's or torchstep's).
        c: clipping constant (default 1.0, the official class default; the paper's scripts use 5 at 160M
            and 10 at 780M with ``apply_to="all"``); ``inf`` makes the wrapper a bit-exact no-op.
        ns_steps: coupled Newton–Schulz steps of the inverse square root, run in fp32 (default 10; bf16
            diverges for ≥ 15 steps in the official code).
        apply_to: ``"2d"`` (default) — every ``ndim >= 2`` tensor, flattened to (out, prod(rest)); the
            official ``"2d"`` means ``ndim == 2`` exactly and leaves conv weights alone (our choice: a conv
            weight is a matrix here, as for every matrix rule).  ``"all"`` adds 0-/1-D tensors with the
            official vector map (unchanged when ‖U‖ ≤ c, else U/√(1 + (‖U‖/c)²)).
        pre_clip: optional constant of the same map applied to the raw gradients the base sees (paper: not
            recommended together with post-clipping; official default off).  As in the official code it
            touches matrices only (``ndim >= 2`` here), never 1-D tensors, whatever ``apply_to`` says.
        decoupled_weight_decay: take λ out of ``U`` as above (default True).
        c_warmup_steps: the official c schedule — for the first N steps c_t = c·η_peak/η_t (c·η constant
            during lr warm-up; η_peak is the group's ``initial_lr``, which torch's lr schedulers set); the
            optional WSD-phase decay of c is left to the user (``group["spectra_c"]`` is read every step).

    Hyperparameters live in the base's ``param_groups`` (``spectra_c``, ``spectra_pre_clip``) so schedules
    and checkpoints cover them (:class:`~torchstep.optim.wrapper.OptimizerWrapper` shares groups and state).
    Step hooks registered on the wrapper run around its whole step.  A step never ends half-applied: every
    clipped update is computed before any parameter is written, and if that raises, the parameters are put
    back to their values before the step (the base's state has then advanced by one step).  Pre-clipping
    swaps the caller's ``.grad`` tensors for clipped copies during ``base.step()`` and puts the originals
    back untouched (the one place a ``.grad`` attribute is reassigned; its values are never modified).

    Paper: Jiang, Semenov, Stich, "SPECTRA: Spectral Clipping…", ICML 2026, arXiv 2603.14315; official
    code mlolab/llm-spectral-clipping.  Memory: the base's state plus a transient copy of each parameter
    during the step.

    Under FSDP2 (DTensor parameters): the clipping map needs the whole matrix, so each clipped update (and
    pre-clipped gradient) is all-gathered, mapped identically on every rank, and its local shard kept — one
    all-gather and a full-size transient per matrix and step; the base runs on the shards.
    """

    def __init__(self, base: torch.optim.Optimizer, c: float = 1.0, ns_steps: int = 10, apply_to: str = "2d",
                 pre_clip: float | None = None, decoupled_weight_decay: bool = True, c_warmup_steps: int = 0) -> None:
        check_range("c", c, 0.0, lo_open=True)
        check_range("c_warmup_steps", c_warmup_steps, 0)
        check_range("ns_steps", ns_steps, 1)
        check_choice("apply_to", apply_to, ("2d", "all"))
        if pre_clip is not None:
            check_range("pre_clip", pre_clip, 0.0, lo_open=True)
        self.ns_steps, self.apply_to, self.decoupled = ns_steps, apply_to, decoupled_weight_decay
        self._group_defaults = dict(spectra_c=c, spectra_pre_clip=pre_clip, spectra_c_warmup_steps=c_warmup_steps,
                                    spectra_step=0)
        super().__init__(base)
        for group in self.param_groups:
            self.init_group(group)

    def init_group(self, group: dict[str, Any]) -> None:
        for key, value in self._group_defaults.items():
            group.setdefault(key, value)

    def _applies(self, p: Tensor) -> bool:
        return p.dim() >= 2 or self.apply_to == "all"

    def _clip(self, u: Tensor, c: float) -> Tensor:
        if is_dtensor(u):   # FSDP2: the spectral map needs the whole matrix — gathered, same result on every rank
            from torch.distributed.tensor import distribute_tensor
            return distribute_tensor(self._clip(settled(u).full_tensor(), c), u.device_mesh, u.placements,
                                     src_data_rank=None)
        return soft_spectral_clip(as_matrix(u) if u.dim() >= 2 else u, c, self.ns_steps).reshape(u.shape)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = evaluate_closure(closure)
        targets = [(g, p) for g in self.param_groups for p in g["params"]
                   if p.grad is not None and self._applies(p) and math.isfinite(g["spectra_c"])]
        before = [p.detach().clone() for _, p in targets]
        originals = [(p, p.grad, g["spectra_pre_clip"]) for g in self.param_groups if g["spectra_pre_clip"]
                     for p in g["params"] if p.grad is not None and p.dim() >= 2]
        try:
            for p, grad, c in originals:
                p.grad = self._clip(grad, c)
            self.base.step()
        finally:
            for p, grad, _ in originals:   # the caller's gradient tensors, untouched
                p.grad = grad
        try:
            results = [self._clipped_step(group, p, x0) for (group, p), x0 in zip(targets, before)]
        except BaseException:
            for (_, p), x0 in zip(targets, before):   # never a half-applied step
                p.copy_(x0)
            raise
        for (_, p), new in zip(targets, results):
            if new is not None:
                p.copy_(new)
        for group in self.param_groups:
            group["spectra_step"] += 1
        return loss

    def _clipped_step(self, group: dict[str, Any], p: Tensor, x0: Tensor) -> Tensor | None:
        lr = scalar(group["lr"])
        if lr == 0:
            return None
        lam = group.get("weight_decay", 0.0) if self.decoupled else 0.0
        direction = (x0 - p) / lr - lam * x0
        clipped = self._clip(direction, self._effective_c(group, lr))
        s = shape_scale("original", *matrix_dims(p)) if p.dim() >= 2 else 1.0
        return x0 * (1 - lam * lr) - s * lr * clipped

    @staticmethod
    def _effective_c(group: dict[str, Any], lr: float) -> float:
        """The official c schedule: during the first ``spectra_c_warmup_steps`` steps, c·η stays at its
        value at the peak lr (``initial_lr``, set by torch's lr schedulers), i.e. c_t = c·η_peak/η_t."""
        c = group["spectra_c"]
        if group["spectra_step"] < group["spectra_c_warmup_steps"] and "initial_lr" in group:
            return c * scalar(group["initial_lr"]) / lr
        return c
