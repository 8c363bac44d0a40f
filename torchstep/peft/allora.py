r"""ALLoRA — dropout-free, scaling-free LoRA whose factor gradients are scaled by a norm-dependent coefficient
(a wrapper over any optimizer).

The rule (**reconstructed**, see below), for each LoRA factor θ ∈ {A, B} and each row i of θ::

    c_i = 1 / √(‖θ_i‖² + 1/η²)          (c ≤ η, reached at θ_i = 0;  c ≈ 1/‖θ_i‖ once ‖θ_i‖ ≫ 1/η)
    apply_to="grad"   (default):  the base optimizer sees g̃_i = c_i · g_i
    apply_to="update":            θ_{k+1} = θ_k + c ⊙ (base_step(θ_k, g) − θ_k)   (an adaptive per-row learning rate)

c is computed at θ_k, before the step.  Rows: A ∈ R^{r×d_in} — one coefficient per rank component; B ∈ R^{d_out×r} —
one per output feature (``norm="tensor"``: one per matrix, ``norm="element"``: |θ| per entry).  Every other
parameter of the base optimizer passes through unchanged.

Because c depends only on parameters, scaling the per-sample gradients (the paper's words) equals scaling the
mini-batch gradient (linearity), so no per-sample gradients are computed.  Over an Adam-type base a per-tensor
positive rescaling of the gradient is cancelled by the second moment (exactly up to ε on the first step, nearly so
while c varies slowly) — which is why ``apply_to="update"`` exists.

Paper: Huang, Balestriero, "ALLoRA: Adaptive Learning Rate Mitigates LoRA Fatal Flaws", arXiv 2410.09692 (ICLR 2025
submission #13143; no official code found).

Confirmed [abstract, read 2026-12 on arxiv.org/html/2410.09692v1 and OpenReview 7X65yoKl3Y]: ALLoRA is
dropout-free and scaling-free LoRA, and it "scal[es] the per sample and per parameter gradients with a coefficient
inversely proportional to parameters' ℓ2 norm".  **Reconstructed (unverified — the §4 text could not be
retrieved)**: the exact form 1/√(‖θ‖² + 1/η²) (the card's recalled form), that the norm is taken per row, that η
is a separate constant (default 1.0 here, a choice of this library), and where the coefficient acts relative to an
adaptive optimizer (gradient by default).

Args:
    base: any ``torch.optim.Optimizer`` (torch's or torchstep's) over the adapter parameters.
    model: the LoRA model (peft ``get_peft_model`` output or duck-typed modules with ``lora_A``/``lora_B``
        ``ModuleDict``s); its active A/B weights get the coefficient.
    eta: η > 0 (default 1.0; reconstructed): the coefficient's value at θ = 0.
    norm: ``"row"`` (default), ``"tensor"`` or ``"element"``.
    apply_to: ``"grad"`` (default) or ``"update"``.
    adaptive: ``False`` forces c = 1: ``step`` is then exactly ``base.step`` (bit-exact plain LoRA + base).
    check_config: refuse (``ValueError``) LoRA layers with scaling ≠ 1 or dropout > 0 — ALLoRA removes both; use
        ``lora_alpha = r`` (``use_rslora=False``) and ``lora_dropout = 0``.

Shares the base's ``param_groups`` and ``state``; ``state_dict``/``load_state_dict`` are the base's (ALLoRA keeps no
state of its own; η, norm and apply_to are stored in each group as ``allora_*`` so a checkpoint records them).
``.grad`` values are never modified: with ``apply_to="grad"`` the ``.grad`` attribute of a LoRA factor points at a
scaled copy during ``base.step()`` only and is put back to the caller's tensor afterwards, even if the step raises.
Memory: a transient scaled copy of each LoRA gradient (``"grad"``) or of each LoRA factor (``"update"``).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .mgpo import active_adapters, find_lora_layers

NORMS = ("row", "tensor", "element")
APPLY_TO = ("grad", "update")


def allora_coefficient(theta: Tensor, eta: float = 1.0, norm: str = "row") -> Tensor:
    r"""c = 1/√(‖θ_row‖² + 1/η²), broadcastable to θ (rows: dim 0; 0-/1-D tensors use the whole tensor)."""
    if not eta > 0:
        raise ValueError(f"Invalid eta: {eta!r} (valid range: > 0)")
    if norm not in NORMS:
        raise ValueError(f"Invalid norm: {norm!r} (valid range: one of {NORMS})")
    t = theta.detach()
    if norm == "element":
        sq = t * t
    elif norm == "tensor" or t.dim() < 2:
        sq = (t * t).sum()
    else:
        sq = (t * t).flatten(1).sum(1).view(-1, *([1] * (t.dim() - 1)))
    return torch.rsqrt(sq + 1.0 / (eta * eta))


def _lora_factors(model: nn.Module, check_config: bool) -> dict[int, Tensor]:
    out: dict[int, Tensor] = {}
    layers = find_lora_layers(model)
    if not layers:
        raise ValueError("Invalid model: no LoRA adapters found (modules with lora_A/lora_B ModuleDicts)")
    for name, m in layers:
        for a in active_adapters(m):
            if check_config:
                s = float(getattr(m, "scaling", {}).get(a, 1.0))
                drop = getattr(m, "lora_dropout", {})
                d = drop[a] if a in drop else None
                p = getattr(d, "p", 0.0) if d is not None else 0.0
                if s != 1.0 or p > 0:
                    raise ValueError(f"Invalid model: ALLoRA is scaling-free and dropout-free, but LoRA layer "
                                     f"{name!r} (adapter {a!r}) has scaling {s} and dropout {p}; use lora_alpha = r, "
                                     "lora_dropout = 0 (or check_config=False)")
            for p in (m.lora_A[a].weight, m.lora_B[a].weight):
                out[id(p)] = p
    return out


class ALLoRA(torch.optim.Optimizer):
    __doc__ = __doc__

    def __init__(self, base: torch.optim.Optimizer, model: nn.Module, eta: float = 1.0, norm: str = "row",
                 apply_to: str = "grad", adaptive: bool = True, check_config: bool = True) -> None:
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"ALLoRA wraps a torch.optim.Optimizer, got {type(base).__name__}")
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"Invalid eta: {eta!r} (valid range: finite, > 0)")
        if norm not in NORMS:
            raise ValueError(f"Invalid norm: {norm!r} (valid range: one of {NORMS})")
        if apply_to not in APPLY_TO:
            raise ValueError(f"Invalid apply_to: {apply_to!r} (valid range: one of {APPLY_TO})")
        self.base = base
        self._defaults = {"allora_eta": float(eta), "allora_norm": norm, "allora_apply_to": apply_to}
        self.adaptive = bool(adaptive)
        self._factors = _lora_factors(model, check_config)
        super().__init__(base.param_groups, base.defaults)     # the same group dicts, not copies
        self.param_groups, self.state = base.param_groups, base.state
        for g in self.param_groups:
            self.init_group(g)
        in_opt = {id(p) for g in self.param_groups for p in g["params"]}
        if not in_opt & set(self._factors):
            raise ValueError("Invalid base: the optimizer holds none of the model's LoRA A/B weights")

    def init_group(self, group: dict[str, Any]) -> None:
        for k, v in self._defaults.items():
            group.setdefault(k, v)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if any(param_group is g for g in self.base.param_groups):     # torch's __init__ re-adding the base's groups
            return
        self.base.add_param_group(param_group)
        self.init_group(self.base.param_groups[-1])

    def __repr__(self) -> str:
        return f"ALLoRA({self.base!r})"

    def coefficients(self) -> dict[Tensor, Tensor]:
        """c per LoRA factor that has a gradient, at the current parameters (keys: the parameter tensors)."""
        out = {}
        for g in self.param_groups:
            for p in g["params"]:
                if id(p) in self._factors and p.grad is not None:
                    out[p] = allora_coefficient(p, g["allora_eta"], g["allora_norm"])
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.adaptive:
            self.base.step()
            return loss
        coef = self.coefficients()
        mode = {p: g["allora_apply_to"] for g in self.param_groups for p in g["params"] if p in coef}
        grads = [p for p in coef if mode[p] == "grad"]
        updates = [p for p in coef if mode[p] == "update"]
        originals = {p: p.grad for p in grads}
        before = {p: p.detach().clone() for p in updates}
        try:
            for p in grads:
                p.grad = originals[p] * coef[p].to(originals[p].dtype)   # a new tensor; the caller's is untouched
            self.base.step()
        finally:
            for p, g0 in originals.items():
                p.grad = g0
        for p, x0 in before.items():
            p.copy_(x0 + coef[p].to(x0.dtype) * (p - x0))
        return loss

    def state_dict(self) -> dict[str, Any]:
        return self.base.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base.load_state_dict(state_dict)
        self.param_groups, self.state = self.base.param_groups, self.base.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)


__all__ = ["ALLoRA", "allora_coefficient"]
