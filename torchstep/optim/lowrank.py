"""Element-wise optimizers written as *directions*, so that a projection rule can run them on a subspace.

GaLore's general form is ``G̃ = P·ρ(PᵀG)`` with any element-wise optimizer ρ (paper §4); FRUGAL and Fira
run Adam on the subspace too.  A :class:`LowRankBase` is ρ written as

    state update + direction D and multiplier c, with the step  θ ← θ − η·c·back(D)

so that one projection rule serves every base, and the unprojected tensors of the same optimizer run the
same base directly (``back`` = identity).  Bases do not apply weight decay (the projection rules decide
where it goes).  ``first_moments`` / ``second_moments`` name the state tensors that are carried across a
subspace change when the moments are re-projected; any other state of the base is reset then.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..ops.moments import adam_direction, update_moments_
from ._base import check_range
from .lion import lion_direction


@dataclass(frozen=True)
class LowRankBase:
    """An element-wise optimizer as ``(init, direction)``.

    Args:
        name: the ``base=`` name.
        init: ``init(like, state, group)`` allocates state shaped like ``like`` (the projected shape).
        direction: ``direction(grad, state, group, t) -> (D, c)``: updates the state in place and returns the
            direction and its multiplier (the step is ``−η·c·D``); ``t`` is the 1-based step of this state.
        defaults: the base's own hyperparameters and their defaults.
        check: validates those hyperparameters.
        first_moments, second_moments: state keys re-projected linearly / with squared maps.
    """

    name: str
    init: Callable[[Tensor, dict, dict], None]
    direction: Callable[[Tensor, dict, dict, int], tuple[Tensor, float]]
    defaults: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict], None] = lambda group: None
    first_moments: tuple[str, ...] = ()
    second_moments: tuple[str, ...] = ()

    @property
    def state_keys(self) -> tuple[str, ...]:
        return self.first_moments + self.second_moments


def _zeros(*keys: str) -> Callable:
    def init(like, state, group):
        for key in keys:
            state[key] = torch.zeros_like(like)
    return init


def _adam_hf(grad, state, group, t):
    """The HF/original-code Adam that GaLore, Fira, FRUGAL and GradNormLoRP ship: ε inside the root,
    bias corrections folded into the multiplier ``√(1−β2ᵗ)/(1−β1ᵗ)``, ``mul_().add_()`` moment spelling."""
    beta1, beta2 = group["betas"]
    update_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2, lerp=False)
    return adam_direction(state["exp_avg"], state["exp_avg_sq"], t, beta1, beta2, group["eps"], eps_inside=True)


def _adam_torch(grad, state, group, t):
    """torch.optim.AdamW's flavour: ε after the bias-corrected root."""
    beta1, beta2 = group["betas"]
    update_moments_(state["exp_avg"], state["exp_avg_sq"], grad, beta1, beta2)
    return adam_direction(state["exp_avg"], state["exp_avg_sq"], t, beta1, beta2, group["eps"])


def _lion(grad, state, group, t):
    return lion_direction(grad, state["exp_avg"], group["betas"]), 1.0


def _sgd_init(like, state, group):
    if group["momentum"] > 0:
        state["momentum_buffer"] = torch.zeros_like(like)


def _sgd(grad, state, group, t):
    """torch.optim.SGD without dampening: ``b ← μb + g``; D = b (or g + μb with Nesterov); μ = 0: D = g."""
    mu = group["momentum"]
    if mu == 0:
        return grad, 1.0
    buf = state["momentum_buffer"].mul_(mu).add_(grad)
    return (grad.add(buf, alpha=mu) if group["nesterov"] else buf), 1.0


def _check_sgd(group):
    check_range("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
    if not isinstance(group["nesterov"], bool):
        raise ValueError(f"Invalid nesterov: {group['nesterov']!r} (valid range: True or False)")


def _adafactor_init(like, state, group):
    state["exp_avg"] = torch.zeros_like(like)
    if like.dim() == 2:
        state["exp_avg_sq_row"] = like.new_zeros(like.shape[0])
        state["exp_avg_sq_col"] = like.new_zeros(like.shape[1])
    else:
        state["exp_avg_sq"] = torch.zeros_like(like)


def _adafactor(grad, state, group, t):
    """Adafactor-style: factored second moment of ``g² + ε₁`` for matrices (row and column EMAs,
    ``v̂ = r cᵀ / mean(r)``), Adam's bias correction ``1 − β2ᵗ``, update clipping to RMS ≤ d, then β1
    momentum of the normalised update (Shazeer & Stern, arXiv 1804.04235, with β1 as GaLore uses it)."""
    beta1, beta2 = group["betas"]
    g2 = grad.square().add_(group["eps"])
    bc2 = 1 - beta2 ** t
    if grad.dim() == 2:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2).add_(g2.mean(1), alpha=1 - beta2)
        col.mul_(beta2).add_(g2.mean(0), alpha=1 - beta2)
        v = torch.outer(row / row.mean(), col).div_(bc2)   # normalise first: r·cᵀ of two ε₁-sized EMAs underflows
    else:
        v = state["exp_avg_sq"].mul_(beta2).add_(g2, alpha=1 - beta2).div(bc2)
    u = grad * v.rsqrt_()
    rms = u.square().mean().sqrt()
    u.div_((rms / group["clip_threshold"]).clamp_min_(1.0))
    return state["exp_avg"].lerp_(u, 1 - beta1), 1.0


def _check_adafactor(group):
    check_range("clip_threshold", group["clip_threshold"], 0.0, lo_open=True)


BASES: dict[str, LowRankBase] = {b.name: b for b in [
    LowRankBase("adamw", _zeros("exp_avg", "exp_avg_sq"), _adam_hf, dict(betas=(0.9, 0.999), eps=1e-6),
                first_moments=("exp_avg",), second_moments=("exp_avg_sq",)),
    LowRankBase("adamw-torch", _zeros("exp_avg", "exp_avg_sq"), _adam_torch, dict(betas=(0.9, 0.999), eps=1e-8),
                first_moments=("exp_avg",), second_moments=("exp_avg_sq",)),
    LowRankBase("lion", _zeros("exp_avg"), _lion, dict(betas=(0.9, 0.99)), first_moments=("exp_avg",)),
    LowRankBase("sgd", _sgd_init, _sgd, dict(momentum=0.0, nesterov=False), _check_sgd,
                first_moments=("momentum_buffer",)),
    LowRankBase("adafactor", _adafactor_init, _adafactor, dict(betas=(0.9, 0.999), eps=1e-30, clip_threshold=1.0),
                _check_adafactor, first_moments=("exp_avg",)),
]}


def register_base(base: LowRankBase) -> None:
    """Make a custom base available as ``base=<its name>`` (groups store the name, so checkpoints stay
    plain data)."""
    BASES[base.name] = base


def check_base_hyperparameters(base: str, given: dict[str, Any]) -> None:
    """Keyword arguments a projection optimizer passes to its base must be the base's (``TypeError``
    otherwise, as for any unexpected keyword)."""
    unknown = set(given) - set(resolve_base(base).defaults)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {sorted(unknown)} for base {base!r}; "
                        f"its hyperparameters: {sorted(resolve_base(base).defaults)}")


def resolve_base(name: str) -> LowRankBase:
    """The base called ``name`` (one of :data:`BASES`)."""
    if name not in BASES:
        raise ValueError(f"Invalid base: {name!r} (valid range: one of {tuple(BASES)})")
    return BASES[name]


__all__ = ["LowRankBase", "BASES", "register_base", "resolve_base", "check_base_hyperparameters"]
