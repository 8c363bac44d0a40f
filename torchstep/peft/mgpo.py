r"""LoRA-MGPO — momentum-guided weight perturbation of a LoRA model's frozen base weights (one forward/backward).

The rule (per LoRA ``Linear`` layer ℓ, merged-weight space, s = α/r; official code [code])::

    V_ℓ = s·(M_B·A + B·M_A)                       M_A, M_B: the optimizer's first moment of A, B
    ε_ℓ = −ρ · V_ℓ / (‖V_ℓ‖_F + 1e-12) · min(1/(ḡ_ℓ + 1e-12), 10)      (factor 1 before the first ḡ)
    ḡ_ℓ ← β·ḡ_ℓ + (1 − β)·‖s·(G_B·A + B·G_A)‖_F   after backward (first value = the raw norm, no bias correction)

    step:  W_ℓ ← W_ℓ + ε_ℓ → forward + backward (grads of A, B at W + ε) → restore W_ℓ → update ḡ → optimizer.step()

A layer is skipped (no perturbation) while its momentum is missing (first step), V is non-finite, or ‖V‖ ≤ 1e-12.
The sign follows the official code: ε points along −momentum, i.e. along the coming descent step (a
look-ahead), not SAM's +g ascent.

**GGPO (arXiv 2502.14538 v1) is not implemented.**  The v1 rule ("perturbations generated from gradient and weight
norms", a Gaussian perturbation with a covariance built from per-row norms of W' = W + sBA) is known here only from
the abstract and a secondary review that is cut off after the first covariance term.  The v1 paper text and the
v1 repository (llm172/LoRA-GGPO) could not be retrieved (searched 2026-12: only abstract pages and the v2 HTML
opening were found; the repository has no snapshot), so the covariance formula, its α/β/σ constants, the
normalisation and the schedule are unknown.  Implementing a guess would ship an unverified rule under a published
name; MGPO (the authors' own successor, v2 / EMNLP 2025 Findings) is implemented instead.

Paper: Chang, Guo, Chang, Wu, "LoRA-MGPO: Mitigating Double Descent in Low-Rank Adaptation via Momentum-Guided
Perturbation Optimization", arXiv 2502.14538 v2, EMNLP 2025 Findings.  Official code llm172/LoRA-MGPO (b45656c,
``lora_mgpo/trainer.py``, ``config.py``), read for the card (``shared/reference/peft.md`` §3.2); no code is copied.

Confirmed [code, re-read 2026-12 at b45656c]: V, ε, the ḡ EMA (first value raw), the 1e-12 constants, the clamp 10 on 1/ḡ (in the code, not in
the paper's docstring formula), the skip conditions, the moment keys ``exp_avg`` then ``momentum_buffer``, the
profiles ``nlu`` (ρ 0.05, β 0.9, AdamW β1 0.9) and ``nlg`` (ρ 0.01, β 0.8, AdamW β1 0.8).
Deviations (switches):

* ``restore="exact"`` (default): W is saved before the perturbation and copied back, so W is bitwise unchanged.
  ``restore="subtract"`` is the official in-place ``W -= ε`` with ε recomputed — ``(W + ε) − ε ≠ W`` in floating
  point, and in bf16 the drift accumulates every step.
* An optimizer without a first moment: the official code silently does nothing; here a state that exists but holds
  no moment raises ``RuntimeError`` (and an optimizer whose defaults say ``momentum=0`` is refused up front).
* ρ = 0 is allowed (no perturbation: bit-exact LoRA + optimizer); the official code requires ρ > 0.
* V, ε and ḡ are computed in ``promote(dtype, float32)`` — float32 as in the official code, except that float64
  models stay in float64 (the official code computes in float32 always).
* Several active adapters on one layer: their ε are summed and each keeps its own ḡ; the official code uses the
  first active adapter only (identical for the usual single adapter).

Memory: one Python float per layer (ḡ); transient per layer: ε (d_out×d_in) and, with ``restore="exact"``, a saved
copy of W (d_out×d_in).  Cost ≈ 4·d_out·d_in·r multiply-adds per layer per step (6 with ``"subtract"``).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

# official profiles [code, config.py]: mu = the AdamW β1 to use, lr = the paper's learning rate (informational)
PROFILES = {"nlu": {"rho": 0.05, "beta": 0.9, "mu": 0.9, "lr": 1e-4},
            "nlg": {"rho": 0.01, "beta": 0.8, "mu": 0.8, "lr": 2e-5}}
RESTORES = ("exact", "subtract")
MOMENT_KEYS = ("exp_avg", "momentum_buffer")
EPS = 1e-12
CLAMP = 10.0


def find_lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` for every module carrying ``lora_A``/``lora_B`` ``ModuleDict``s (peft's LoRA layers, or any
    duck-typed equivalent with ``scaling`` and ``base_layer``).  Raises ``ValueError`` for an adapter of rank 0."""
    out = [(n, m) for n, m in model.named_modules()
           if isinstance(getattr(m, "lora_A", None), nn.ModuleDict)
           and isinstance(getattr(m, "lora_B", None), nn.ModuleDict) and len(m.lora_A) > 0]
    for n, m in out:
        for a, sub in m.lora_A.items():
            w = getattr(sub, "weight", None)
            if w is not None and (w.dim() == 0 or w.shape[0] == 0):
                raise ValueError(f"Invalid model: LoRA layer {n!r} adapter {a!r} has rank 0 (valid range: r >= 1)")
    return out


