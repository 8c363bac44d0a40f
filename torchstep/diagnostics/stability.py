"""Linear stability and the edge of stability (reference card: diagnostics.md §3): step-size thresholds for GD,
heavy-ball and Nesterov momentum and Adam, the Wu–Su SGD linear-stability conditions, batch sharpness, and
:class:`SharpnessMonitor`, which tracks sharpness and ``tr H`` against the optimizer's *current* thresholds.

Provenance of every formula (tags as in the card):

* **[paper]** GD on a quadratic is stable iff ``λ_max(H) < 2/η``; Cohen et al. 2021 (arXiv 2103.00065): full-batch
  GD trains at the edge of stability, λ_max rising to and hovering at ``2/η``.
* **[paper]** Adam: Cohen et al. 2022 (arXiv 2207.14484, abstract): the preconditioned sharpness ``λ_max(P⁻¹H)``
  equilibrates at the stability threshold ``38/η`` for β1 = 0.9; the general form ``(2 + 2β1)/(η(1 − β1))``
  [secondary summary] is also **[derived]** here for a frozen preconditioner.  ``P`` for ``torch.optim.Adam(W)``
  **[derived]** from its update ``θ ← θ − η·m/((1 − β1ᵗ)(√(v/(1 − β2ᵗ)) + ε))``: ``P = (1 − β1ᵗ)(√(v/(1 − β2ᵗ)) + ε)``.
  Weight decay is ignored (coupled decay adds ``λ_wd`` to ``H``; decoupled decay shrinks by ``1 − ηλ_wd``).
* **[derived]** (a quadratic, exact; the values Cohen et al. quote for momentum are recalled, not read) heavy ball
  ``b ← βb + (1 − τ)g, θ ← θ − ηb`` (``torch.optim.SGD(momentum=β, dampening=τ)``): ``λ < (2 + 2β)/(η(1 − τ))``;
  Nesterov (``nesterov=True``): ``λ < (2 + 2β)/(η(1 + 2β))``.  Tested at 0.99×/1.01× against torch's optimizers.
* **[paper, abstract]** Wu & Su 2023 (arXiv 2305.17490): a global minimum linearly stable for SGD has
  ``tr H ≤ 2/η``.  The batch-size form is not in the abstract; **[derived]** here (card §3): the mean-square
  operator ``T(M) = E[(I − ηH_ξ)M(I − ηH_ξ)]`` satisfies ``ρ(T) ≥ ⟨I, T(I)⟩/P``, so stability needs
  ``η·E tr(H_ξ²) ≤ 2 tr H``, i.e. ``η[(1 − 1/B) tr H² + (1/B)·mean_i tr H_i²] ≤ 2 tr H`` for with-replacement
  batches — and, with rank-1 ``H_i = ∇f_i∇f_iᵀ`` (square loss, scalar output), ``tr H ≤ 2B/η``.  Tested on the card's
  worked data: ``tr H ≤ 2/η`` holds at B = 1 and *fails* at B ≥ 2 while the derived form holds.
* **[secondary]** Mulayoff & Michaeli (arXiv 2306.07850): batches without replacement have the second moment of a
  full-batch step w.p. ``1 − p`` and a single-sample step w.p. ``p = (n − B)/(B(n − 1))`` (tested exactly by
  enumerating batches).
* **[abstract]** Andreyev & Beneventano (arXiv 2412.20553): under mini-batch SGD, *batch sharpness*
  ``E_B[g_BᵀH_Bg_B/‖g_B‖²]`` is what stabilises at ``2/η``.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from ..ops.moments import adam_denominator
from .hessian import (CurvatureOperator, Operator, _random_vector, _ScaledOperator, hutchinson_trace,
                      lanczos_eigenvalues)
from .monitor import LossFn, Monitor

_RULES = ("gd", "heavy_ball", "nesterov", "adam")


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"Invalid {name}: {value!r} (valid range: > 0)")
    return value


def _unit(name: str, value: float) -> float:
    value = float(value)
    if not 0 <= value < 1:
        raise ValueError(f"Invalid {name}: {value!r} (valid range: 0 <= {name} < 1)")
    return value


def gd_threshold(lr: float) -> float:
    """``2/η`` [paper]: GD on a quadratic is stable iff ``λ_max(H) < 2/η``.  (The threshold functions are O(1):
    no products, microseconds.)"""
    return 2.0 / _positive("lr", lr)


def heavy_ball_threshold(lr: float, momentum: float, dampening: float = 0.0) -> float:
    """``(2 + 2β)/(η(1 − τ))`` [derived; the τ = 0 value is the one Cohen et al. quote, recalled]: the largest
    stable curvature for ``torch.optim.SGD(lr=η, momentum=β, dampening=τ)`` (38/η at β = 0.9)."""
    beta, tau = _unit("momentum", momentum), _unit("dampening", dampening)
    return (2 + 2 * beta) / (_positive("lr", lr) * (1 - tau))


def nesterov_threshold(lr: float, momentum: float) -> float:
    """``(2 + 2β)/(η(1 + 2β))`` [derived]: ``torch.optim.SGD(momentum=β, nesterov=True)`` (13.571/η at β = 0.9)."""
    beta = _unit("momentum", momentum)
    return (2 + 2 * beta) / (_positive("lr", lr) * (1 + 2 * beta))


def adam_threshold(lr: float, beta1: float) -> float:
    """``(2 + 2β1)/(η(1 − β1))``, the bound on the *preconditioned* sharpness ``λ_max(P⁻¹H)`` [paper: 38/η at
    β1 = 0.9 (Cohen et al. 2022); the general form derived for a frozen preconditioner]."""
    beta1 = _unit("beta1", beta1)
    return (2 + 2 * beta1) / (_positive("lr", lr) * (1 - beta1))


def detect_rule(optimizer: torch.optim.Optimizer) -> str:
    """The stability rule of an optimizer: ``"gd"``/``"heavy_ball"``/``"nesterov"`` for ``torch.optim.SGD`` (from
    the first group's momentum), ``"adam"`` for an optimizer whose groups have ``betas`` and whose state keeps
    ``exp_avg_sq`` (torch's Adam/AdamW, torchstep's AdamW, …), else ``"gd"`` with a warning (no threshold known)."""
    group = optimizer.param_groups[0]
    if isinstance(optimizer, torch.optim.SGD):
        if not group.get("momentum", 0.0):
            return "gd"
        return "nesterov" if group.get("nesterov", False) else "heavy_ball"
    adam_like = "betas" in group and ("Adam" in type(optimizer).__name__
                                      or any("exp_avg_sq" in s for s in optimizer.state.values()))
    if adam_like:
        return "adam"
    warnings.warn(f"No stability threshold is known for {type(optimizer).__name__}; using GD's 2/lr",
                  RuntimeWarning, stacklevel=2)
    return "gd"


def _constant(rule: str, group: dict[str, Any]) -> float:
    """The threshold times the learning rate (``c`` in ``c/η``) for one parameter group."""
    if rule == "gd":
        return 2.0
    if rule == "heavy_ball":
        return heavy_ball_threshold(1.0, group.get("momentum", 0.0), group.get("dampening", 0.0))
    if rule == "nesterov":
        return nesterov_threshold(1.0, group.get("momentum", 0.0))
    if "betas" not in group:
        raise ValueError("rule='adam' needs parameter groups with betas (an Adam-type optimizer)")
    return adam_threshold(1.0, group["betas"][0])


def optimizer_thresholds(optimizer: torch.optim.Optimizer, rule: str = "auto") -> list[float]:
    """Per parameter group, the current threshold ``c/lr`` (lr read from ``param_groups`` now, so schedules
    are followed); ``rule`` ``"auto"`` (:func:`detect_rule`) or one of ``gd``/``heavy_ball``/``nesterov``/``adam``."""
    rule = _check_rule(optimizer, rule)
    return [_constant(rule, g) / _positive("lr", g["lr"]) for g in optimizer.param_groups]


def _check_rule(optimizer: torch.optim.Optimizer, rule: str) -> str:
    if rule == "auto":
        return detect_rule(optimizer)
    if rule not in _RULES:
        raise ValueError(f"Invalid rule: {rule!r} (valid range: 'auto', {', '.join(map(repr, _RULES))})")
    return rule


# ----------------------------------------------------------------------------------------- Wu & Su
class SGDStability(NamedTuple):
    """Linear (mean-square) stability of SGD at an interpolating minimum (module docstring for provenance):

    ``radius``/``stable``: the exact spectral radius of ``T(M) = E[(I − ηH_ξ)M(I − ηH_ξ)]`` and ``radius ≤ 1``;
    ``trace``; ``paper_bound = 2/η`` and ``paper_holds`` (Wu & Su's ``tr H ≤ 2/η``); ``lhs = η·E tr(H_ξ²)``,
    ``rhs = 2 tr H`` and ``derived_holds`` (the derived necessary condition); ``derived_trace_bound = 2/(η·p)`` — 2B/η
    with replacement, 2B(n−1)/(η(n−B)) without (the derived consequence for rank-1 per-example Hessians)."""

    radius: float
    stable: bool
    trace: float
    paper_bound: float
    paper_holds: bool
    lhs: float
    rhs: float
    derived_holds: bool
    derived_trace_bound: float


def _per_example(hessians: Tensor) -> Tensor:
    if hessians.ndim == 2:  # per-example output gradients ∇f_i: H_i = ∇f_i ∇f_iᵀ
        hessians = hessians[:, :, None] * hessians[:, None, :]
    if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ValueError(f"Invalid hessians shape {tuple(hessians.shape)} (valid: (n, P, P) or gradients (n, P))")
    if hessians.shape[1] > 64:
        raise ValueError(f"P = {hessians.shape[1]} is too large for the exact P²×P² operator (valid: P <= 64)")
    return hessians.double()


_UNIT_TOL = 1e-12   # |eigenvalue| ≤ 1 + this counts as stable (rounding of the exact 1 of a singular H)


def _mixture(n: int, batch_size: int, replacement: bool) -> float:
    """``p`` with ``E[H_ξ⊗H_ξ] = (1 − p)·H⊗H + p·mean_i H_i⊗H_i``."""
    if not isinstance(batch_size, int) or batch_size < 1 or (not replacement and batch_size > n):
        raise ValueError(f"Invalid batch_size: {batch_size!r} (valid range: an int >= 1, <= n = {n} "
                         "without replacement)")
    if replacement:
        return 1.0 / batch_size
    return (n - batch_size) / (batch_size * (n - 1)) if n > 1 else 0.0


def _radius(hessians: Tensor, lr: float, p: float) -> float:
    H = hessians.mean(0)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    second = (1 - p) * torch.kron(H, H) + p * torch.einsum("nij,nkl->ikjl", hessians, hessians).reshape(
        H.shape[0] ** 2, -1) / hessians.shape[0]
    T = torch.eye(H.shape[0] ** 2, dtype=H.dtype) - lr * (torch.kron(H, eye) + torch.kron(eye, H)) + lr ** 2 * second
    return float(torch.linalg.eigvalsh(T).abs().max())


def sgd_linear_stability(hessians: Tensor, lr: float, batch_size: int = 1, *,
                         replacement: bool = True) -> SGDStability:
    """Exact and bound-based linear stability of SGD (step ``η = lr``, batch ``B``) at a minimum with per-example
    Hessians ``hessians`` (n, P, P) — or per-example output gradients (n, P), ``H_i = ∇f_i∇f_iᵀ`` (the square-loss
    Hessian at an interpolating minimum).  ``replacement``: i.i.d. batches (``p = 1/B``) or batches without
    replacement (Mulayoff & Michaeli's ``p = (n − B)/(B(n − 1))``).  See :class:`SGDStability`.

    Cost: one ``P²×P²`` symmetric eigendecomposition (P ≤ 64; O(P⁶)); no model products.  Measured (CPU, one
    thread): the card's data (n = 6, P = 3) 0.4–0.5 ms; n = 30, P = 20: 20–23 ms."""
    hessians, lr = _per_example(hessians), _positive("lr", lr)
    p = _mixture(hessians.shape[0], batch_size, replacement)
    H = hessians.mean(0)
    radius = _radius(hessians, lr, p)
    trace = float(H.trace())
    second = (1 - p) * float((H @ H).trace()) + p * float(torch.einsum("nij,nji->", hessians, hessians)) / len(hessians)
    lhs, rhs = lr * second, 2 * trace
    return SGDStability(radius, radius <= 1 + _UNIT_TOL, trace, 2 / lr, trace <= 2 / lr, lhs, rhs, lhs <= rhs,
                        2 / (lr * p) if p > 0 else math.inf)      # 2B/η with replacement (p = 1/B)


def sgd_critical_lr(hessians: Tensor, batch_size: int = 1, *, replacement: bool = True,
                    rtol: float = 1e-12) -> float:
    """The largest stable step size of SGD at the minimum (``radius = 1``), by bisection on ``(0, 2/λ_max(H)]``
    (SGD is never more stable than GD: the mean-square operator's Rayleigh quotient at ``u uᵀ`` is ≥ ``(1 − ηλ)²``
    by Jensen).  On the card's worked data: 1.189750 (B = 1), 1.686565, 1.927839, 2.059787 (B = 4; tested).
    Cost: ≈ 40 bisection steps of :func:`sgd_linear_stability`'s eigendecomposition; 12–13 ms on the card's data."""
    hessians = _per_example(hessians)
    if not (rtol > 0):
        raise ValueError(f"Invalid rtol: {rtol!r} (valid range: > 0)")
    p = _mixture(hessians.shape[0], batch_size, replacement)
    lo, hi = 0.0, 2.0 / float(torch.linalg.eigvalsh(hessians.mean(0))[-1])
    # a singular H (P > n: the usual interpolating minimum) leaves T an eigenvalue 1 up to rounding: the same
    # tolerance as sgd_linear_stability, and a cap on the bisection
    for _ in range(200):
        if hi - lo <= rtol * hi:
            break
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _radius(hessians, mid, p) <= 1 + _UNIT_TOL else (lo, mid)
    return (lo + hi) / 2


def batch_sharpness(model: nn.Module, loss_fn: LossFn, batch: tuple[Any, Any], *, mode: str = "eval",
                    reduction: str = "mean") -> float:
    """``g_BᵀH_Bg_B/‖g_B‖²`` on one batch (Andreyev & Beneventano's batch sharpness is its expectation over
    batches: average calls over batches).  ``nan`` for a zero gradient.  Cost: one gradient + one HVP; 5.0–5.5 ms
    on the reference model of :mod:`~torchstep.diagnostics.hessian`."""
    op = CurvatureOperator(model, loss_fn, batch, mode=mode, reduction=reduction)
    g = op.gradient()
    norm2 = float(g @ g)
    return float(g @ (op @ g)) / norm2 if norm2 > 0 else float("nan")


# ------------------------------------------------------------------------------------------- monitor
class SharpnessMonitor(Monitor):
    """Every ``every`` steps: the sharpness λ_max (largest *algebraic* Hessian eigenvalue, Lanczos warm-started
    from the previous eigenvector) and Hutchinson's ``tr H``, compared with the optimizer's current stability
    thresholds (lr and momentum read from ``param_groups`` at each measurement, so schedules are followed).

    Args:
        every: measure at steps ``0, every, 2·every, …``.
        data: the fixed evaluation data (a batch or a list of batches); default the current training batch.
        rule: ``"auto"`` (:func:`detect_rule`), ``"gd"``, ``"heavy_ball"``, ``"nesterov"`` or ``"adam"``.
        preconditioned: for Adam-type optimizers also measure ``λ_max(P⁻¹H)`` with ``P`` from the optimizer's
            ``exp_avg_sq`` state (module docstring) against ``(2 + 2β1)/(η(1 − β1))`` (= 38/η at β1 = 0.9).
        trace_samples: Hutchinson probes for ``tr H`` (0 disables).
        batch_sharpness: also record the current batch's ``gᵀHg/‖g‖²``.
        lanczos_steps, tol: Lanczos budget and tolerance (see :func:`lanczos_eigenvalues`).
        mode, reduction: as for :class:`~torchstep.diagnostics.hessian.CurvatureOperator`.
        eos_fraction: flag ``eos = 1`` when ``ratio ≥ eos_fraction`` (card: 0.9).
        seed: seed of the monitor's own generator (probes and start vectors).

    Records (``nan`` where not measured): ``lr`` (the common lr, else ``nan``), ``sharpness``, ``lambda_min`` (the
    smallest Ritz value, an upper estimate of λ_min; a warning is issued once when ``|λ_min| > λ_max`` —
    magnitude-ranking tools would then report λ_min as the sharpness), ``converged``, ``threshold`` (the rule's
    ``c/η``: 2/η, (2+2β)/η, …, and for Adam the bound on the *preconditioned* sharpness), ``ratio`` (the quantity
    the rule bounds over its threshold: ``λ_max(H)/threshold``, for Adam ``λ_max(P⁻¹H)/threshold`` — only with
    ``preconditioned=True``; with per-group learning rates the exact ``λ_max(D^{1/2}HD^{1/2})``, ``D =
    diag(η_g/c_g)``, resp. ``D = diag(η_g/(c_g P))``), ``eos`` (``ratio ≥ eos_fraction``), ``trace``,
    ``trace_halfwidth`` (95 % CI), ``trace_ratio`` (``tr(ηH)/2``, Wu & Su's ``tr H ≤ 2/η``, plain SGD only),
    ``precond_sharpness`` (Adam), ``batch_sharpness`` and ``batch_ratio`` (non-Adam rules) and ``hvps``.
    Parameters outside the optimizer count with lr 0 (they do not move).

    Cost per measurement: ≤ ``lanczos_steps`` + ``trace_samples`` HVPs (×2 each with per-group learning rates,
    + ``lanczos_steps`` for ``preconditioned``, + 1 gradient and 1 HVP for ``batch_sharpness``).  Measured on the
    reference model of :mod:`~torchstep.diagnostics.hessian` with the defaults and plain SGD: 0.06–0.07 s (18 HVPs).
    """

    name = "sharpness"

    def __init__(self, every: int = 1, *, data: Any = None, rule: str = "auto", preconditioned: bool = False,
                 trace_samples: int = 10, batch_sharpness: bool = False, lanczos_steps: int = 20,
                 tol: float = 1e-4, mode: str = "eval", reduction: str = "mean", eos_fraction: float = 0.9,
                 seed: int = 0) -> None:
        super().__init__(every)
        if rule != "auto" and rule not in _RULES:
            raise ValueError(f"Invalid rule: {rule!r} (valid range: 'auto', {', '.join(map(repr, _RULES))})")
        if not isinstance(trace_samples, int) or trace_samples < 0:
            raise ValueError(f"Invalid trace_samples: {trace_samples!r} (valid range: an int >= 0)")
        if not isinstance(lanczos_steps, int) or lanczos_steps < 1:
            raise ValueError(f"Invalid lanczos_steps: {lanczos_steps!r} (valid range: an int >= 1)")
        if not tol > 0:
            raise ValueError(f"Invalid tol: {tol!r} (valid range: > 0)")
        if not 0 < eos_fraction <= 1:
            raise ValueError(f"Invalid eos_fraction: {eos_fraction!r} (valid range: (0, 1])")
        if mode not in ("eval", "train"):
            raise ValueError(f"Invalid mode: {mode!r} (valid range: 'eval' or 'train')")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction: {reduction!r} (valid range: 'mean' or 'sum')")
        self.data, self.rule, self.preconditioned, self.trace_samples = data, rule, preconditioned, trace_samples
        self.batch_sharpness, self.lanczos_steps, self.tol = batch_sharpness, lanczos_steps, tol
        self.mode, self.reduction, self.eos_fraction = mode, reduction, eos_fraction
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: probes are moved to the model
        self._warm: dict[str, Tensor] = {}
        self._warned = False

    def _top(self, key: str, op: Operator) -> tuple[float, float, bool]:
        """λ_max (largest algebraic) warm-started from the last eigenvector mixed with 10 % noise."""
        v0 = None
        if key in self._warm and self._warm[key].shape == (op.dim,):
            noise = _random_vector(op.dim, op.dtype, op.device, "gaussian", self.generator)
            v0 = self._warm[key] + 0.1 * noise / noise.norm()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = lanczos_eigenvalues(op, 1, max_steps=self.lanczos_steps, tol=self.tol, v0=v0,
                                         generator=self.generator)
        self._warm[key] = result.vectors[:, 0]
        return float(result.values[0]), float(result.ritz[0]), result.converged

    def _coordinates(self, op: CurvatureOperator, optimizer: torch.optim.Optimizer, rule: str) -> tuple[Tensor, Tensor]:
        """Per flat coordinate, in float64: ``η_g/c_g`` (0 outside the optimizer) and ``η_g`` (for the trace)."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        named = dict(op.model.named_parameters())
        scale, lrs = [], []
        for name, numel in zip(op.names, op.numels):
            group = group_of.get(id(named[name]))
            lr = float(group["lr"]) if group is not None else 0.0
            per_step = lr / _constant(rule, group) if group is not None else 0.0
            scale.append(torch.full((numel,), per_step, dtype=torch.float64))
            lrs.append(torch.full((numel,), lr, dtype=torch.float64))
        return torch.cat(scale).to(op.device), torch.cat(lrs).to(op.device)

    def _preconditioner(self, op: CurvatureOperator, optimizer: torch.optim.Optimizer) -> Tensor | None:
        """``P = (1 − β1ᵗ)(√(v/(1 − β2ᵗ)) + ε)`` per coordinate (float64) from the optimizer state; None before a
        step."""
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        named, pieces = dict(op.model.named_parameters()), []
        for name in op.names:
            p = named[name]
            group, state = group_of.get(id(p)), optimizer.state.get(p, {})
            if group is None:
                pieces.append(torch.ones(p.numel(), dtype=torch.float64, device=op.device))
                continue
            v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            if v is None or "step" not in state or float(state["step"]) < 1:
                return None
            t, (beta1, beta2) = float(state["step"]), group["betas"]
            pieces.append((adam_denominator(v.detach().double(), t, beta2, group["eps"]) * (1 - beta1 ** t))
                          .reshape(-1))
        return torch.cat(pieces)

    def measure(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                batch: tuple[Any, Any], step: int) -> dict[str, float]:
        nan = float("nan")
        op = CurvatureOperator(model, loss_fn, self.data if self.data is not None else batch, mode=self.mode,
                               reduction=self.reduction)
        rec = dict.fromkeys(("lr", "threshold", "ratio", "eos", "trace", "trace_halfwidth", "trace_ratio",
                             "precond_sharpness", "batch_sharpness", "batch_ratio"), nan)
        sharpness, rec["lambda_min"], converged = self._top("H", op)
        rec["sharpness"], rec["converged"] = sharpness, float(converged)
        if abs(rec["lambda_min"]) > sharpness and not self._warned:
            self._warned = True
            warnings.warn(f"|λ_min| ≈ {abs(rec['lambda_min']):.4g} exceeds λ_max = {sharpness:.4g} at step {step}: "
                          "magnitude-ranking tools (PyHessian, eigsh(which='LM')) would report λ_min as the "
                          "sharpness", RuntimeWarning, stacklevel=2)
        trace = hutchinson_trace(op, self.trace_samples, generator=self.generator) if self.trace_samples else None
        if trace is not None:
            rec["trace"], rec["trace_halfwidth"] = trace.value, trace.halfwidth
        if optimizer is not None:
            rule = _check_rule(optimizer, self.rule)
            scale, lrs = self._coordinates(op, optimizer, rule)
            uniform = bool((scale == scale[0]).all())
            # lr and threshold of the tensors the optimizer moves (those outside it, η = 0, e.g. a shared
            # fallback's, do not make the rule's own threshold undefined; the ratio below stays exact)
            owned = scale > 0
            first = scale[owned][0] if bool(owned.any()) else scale[0]
            if bool((scale[owned] == first).all()):
                rec["lr"] = float(lrs[owned][0]) if bool(owned.any()) else float(lrs[0])
                rec["threshold"] = 1 / float(first) if first > 0 else math.inf
            if rule == "adam":
                if self.preconditioned:
                    rec["precond_sharpness"], rec["ratio"] = self._preconditioned(op, optimizer, scale, uniform)
            else:
                rec["ratio"] = (sharpness * float(scale[0]) if uniform
                                else self._top("DH", _ScaledOperator(op, scale.sqrt().to(op.dtype)))[0])
                if self.batch_sharpness:
                    rec["batch_sharpness"] = batch_sharpness(model, loss_fn, batch, mode=self.mode,
                                                             reduction=self.reduction)
                    rec["batch_ratio"] = rec["batch_sharpness"] * float(scale[0]) if uniform else nan
            rec["eos"] = float(rec["ratio"] >= self.eos_fraction) if rec["ratio"] == rec["ratio"] else nan
            if trace is not None and rule == "gd":
                scaled = _ScaledOperator(op, lrs.sqrt().to(op.dtype))
                rec["trace_ratio"] = (trace.value * rec["lr"] if uniform else hutchinson_trace(
                    scaled, self.trace_samples, generator=self.generator).value) / 2
        rec["hvps"] = float(op.matvecs)
        return rec

    def _preconditioned(self, op: CurvatureOperator, optimizer: torch.optim.Optimizer, scale: Tensor,
                        uniform: bool) -> tuple[float, float]:
        """``(λ_max(P⁻¹H), ratio)``; the first is ``nan`` with per-group learning rates, both before a step."""
        P = self._preconditioner(op, optimizer)
        if P is None:
            return float("nan"), float("nan")
        if uniform:
            value = self._top("PH", _ScaledOperator(op, P.rsqrt().to(op.dtype)))[0]
            return value, value * float(scale[0])
        return float("nan"), self._top("DPH", _ScaledOperator(op, (scale / P).sqrt().to(op.dtype)))[0]


__all__ = ["gd_threshold", "heavy_ball_threshold", "nesterov_threshold", "adam_threshold", "detect_rule",
           "optimizer_thresholds", "SGDStability", "sgd_linear_stability", "sgd_critical_lr", "batch_sharpness",
           "SharpnessMonitor"]
