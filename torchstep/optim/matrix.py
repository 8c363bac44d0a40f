"""Matrix rules as a pipeline of small stages, and the stages that recur across methods.

A :class:`MatrixRule` is composed, not subclassed: for a group's tensors it runs

1. ``direction(grad, state, group)`` per tensor (momentum, Nesterov, … — updates the state);
2. the flattened ``(out, prod(rest))`` view (:func:`torchstep.ops.shapes.as_matrix`; any ``ndim >= 2``);
3. ``lmo(matrices, group)`` over the whole list, so Newton–Schulz runs batched;
4. ``post(u, state, group)`` per tensor (a normalisation after the LMO: NorMuon's rows, SWAN's rescale);
5. ``layer_factors(states, group)`` — per-tensor lr multipliers that depend on the whole group (Lanton);
6. ``θ ← θ(1 − ηλ) − η·scale(u, group)·factor·u`` — decoupled decay with the base lr, then the step.

A new matrix method is its rule (a ``MatrixRule(...)`` of stages from here or its own file) plus a
:class:`~torchstep.optim.hybrid.MatrixHybrid` class naming it.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..ops.newton_schulz import NS_METHODS, PRESETS, newton_schulz_many, newton_schulz_many_split, singular_value_bound
from ..ops.shapes import SHAPE_SCALES, as_matrix, shape_scale
from ._base import Rule, check_choice, check_range, decay_, scalar

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}

Stage = Callable[..., Any]


def _none(*_: Any) -> None:
    return None


def raw_gradient(grad: Tensor, state: dict, group: dict) -> Tensor:
    return grad


def unit_scale(u: Tensor, group: dict) -> float:
    return 1.0


@dataclass(frozen=True)
class MatrixRule(Rule):
    """A matrix rule composed of stages (the pipeline in the module docstring).

    Args:
        name: the rule's ``algo`` name.
        lmo: ``lmo(matrices, group) -> list`` over the group's flattened matrices (batched).
        direction: ``direction(grad, state, group) -> Tensor`` (default: the raw gradient).
        init: ``init(p, state, group)`` lazy state (default: none).
        post: ``post(u, state, group) -> Tensor`` after the LMO, or None.
        layer_factors: ``layer_factors(states, group) -> list`` of per-tensor lr multipliers (None entries:
            none), or None.
        scale: ``scale(u, group) -> float`` shape scale of the step (default 1).
        check: ``check(group)`` validation of the rule's hyperparameters.
        accepts_vectors: ``accepts_vectors(group) -> bool`` — True lets 0-/1-D tensors in (sign LMOs).
    """

    name: str
    lmo: Stage
    direction: Stage = raw_gradient
    init: Stage = _none
    post: Stage | None = None
    layer_factors: Stage | None = None
    scale: Stage = unit_scale
    check: Stage = _none
    accepts_vectors: Callable[[dict], bool] = lambda group: False   # noqa: E731 (sign LMOs take any shape)

    def validate(self, group):
        self.check(group)
        if not self.accepts_vectors(group):
            bad = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
            if bad:
                raise ValueError(f"Invalid algo: {group['algo']!r} needs tensors with ndim >= 2, got shapes {bad}")

    def init_state(self, p, state, group):
        self.init(p, state, group)

    def update(self, params, grads, states, group):
        lr = scalar(group["lr"])
        directions = [self.direction(g, s, group) for g, s in zip(grads, states)]
        updates = self.lmo([as_matrix(d) if d.dim() >= 2 else d for d in directions], group)
        if self.post is not None:
            updates = [self.post(u, s, group) for u, s in zip(updates, states)]
        factors = self.layer_factors(states, group) if self.layer_factors is not None else [None] * len(params)
        for p, u, factor in zip(params, updates, factors):
            if factor is not None:
                u = u * factor
            decay_(p, lr, group["weight_decay"])
            p.add_(u.reshape_as(p), alpha=-lr * self.scale(u, group))


# ---------------------------------------------------------------------- stages shared by several rules
def init_momentum(p: Tensor, state: dict, group: dict) -> None:
    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def momentum_direction(grad: Tensor, state: dict, group: dict, nesterov: bool | None = None) -> Tensor:
    """EMA momentum ``b ← μb + (1−μ)g``; returns ``(1−μ)g + μb`` with Nesterov, else ``b``."""
    buf, mu = state["momentum_buffer"], group["momentum"]
    buf.lerp_(grad, 1 - mu)
    return grad.lerp(buf, mu) if (group["nesterov"] if nesterov is None else nesterov) else buf


def newton_schulz_lmo(matrices: list[Tensor], group: dict) -> list[Tensor]:
    """Batched Newton–Schulz with the group's ``ns_steps/ns_preset/ns_dtype/ns_method``; with
    ``split_across_ranks`` each data-parallel rank orthogonalises a share and broadcasts it.  A group without
    ``ns_method`` (a checkpoint saved before it existed) runs the standard iteration."""
    run = newton_schulz_many_split if group.get("split_across_ranks") else newton_schulz_many
    return run(matrices, steps=group["ns_steps"], preset=group["ns_preset"], compute_dtype=NS_DTYPES[group["ns_dtype"]],
               method=group.get("ns_method", "standard"))


def sign_lmo(matrices: list[Tensor], group: dict) -> list[Tensor]:
    return [m.sign() for m in matrices]


def adjust_lr_scale(u: Tensor, group: dict) -> float:
    """Muon's shape scale chosen by the group's ``adjust_lr`` (:func:`torchstep.ops.shapes.shape_scale`)."""
    return shape_scale(group["adjust_lr"], u.shape[0], u.shape[1])


_bound = functools.lru_cache(maxsize=None)(singular_value_bound)


def certified_spectral_scale(u: Tensor, group: dict) -> float:
    """√(d_out/d_in)/ν with ν the largest singular value the group's Newton–Schulz can output: then
    ``‖step‖₂ ≤ lr·√(d_out/d_in)`` for any input (MuonPP, Lanton)."""
    return shape_scale("spectral_norm", u.shape[0], u.shape[1]) / _bound(group["ns_steps"], group["ns_preset"])


def check_newton_schulz(group: dict) -> None:
    check_range("ns_steps", group["ns_steps"], 1, 99)
    check_choice("ns_preset", group["ns_preset"], tuple(PRESETS))
    check_choice("ns_dtype", group["ns_dtype"], tuple(NS_DTYPES))
    check_choice("ns_method", group.get("ns_method", "standard"), NS_METHODS)


def check_muon(group: dict) -> None:
    check_newton_schulz(group)
    check_choice("adjust_lr", group["adjust_lr"], SHAPE_SCALES)


MUON = MatrixRule("muon", lmo=newton_schulz_lmo, direction=momentum_direction, init=init_momentum,
                  scale=adjust_lr_scale, check=check_muon)