def active_adapters(module: nn.Module) -> list[str]:
    """The module's active adapter names that exist in both ``lora_A`` and ``lora_B``."""
    names = getattr(module, "active_adapters", None)
    if names is None:
        names = getattr(module, "active_adapter", None) or list(module.lora_A.keys())
    if isinstance(names, str):
        names = [names]
    return [a for a in names if a in module.lora_A and a in module.lora_B]


def mgpo_perturbation(A: Tensor, B: Tensor, M_A: Tensor, M_B: Tensor, scaling: float, rho: float,
                      gbar: float | None) -> Tensor | None:
    r"""ε = −ρ·V/(‖V‖+1e-12)·min(1/(ḡ+1e-12), 10) with V = s·(M_B·A + B·M_A) (factor 1 when ``gbar is None``);
    ``None`` when the layer is skipped (non-finite V or ‖V‖ ≤ 1e-12).  Computed in
    ``promote(dtype, float32)``; shape of the (d_out×d_in) merged weight."""
    dt = torch.promote_types(A.dtype, torch.float32)
    A, B, M_A, M_B = (t.detach().to(dt) for t in (A, B, M_A, M_B))
    V = scaling * (M_B @ A + B @ M_A)
    if not torch.isfinite(V).all():
        return None
    norm = torch.linalg.vector_norm(V)
    if not norm > EPS:
        return None
    factor = 1.0 if gbar is None else min(1.0 / (gbar + EPS), CLAMP)
    return V * (-rho * factor / (norm + EPS))


class MGPO:
    r"""Momentum-guided perturbation for a LoRA model trained by any optimizer that keeps a first moment.

    Usage::

        mgpo = MGPO(model, optimizer, profile="nlu")
        for x, y in data:
            optimizer.zero_grad()
            with mgpo.perturbed():                 # W ← W + ε on every LoRA Linear
                loss_fn(model(x), y).backward()    # grads of A, B at W + ε
            # leaving the block restored W and updated ḡ from those grads
            optimizer.step()

    or ``loss = mgpo.step(closure)`` (the closure zeroes grads, runs forward + backward and returns the loss).
    Forward *and* backward must happen inside the block (W is restored in place on exit).

    Args:
        model: a model with LoRA ``Linear`` layers (peft's ``get_peft_model`` output or duck-typed modules with
            ``lora_A``/``lora_B`` ``ModuleDict``s, a ``scaling`` dict and ``base_layer``).
        optimizer: any ``torch.optim.Optimizer`` over the LoRA parameters whose per-parameter state holds a first
            moment (``exp_avg``: Adam/AdamW/torchstep Adam-type; ``momentum_buffer``: SGD with momentum > 0), or
            the key named by ``moment_key``.
        profile: ``"nlu"`` (ρ 0.05, β 0.9; default) or ``"nlg"`` (ρ 0.01, β 0.8) — the official profiles; set the
            optimizer's β1 to ``PROFILES[profile]["mu"]`` (0.9 / 0.8) and lr (1e-4 / 2e-5) yourself to match them.
        rho: perturbation radius ρ ≥ 0 (overrides the profile); 0 ⇒ no perturbation (bit-exact LoRA + optimizer).
        beta: ḡ EMA coefficient in [0, 1) (overrides the profile).
        restore: ``"exact"`` (default; saved copy, W bitwise unchanged) or ``"subtract"`` (official in-place).
        moment_key: state key of the first moment (default: try ``exp_avg`` then ``momentum_buffer``).
        skip_non_linear: LoRA layers whose ``base_layer`` is not ``nn.Linear`` raise ``ValueError`` unless True
            (then they are left unperturbed).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, profile: str = "nlu",
                 rho: float | None = None, beta: float | None = None, restore: str = "exact",
                 moment_key: str | None = None, skip_non_linear: bool = False) -> None:
        if profile not in PROFILES:
            raise ValueError(f"Invalid profile: {profile!r} (valid range: one of {tuple(PROFILES)})")
        rho = PROFILES[profile]["rho"] if rho is None else rho
        beta = PROFILES[profile]["beta"] if beta is None else beta
        if not (isinstance(rho, (int, float)) and math.isfinite(rho) and rho >= 0):
            raise ValueError(f"Invalid rho: {rho!r} (valid range: finite, >= 0)")
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ValueError(f"Invalid beta: {beta!r} (valid range: [0, 1))")
        if restore not in RESTORES:
            raise ValueError(f"Invalid restore: {restore!r} (valid range: one of {RESTORES})")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        d = optimizer.defaults
        if moment_key is None and "betas" not in d and d.get("momentum", None) == 0:
            raise ValueError(f"Invalid optimizer: {type(optimizer).__name__} with momentum=0 keeps no first moment; "
                             "MGPO needs one (use momentum > 0, an Adam-type optimizer, or name it with moment_key)")
        self.model, self.optimizer = model, optimizer
        self.rho, self.beta, self.restore, self.moment_key = float(rho), float(beta), restore, moment_key
        self.layers: dict[str, nn.Module] = {}
        for name, m in find_lora_layers(model):
            base = getattr(m, "base_layer", None)
            linear_like = isinstance(base, nn.Linear) or (getattr(m, "fan_in_fan_out", False)
                                                          and getattr(getattr(base, "weight", None), "ndim", 0) == 2)
            if not linear_like:
                if skip_non_linear:
                    continue
                raise ValueError(f"Invalid model: LoRA layer {name!r} wraps {type(getattr(m, 'base_layer', None)).__name__}, "
                                 "not nn.Linear (MGPO perturbs Linear weights; pass skip_non_linear=True to leave it)")
            self.layers[name] = m
        if not self.layers:
            raise ValueError("Invalid model: no LoRA adapters found (modules with lora_A/lora_B ModuleDicts)")
        self.gbar: dict[str, float] = {}      # key: "<layer>/<adapter>"
        self._saved: dict[str, Tensor] = {}
        self._applied: dict[str, Tensor] = {}

    # ----------------------------------------------------------------------------------------------- internals
    def _moment(self, p: Tensor) -> Tensor | None:
        state = self.optimizer.state.get(p)
        if not state:
            return None      # first step: no state yet
        keys = (self.moment_key,) if self.moment_key else MOMENT_KEYS
        for k in keys:
            v = state.get(k)
            if isinstance(v, Tensor):
                return v
        raise RuntimeError(f"{type(self.optimizer).__name__} keeps no first moment for a LoRA parameter "
                           f"(state keys {sorted(state)}; looked for {keys}); MGPO cannot perturb without one")

    def _pairs(self) -> Iterator[tuple[str, nn.Module, str, Tensor, Tensor, float]]:
        for name, m in self.layers.items():
            for a in active_adapters(m):
                A, B = m.lora_A[a].weight, m.lora_B[a].weight
                if A.requires_grad or B.requires_grad:
                    yield f"{name}/{a}", m, a, A, B, float(m.scaling[a])

    def epsilons(self) -> dict[str, Tensor]:
        """ε per LoRA layer (summed over its active adapters) from the current momentum and ḡ, in the layout of
        ``base_layer.weight`` (transposed for ``fan_in_fan_out`` layers); skipped layers are absent."""
        out: dict[str, Tensor] = {}
        if self.rho == 0:
            return out
        for key, m, _, A, B, s in self._pairs():
            M_A, M_B = self._moment(A), self._moment(B)
            if M_A is None or M_B is None:
                continue
            eps = mgpo_perturbation(A, B, M_A, M_B, s, self.rho, self.gbar.get(key))
            if eps is None:
                continue
            name = key.rsplit("/", 1)[0]
            if getattr(m, "fan_in_fan_out", False):
                eps = eps.T
            out[name] = out[name] + eps if name in out else eps
        return out

    def _apply(self) -> None:
        with torch.no_grad():
            for name, eps in self.epsilons().items():
                W = self.layers[name].base_layer.weight
                if self.restore == "exact":
                    self._saved[name] = W.detach().clone()
                W.add_(eps.to(W.dtype))
                self._applied[name] = eps

    def _remove(self) -> None:
        with torch.no_grad():
            if self.restore == "exact":
                for name, saved in self._saved.items():
                    self.layers[name].base_layer.weight.copy_(saved)
            else:   # official: subtract ε recomputed from the unchanged momentum / ḡ
                for name, eps in self.epsilons().items():
                    W = self.layers[name].base_layer.weight
                    W.sub_(eps.to(W.dtype))
        self._saved.clear()
        self._applied.clear()

    def update_gbar(self) -> None:
        """ḡ ← β·ḡ + (1−β)·‖s·(G_B·A + B·G_A)‖_F from the current grads (first value: the raw norm)."""
        with torch.no_grad():
            for key, _, _, A, B, s in self._pairs():
                if A.grad is None or B.grad is None:
                    continue
                dt = torch.promote_types(A.dtype, torch.float32)
                a, b, ga, gb = (t.detach().to(dt) for t in (A, B, A.grad, B.grad))
                g = float(torch.linalg.vector_norm(s * (gb @ a + b @ ga)))
                self.gbar[key] = g if key not in self.gbar else self.beta * self.gbar[key] + (1 - self.beta) * g

    # ----------------------------------------------------------------------------------------------- public
    @contextmanager
    def perturbed(self) -> Iterator[dict[str, Tensor]]:
        """Perturb W ← W + ε on entry; on exit restore W and update ḡ from the grads the block produced.  Yields
        the applied ε per layer (empty on the first step or with ρ = 0)."""
        self._apply()
        try:
            yield dict(self._applied)
        finally:
            self._remove()
        self.update_gbar()

    def step(self, closure: Callable[[], Any]) -> Any:
        """``closure`` (zero grads, forward, backward, return loss) at the perturbed point, then ``optimizer.step()``."""
        with self.perturbed():
            with torch.enable_grad():
                loss = closure()
        self.optimizer.step()
        return loss

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads with ``torch.load(..., weights_only=True)``)."""
        return {"gbar": dict(self.gbar), "rho": self.rho, "beta": self.beta, "restore": self.restore}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        unknown = set(state["gbar"]) - {k for k, *_ in self._pairs()}
        if unknown:
            raise ValueError(f"Invalid state: gbar keys {sorted(unknown)} match no LoRA layer of this model")
        if state["restore"] not in RESTORES:
            raise ValueError(f"Invalid state: restore {state['restore']!r} (valid range: one of {RESTORES})")
        self.gbar = {k: float(v) for k, v in state["gbar"].items()}
        self.rho, self.beta, self.restore = float(state["rho"]), float(state["beta"]), state["restore"]


__all__ = ["MGPO", "mgpo_perturbation", "find_lora_layers", "PROFILES"]
