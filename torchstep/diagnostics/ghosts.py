r"""Ghosts of Softmax — the safe step radius of cross-entropy along an update: a diagnostic, a clip and an
lr controller (Sao, "Ghosts of Softmax: Complex Singularities That Limit Safe Step Sizes in Cross-Entropy",
arXiv 2603.13552; official code piyush314/ghosts-of-softmax, commit 5a9638c).

Along a line θ + τv the logits are linearised, ``z_k(τ) = z_k + a_k τ`` with the *logit slopes*
``a = J_z(x)·v`` (one forward-mode JVP).  The line loss ``−z_y(τ) + log Σ_k e^{z_k(τ)}`` is then analytic up to
the nearest complex zero of the partition function ``F(τ) = Σ_k e^{z_k + a_k τ}``, and its Taylor series
diverges beyond that distance (Cauchy–Hadamard):

.. math::
    \rho^* = \frac{\sqrt{\delta^2 + \pi^2}}{|\Delta a|}\ \text{(two classes, exact)},\qquad
    \rho_a = \frac{\pi}{\max_{x} (\max_k a_k - \min_k a_k)}\ \text{(any C, a lower bound)},\qquad
    r = \tau/\rho_a .

Here: :func:`logit_slopes`, :func:`slope_spread`, :func:`safe_radius`, :func:`binary_radius`,
:func:`top2_radius`, :func:`radius_along` (ρ_a, τ, r of an un-normalised update in one JVP),
:func:`predict_update` (an optimizer's next update, state untouched), :func:`safe_lr` and
:func:`logit_gap_radius` (the paper's controller and the official cheap proxy), the wrappers
:class:`SafeStep` (clip the applied update to ``fraction·ρ_a``) and :class:`RhoController` (set the lr before
the step, as the paper's experiments do), and :class:`SafeRadiusMonitor`.

Conventions (``torchstep.diagnostics.monitor``): a model with ``outputs = model(inputs)``; the logits are
``outputs`` (or ``logits_fn(outputs)``), classes on the last axis, every leading axis a sample (tokens of a
sequence are samples).  The radius needs only the logits, not the loss or the targets.  Mode: ``mode="eval"``
(default, as the official scripts) runs the JVP with the model in eval mode and restores every module's flag;
``"train"`` runs it in train mode (dropout draws; BatchNorm normalises by batch statistics and, unlike a
training forward, leaves its running statistics alone).

Cost, measured here (torch 2.13, CPU, one thread of a shared, loaded 2-core machine, fp32; medians, noisy to
±50 %).  MLP 64→128→10 (ReLU), batch 64: forward 0.06–0.13 ms, forward + backward 0.33–0.55 ms, an Adam step
0.23–0.43 ms; one :func:`radius_along` JVP 1.5 ms — at this size the fixed per-call cost of ``torch.func``
dominates (raw ``jvp(functional_call)`` 0.8 ms); :class:`SafeStep` over Adam 1.6–2.4 ms per step in all;
:class:`RhoController` 1.9–2.3 ms; :func:`predict_update` 0.3 ms closed form, 0.9–1.1 ms dry run.  MLP
784→1024→1024→10, batch 256: forward 14–25 ms, the JVP 71–99 ms (≈ 4–5 forwards; the same as a raw
``torch.func.jvp``; the paper quotes ≈ 1.5 forwards per sample, its README +129 % over an SGD step for
ResNet-18 on a GPU).  The first ``torch.func`` transform in a process costs a one-off 0.7–2 s of set-up.
"""
from __future__ import annotations

import copy
import math
from collections import OrderedDict
from typing import Any, Callable, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, jvp

from ..ops.moments import adam_denominator, bias_corrections
from ..optim._base import check_choice, check_range, evaluate_closure, scalar
from ..optim.wrapper import OptimizerWrapper
from .hessian import diagnostic_mode
from .monitor import LossFn, Monitor

PI = math.pi
MODES = ("eval", "train")
PREDICT = ("auto", "adam", "dry_run")
LogitsFn = Callable[[Any], Tensor]


# ---------------------------------------------------------------------------------------------- radii
def slope_spread(slopes: Tensor) -> Tensor:
    """Per-sample slope spread ``Δ_a(x; v) = max_k a_k − min_k a_k`` (classes on the last axis).

    Args:
        slopes: logit slopes ``a = J_z·v``, shape ``(..., C)``.
    """
    if slopes.dim() < 1:
        raise ValueError("Invalid slopes: need a class axis (shape (..., C))")
    return slopes.amax(-1) - slopes.amin(-1)


def safe_radius(slopes: Tensor) -> Tensor:
    """The multiclass lower bound ``ρ_a = π / max_x Δ_a(x; v)`` (Thm 4.6 / Def 4.7) as a 0-d tensor.

    The samples are every leading position of ``slopes``: a superset of samples can only lower ρ_a.  The
    slopes must be taken along a *unit* direction v for ρ_a to be a distance in parameter space.  A zero
    spread gives ``inf`` (the official code adds ε = 1e-12 and returns π/ε; :func:`logit_gap_radius` keeps the
    official proxy's ε).  No host sync.

    Args:
        slopes: logit slopes along a unit direction, shape ``(..., C)``.
    """
    return PI / slope_spread(slopes).amax()


def _as_tensor(x: float | Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.tensor(float(x), dtype=torch.float64)


def binary_radius(margin: float | Tensor, slope_gap: float | Tensor) -> Tensor:
    """Exact two-class radius ``ρ* = √(δ² + π²)/|Δa|`` (Thm 4.3), element-wise.

    The distance from τ = 0 to the nearest zero of ``e^{z_1 + a_1 τ} + e^{z_2 + a_2 τ}``, i.e. to
    τ = (−δ ± iπ)/Δa.  ``slope_gap = 0`` gives ``inf``.

    Args:
        margin: logit margin δ = z_1 − z_2 (either sign).
        slope_gap: slope difference Δa = a_1 − a_2.
    """
    margin, slope_gap = _as_tensor(margin), _as_tensor(slope_gap)
    return torch.hypot(margin, torch.full_like(margin, PI)) / slope_gap.abs()


def top2_radius(logits: Tensor, slopes: Tensor) -> Tensor:
    """Per-sample top-2 estimate ``√(δ_yc² + π²)/|a_y − a_c|`` (y the top class, c the runner-up).

    An *estimate* of the multiclass radius (the binary formula on the two leading classes), not a bound;
    :func:`safe_radius` is the bound.

    Args:
        logits: logits at τ = 0, shape ``(..., C)`` with C ≥ 2.
        slopes: logit slopes along the same direction, same shape.
    """
    if logits.dim() < 1 or logits.shape[-1] < 2 or slopes.shape != logits.shape:
        raise ValueError(f"Invalid logits/slopes: need equal shapes (..., C) with C >= 2, got "
                         f"{tuple(logits.shape)} and {tuple(slopes.shape)}")
    top = logits.topk(2, dim=-1)
    a = slopes.gather(-1, top.indices)
    return binary_radius(top.values[..., 0] - top.values[..., 1], a[..., 0] - a[..., 1])


def logit_gap_radius(logits: Tensor, eps: float = 1e-6) -> Tensor:
    """The official proxy ``ρ = π / (mean_x (max_k z_k − min_k z_k) + ε)`` of ``RhoScaledAdam``.

    No JVP and not along the step: a radius-like scale from the logits alone (the "earlier approximation" of
    the official Adam tutorial).  0-d tensor, no host sync.

    Args:
        logits: logits, shape ``(..., C)``.
        eps: added to the mean gap (default 1e-6, the official value).
    """
    return PI / (slope_spread(logits).mean() + eps)


def safe_lr(lr: float, rho: float, update_norm: float, target: float = 1.0, lr_mode: str = "cap") -> float:
    """The paper's lr controller: ``η_eff = min(η, r_target·ρ_a/‖p‖)`` (``"cap"``) or ``r_target·ρ_a/‖p‖``.

    ``"cap"`` with ``target=1`` is the lr-spike experiment's rule ("if η‖p‖ > ρ_a then η_eff = ρ_a/‖p‖
    else η"); ``"set"`` is the ResNet-18 controller (``η = r·ρ_a/‖v‖``, no base lr).  ``p`` is the update
    per unit lr (Adam: ``m̂/(√v̂ + ε)``), so the step is ``τ = η_eff·‖p‖`` and ``r = τ/ρ_a ≤ target``.
    With nothing to control (‖p‖ = 0 or ρ_a = ∞) it returns ``lr``.

    Args:
        lr: the scheduled learning rate η.
        rho: ρ_a along p.
        update_norm: ‖p‖.
        target: r_target (default 1.0; the official README recommends 0.5, calls 1 the boundary).
        lr_mode: ``"cap"`` (default) or ``"set"``.
    """
    check_choice("lr_mode", lr_mode, ("cap", "set"))
    if update_norm == 0 or not math.isfinite(rho):
        return lr
    bound = target * rho / update_norm
    return min(lr, bound) if lr_mode == "cap" else bound


# ---------------------------------------------------------------------------------------------- JVP
def logit_slopes(model: nn.Module, inputs: Any, direction: Mapping[str, Tensor], *,
                 at: Mapping[str, Tensor] | None = None, mode: str = "eval",
                 logits_fn: LogitsFn | None = None) -> tuple[Tensor, Tensor]:
    """Logits and logit slopes ``a = J_z·v`` in one forward-mode JVP (``torch.func.jvp`` over ``functional_call``).

    Returns ``(logits, slopes)``, both detached, shape ``(..., C)``.  ``direction`` is used as given (pass a
    unit v for ``a_k(x; v)``; slopes are linear in v).  Parameters missing from ``direction`` get a zero
    tangent; buffers are the model's own.  Exact to rounding (tested against the reverse-mode Jacobian and
    central differences in fp64).

    Args:
        model: the network; ``outputs = model(inputs)``.
        inputs: the batch inputs (one positional argument of ``model``).
        direction: ``{parameter name: tangent}`` (names of ``model.named_parameters()``).
        at: optional ``{parameter name: value}`` to linearise at instead of the current values (default None).
        mode: ``"eval"`` (default) or ``"train"``, the mode the model runs in (restored afterwards).
        logits_fn: maps ``outputs`` to the logits (default None: the outputs are the logits).

    Cost: one forward with dual numbers (measured 4–5 forwards on CPU, see the module docstring; memory: a
    tangent per activation).
    """
    params = dict(model.named_parameters())
    at = dict(at or {})
    unknown = sorted((set(direction) | set(at)) - set(params))
    if unknown:
        raise ValueError(f"Invalid direction: {unknown} are not parameters of the model")
    if not direction:
        raise ValueError("Invalid direction: empty (give a tangent for at least one parameter)")
    for name, t in list(direction.items()) + list(at.items()):
        if tuple(t.shape) != tuple(params[name].shape):
            raise ValueError(f"Invalid direction: {name} has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(params[name].shape)}")
    names = list(direction) + [n for n in at if n not in direction]
    primals = {n: (at[n] if n in at else params[n]).detach() for n in names}
    tangents = {n: (direction[n].detach().to(primals[n].dtype) if n in direction
                    else torch.zeros_like(primals[n])) for n in names}

    def forward(ps: dict[str, Tensor]) -> Tensor:
        outputs = functional_call(model, ps, (inputs,))
        return outputs if logits_fn is None else logits_fn(outputs)

    with diagnostic_mode(model, mode):
        logits, slopes = jvp(forward, (primals,), (tangents,))
    if logits.dim() < 1:
        raise ValueError("Invalid logits: need a class axis (shape (..., C))")
    return logits.detach(), slopes.detach()


class SafeRadius(NamedTuple):
    """ρ_a, τ and r of one update, 0-d tensors on the model's device."""
    rho: Tensor
    tau: Tensor
    r: Tensor


def _global_norm(tensors: list[Tensor]) -> Tensor:
    norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0]) for n in norms]))


def radius_along(model: nn.Module, inputs: Any, update: Mapping[str, Tensor], *,
                 at: Mapping[str, Tensor] | None = None, mode: str = "eval",
                 logits_fn: LogitsFn | None = None) -> SafeRadius:
    """ρ_a, τ = ‖Δθ‖ and r = τ/ρ_a of an un-normalised update Δθ, in one JVP and without a host sync.

    By linearity the spread of ``J_z·Δθ`` is τ·Δ_a(v) with v = Δθ/τ, so ``r = max_x spread(J_z Δθ)/π`` and
    ``ρ_a = π·τ / max_x spread(J_z Δθ)`` (∞ when the spread is 0, e.g. Δθ = 0); no division by τ.

    Args:
        model: the network; ``outputs = model(inputs)``.
        inputs: the batch (the sample set S of ρ_a; the official lr-spike script uses the full training set).
        update: ``{parameter name: Δθ}``.
        at: linearise at these parameter values instead of the current ones (default None).
        mode: ``"eval"`` (default) or ``"train"``.
        logits_fn: maps outputs to logits (default None: identity).
    """
    _, slopes = logit_slopes(model, inputs, update, at=at, mode=mode, logits_fn=logits_fn)
    spread = slope_spread(slopes).amax()
    tau = _global_norm(list(update.values())).to(spread)
    rho = torch.where(spread > 0, PI * tau / spread, torch.full_like(spread, math.inf))
    return SafeRadius(rho, tau, spread / PI)


# ---------------------------------------------------------------------------------------------- predicted updates
def _params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _param_names(model: nn.Module, params: list[Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(f"Invalid model: optimizer parameters {missing} (in group order) are not parameters of "
                         f"the model, so the radius cannot see them")
    return [names[id(p)] for p in params]


def _closed_form(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and not any(
        g.get("capturable") or g.get("differentiable") or any(p.is_complex() for p in g["params"])
        for g in optimizer.param_groups)


@torch.no_grad()
def _adam_update(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """torch Adam/AdamW's next Δθ from the state, operation order as torch's for-loop path."""
    out = []
    for group in optimizer.param_groups:
        lr, wd, eps = scalar(group["lr"]), scalar(group["weight_decay"]), group["eps"]
        beta1, beta2 = (scalar(b) for b in group["betas"])
        decoupled = isinstance(optimizer, torch.optim.AdamW) or group.get("decoupled_weight_decay", False)
        for p in group["params"]:
            if p.grad is None:
                out.append(torch.zeros_like(p))
                continue
            grad = -p.grad if group["maximize"] else p.grad
            state = optimizer.state.get(p) or {}
            if wd and not decoupled:
                grad = grad.add(p, alpha=wd)
            t = int(scalar(state["step"])) + 1 if state else 1   # CPU step tensor: no device sync
            m = torch.lerp(state["exp_avg"] if state else torch.zeros_like(p), grad, 1 - beta1)
            v = torch.addcmul((state["exp_avg_sq"] if state else torch.zeros_like(p)) * beta2, grad, grad,
                              value=1 - beta2)
            if group["amsgrad"]:
                v = torch.maximum(state["max_exp_avg_sq"], v) if state else v
            bc1, _ = bias_corrections(t, beta1, beta2)
            delta = m.div_(adam_denominator(v, t, beta2, eps)).mul_(-lr / bc1)
            if wd and decoupled:
                delta.add_(p, alpha=-lr * wd)
            out.append(delta)
    return out


def _twin(optimizer: torch.optim.Optimizer, memo: dict[int, Any]) -> torch.optim.Optimizer:
    """A deep copy that keeps every attribute (torch's ``__getstate__`` keeps only groups, state and defaults)
    and drops the step / state-dict hooks, so the dry run triggers none of the caller's hooks."""
    twin = object.__new__(type(optimizer))
    memo[id(optimizer)] = twin
    for key, value in vars(optimizer).items():
        if key.endswith("_hooks"):
            twin.__dict__[key] = OrderedDict()
            continue
        if isinstance(value, torch.optim.Optimizer) and id(value) not in memo:   # a wrapper's base
            _twin(value, memo)
        twin.__dict__[key] = copy.deepcopy(value, memo)
    return twin


def _dry_run_update(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    params = _params(optimizer)
    memo: dict[int, Any] = {}
    for p in params:
        q = p.detach().clone().requires_grad_(p.requires_grad)
        if p.grad is not None:
            q.grad = p.grad.detach().clone()
        memo[id(p)] = q
    _twin(optimizer, memo).step()
    return [memo[id(p)].detach() - p.detach() for p in params]


def predict_update(optimizer: torch.optim.Optimizer, method: str = "auto") -> list[Tensor]:
    """The next update ``Δθ = θ_{t+1} − θ_t`` the optimizer would apply with the current ``.grad``, without
    changing its parameters, state or step count.

    Returned as one tensor per parameter in group order (``[p for g in param_groups for p in g["params"]]``),
    lr and sign included (zeros where the step would not move a parameter).  The update per unit lr that the
    paper calls p is ``Δθ/η`` for single-lr optimizers.  A :class:`SafeStep` / :class:`RhoController` is
    unwrapped: this is the base's proposal before the radius control.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        method: ``"adam"`` — closed form from the state, for exactly ``torch.optim.Adam`` / ``AdamW`` (real
            parameters, ``capturable=False``, ``differentiable=False``; weight decay coupled or decoupled,
            ``amsgrad``, ``maximize``): ``m̂/(√v̂ + ε)`` with the moments advanced by the current gradient,
            as the official tutorial; cost a few element-wise passes and one transient tensor per parameter.
            ``"dry_run"`` — any optimizer: step a deep copy (parameters, gradients, state and every attribute
            copied; its own hooks dropped, torch's global optimizer hooks still run) and read its Δθ; cost
            one base step plus a copy of parameters, gradients and state.  Not supported by the dry run:
            optimizers whose step needs a closure, or draws random numbers (it would consume the global
            generator).  ``"auto"`` (default): ``"adam"`` where it applies, else ``"dry_run"``.  Both agree
            with the real step to rounding (tested; a float32 tensor lr rounds differently in torch's step).
    """
    check_choice("method", method, PREDICT)
    while isinstance(optimizer, _RadiusWrapper):
        optimizer = optimizer.base
    if method == "adam" and not _closed_form(optimizer):
        raise ValueError(f"Invalid method: 'adam' needs torch.optim.Adam/AdamW with real parameters, "
                         f"capturable=False and differentiable=False, got {type(optimizer).__name__}")
    if method == "adam" or (method == "auto" and _closed_form(optimizer)):
        return _adam_update(optimizer)
    return _dry_run_update(optimizer)


# ---------------------------------------------------------------------------------------------- wrappers
class _RadiusWrapper(OptimizerWrapper):
    """Shared plumbing of :class:`SafeStep` and :class:`RhoController`: model, batch, names, group keys."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, mode: str,
                 logits_fn: LogitsFn | None, group_defaults: dict[str, Any]) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs the model (an nn.Module), got {type(model).__name__}")
        check_choice("mode", mode, MODES)
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError(f"Invalid logits_fn: must be callable, got {type(logits_fn).__name__}")
        self.model, self.mode, self.logits_fn = model, mode, logits_fn
        self._group_defaults, self._batch = group_defaults, None
        self.last: dict[str, Any] = {}
        super().__init__(optimizer)
        for group in self.param_groups:
            self.init_group(group)
        _param_names(model, _params(self))   # fail at construction, not at the first step

    def init_group(self, group: dict[str, Any]) -> None:
        for key, value in self._group_defaults.items():
            group.setdefault(key, value)

    def set_batch(self, inputs: Any) -> None:
        """Keep a reference to ``inputs`` for steps called without ``inputs=`` (trainers that call
        ``optimizer.step()`` themselves); replaced by the next call, never copied."""
        self._batch = inputs

    def _inputs(self, inputs: Any) -> Any:
        x = self._batch if inputs is None else inputs
        if x is None:
            raise ValueError(f"{type(self).__name__}.step needs the batch inputs: step(inputs=x) or set_batch(x)")
        return x

    def _radius(self, update: list[Tensor], inputs: Any, at: list[Tensor] | None = None) -> SafeRadius:
        names = _param_names(self.model, _params(self))
        return radius_along(self.model, inputs, dict(zip(names, update)),
                            at=None if at is None else dict(zip(names, at)), mode=self.mode, logits_fn=self.logits_fn)

    def _least(self, key: str) -> float:
        return min(scalar(g[key]) for g in self.param_groups)


class SafeStep(_RadiusWrapper):
    r"""Clip the update the base optimizer applies to ``‖Δθ‖ ≤ fraction·ρ_a`` along its own direction.

    After ``base.step()`` moved θ_t to θ_t + Δθ, one JVP at θ_t along Δθ gives ρ_a (over the batch inputs) and

    .. math::
        s = \min\bigl(1, \text{fraction}\cdot\rho_a/\lVert\Delta\theta\rVert\bigr), \qquad
        \theta_{t+1} = \theta_t + s\,\Delta\theta \quad\Rightarrow\quad r = s\lVert\Delta\theta\rVert/\rho_a
        \le \text{fraction}

    (Prop. 5.2, eq. 19 with fraction = 1).  Inside the radius (s = 1) the step is bit-identical to the base's.
    For a base whose update is proportional to its lr (SGD, momentum, Adam(W), Lion, …) this equals running
    the base with ``η_eff = min(η, fraction·ρ_a/‖p‖)`` — the paper's controller (:class:`RhoController`,
    tested equal) — but needs no prediction and holds for any base.  The base's state advances as for the
    unclipped step (as in the paper's controller, where moments never see the lr).

    Args:
        optimizer: the base ``torch.optim.Optimizer``; its parameters must be parameters of ``model``.
        model: the network (``outputs = model(inputs)``); parameters it has but the optimizer lacks get a zero
            tangent.
        fraction: the target r (default 1.0, the paper's clip; the official README recommends 0.5 as
            "definitively safe"); > 0.  Stored per group as ``safe_fraction`` (schedulable, checkpointed);
            the update is one vector, so the smallest group value is used.
        mode: ``"eval"`` (default) or ``"train"``, the model mode during the JVP.
        logits_fn: maps ``model(inputs)`` to logits (default None: identity; e.g. ``lambda o: o.logits``).

    Batch API: ``step(closure=None, inputs=None)``.  The radius needs the inputs of the step's batch (not the
    targets): pass ``inputs=x``, or call ``set_batch(x)`` first when a trainer calls ``step()`` itself.  A
    missing batch raises ``ValueError`` before anything changes.  ``loss_fn`` is not needed: ρ_a depends on
    the logits only.

    ``self.last`` holds 0-d tensors of the last step: ``rho`` (ρ_a at θ_t along Δθ), ``tau`` and ``r`` (of
    the applied step), ``scale`` (s).  No host sync: s stays a device tensor and is applied as
    ``θ −= (1 − s)·Δθ``; ``p.grad`` is never read or written by the wrapper.  Deviation from the paper: ρ_a
    over the current batch (the official lr-spike script uses the full training set; pass any inputs you like).

    Cost per step: one JVP over the batch plus two transient copies of the parameters (θ_t, Δθ); measured
    times in the module docstring.  Paper: arXiv 2603.13552.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, fraction: float = 1.0, *,
                 mode: str = "eval", logits_fn: LogitsFn | None = None) -> None:
        check_range("fraction", fraction, 0.0, lo_open=True)
        super().__init__(optimizer, model, mode, logits_fn, dict(safe_fraction=fraction))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, inputs: Any = None) -> Any:
        x = self._inputs(inputs)
        loss = evaluate_closure(closure)
        params = _params(self)
        before = [p.detach().clone() for p in params]
        self.base.step()
        delta = [p.detach() - b for p, b in zip(params, before)]
        try:
            rad = self._radius(delta, x, at=before)
        except BaseException:
            for p, b in zip(params, before):   # never a half-applied step (the base's state has advanced)
                p.copy_(b)
            raise
        fraction = self._least("safe_fraction")
        scale = torch.where(rad.r > fraction, fraction / rad.r, torch.ones_like(rad.r))   # NaN r: base step kept
        shrink = 1 - scale
        for p, d in zip(params, delta):
            p.sub_(d.mul_(shrink.to(d)))
        self.last = {"rho": rad.rho, "tau": rad.tau * scale, "r": rad.r * scale, "scale": scale}
        return loss


class RhoController(_RadiusWrapper):
    r"""The paper's ρ_a lr controller: set this step's lr from the radius along the *predicted* update.

    ``controller="jvp"``: predict the base's Δθ (:func:`predict_update`), one JVP along it gives ρ_a and
    τ = ‖Δθ‖, then every group runs this step with ``η_g·s``,

    .. math::
        s = \min(1, r_\text{target}\,\rho_a/\tau)\ (\texttt{"cap"}),\qquad
        s = r_\text{target}\,\rho_a/\tau\ (\texttt{"set"}),

    i.e. for one group ``η_eff = min(η, r_target·ρ_a/‖p‖)`` (the lr-spike experiment, r_target = 1) or
    ``η_eff = r_target·ρ_a/‖p‖`` (the ResNet-18 controller, no base lr: η only weights the groups) —
    :func:`safe_lr`.  ``controller="logit_gap"``: the official ``RhoScaledAdam`` proxy, per group
    ``η_eff = η·clip(π/(mean_x(max z − min z) + 1e-6), floor, cap)`` from the logits (no JVP, not along the
    step); wrap ``torch.optim.Adam(weight_decay=λ)`` for its coupled L2 decay.  The scheduled lr is restored
    after the step, so schedulers keep owning it.

    Args:
        optimizer: the base optimizer; its parameters must be parameters of ``model``.
        model: the network (``outputs = model(inputs)``).
        target: r_target (default 1.0, the lr-spike experiment; README: 0.5 recommended), > 0; group key
            ``rho_target`` (the smallest group value is used).
        controller: ``"jvp"`` (default) or ``"logit_gap"``.
        lr_mode: ``"cap"`` (default) or ``"set"`` (jvp only).
        floor, cap: the proxy's clip of ρ (defaults 0.01 and 1.0, the official ones), 0 < floor ≤ cap; group
            keys ``rho_floor``, ``rho_cap``, applied per group as the official class does.
        predict: ``method`` of :func:`predict_update` (default ``"auto"``: closed form for torch Adam/AdamW,
            else a dry run of a copy).
        mode: ``"eval"`` (default) or ``"train"``; logits_fn: maps outputs to logits (default None).

    Batch API: ``step(closure=None, inputs=None, logits=None)``; ``set_batch(x)`` as in :class:`SafeStep`.
    ``logits=`` lets the proxy reuse the training forward's logits (as ``RhoScaledAdam.step(logits)``); without
    them it runs one no-grad forward on the inputs.  ``self.last`` (floats): ``rho``, ``lr_scale`` (s of the
    first group) and, for jvp, ``tau`` and ``r`` of the applied step.

    Deviations: the lr scaling is per step and restored (the official scripts overwrite the group lr).
    :class:`SafeStep` is the cheaper and more general form of ``"jvp"``/``"cap"`` (no prediction, no host sync);
    this class reads ρ_a and τ to the host once per step (one sync) because the lr is a Python float.
    Cost per step (jvp): one prediction (closed form ≈ a few element-wise passes; dry run ≈ one base step and
    a copy of parameters, gradients and state) plus one JVP.  Paper: arXiv 2603.13552.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, target: float = 1.0, *,
                 controller: str = "jvp", lr_mode: str = "cap", floor: float = 0.01, cap: float = 1.0,
                 predict: str = "auto", mode: str = "eval", logits_fn: LogitsFn | None = None) -> None:
        check_range("target", target, 0.0, lo_open=True)
        check_choice("controller", controller, ("jvp", "logit_gap"))
        check_choice("lr_mode", lr_mode, ("cap", "set"))
        check_choice("predict", predict, PREDICT)
        check_range("floor", floor, 0.0, lo_open=True)
        check_range("cap", cap, floor)
        self.controller, self.lr_mode, self.predict = controller, lr_mode, predict
        super().__init__(optimizer, model, mode, logits_fn, dict(rho_target=target, rho_floor=floor, rho_cap=cap))

    def _forward_logits(self, inputs: Any) -> Tensor:
        with torch.no_grad(), diagnostic_mode(self.model, self.mode):
            outputs = self.model(inputs)
        return outputs if self.logits_fn is None else self.logits_fn(outputs)

    def step(self, closure: Callable[[], Any] | None = None, inputs: Any = None, logits: Tensor | None = None) -> Any:
        x = self._inputs(inputs) if self.controller == "jvp" or logits is None else None
        loss = evaluate_closure(closure)
        groups = self.param_groups
        if self.controller == "jvp":
            with torch.no_grad():
                rad = self._radius(predict_update(self.base, self.predict), x)
            rho, tau = rad.rho.item(), rad.tau.item()   # the one host sync
            s = safe_lr(1.0, rho, tau, self._least("rho_target"), self.lr_mode)
            scales = [s] * len(groups)
            self.last = {"rho": rho, "tau": tau * s, "r": tau * s / rho, "lr_scale": s}
        else:
            rho = logit_gap_radius((self._forward_logits(x) if logits is None else logits).detach()).item()
            scales = [min(max(rho, scalar(g["rho_floor"])), scalar(g["rho_cap"])) for g in groups]
            self.last = {"rho": rho, "lr_scale": scales[0]}
        scheduled = [g["lr"] for g in groups]
        try:
            for g, s in zip(groups, scales):
                g["lr"] = g["lr"] * s
            self.base.step()
        finally:
            for g, lr in zip(groups, scheduled):
                g["lr"] = lr
        return loss


# ---------------------------------------------------------------------------------------------- monitor
class SafeRadiusMonitor(Monitor):
    """Record ρ_a, τ and r = τ/ρ_a of the optimizer's next update every ``every`` steps.

    Call it after ``loss.backward()`` and before ``optimizer.step()``: the update measured is the one the
    optimizer is about to apply (:func:`predict_update`, state untouched), ρ_a is taken over the batch inputs
    ``batch[0]`` (targets and ``loss_fn`` are not needed).  Records ``{"step", "rho", "tau", "r"}`` (floats;
    ``rho`` is ``inf`` for a zero update).  For a :class:`SafeStep` / :class:`RhoController` this is the
    base's proposal before the clip (the applied one is in the wrapper's ``last``).

    Args:
        every: measure at steps 0, every, 2·every, … (default 1).
        predict: ``method`` of :func:`predict_update` (default ``"auto"``).
        mode: ``"eval"`` (default) or ``"train"``; logits_fn: maps outputs to logits (default None).

    Cost per measurement: one prediction and one JVP over the batch, three host syncs (the floats).
    Paper: arXiv 2603.13552 (Def. 5.1).
    """

    name = "safe_radius"

    def __init__(self, every: int = 1, *, predict: str = "auto", mode: str = "eval",
                 logits_fn: LogitsFn | None = None) -> None:
        super().__init__(every)
        check_choice("predict", predict, PREDICT)
        check_choice("mode", mode, MODES)
        self.predict, self.mode, self.logits_fn = predict, mode, logits_fn

    def measure(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                batch: tuple[Any, Any], step: int) -> dict[str, float]:
        if optimizer is None:
            raise ValueError("Invalid optimizer: SafeRadiusMonitor measures the optimizer's next update (got None)")
        names = _param_names(model, _params(optimizer))
        with torch.no_grad():
            rad = radius_along(model, batch[0], dict(zip(names, predict_update(optimizer, self.predict))),
                               mode=self.mode, logits_fn=self.logits_fn)
        return {"rho": float(rad.rho), "tau": float(rad.tau), "r": float(rad.r)}


__all__ = ["logit_slopes", "slope_spread", "safe_radius", "binary_radius", "top2_radius", "logit_gap_radius",
           "safe_lr", "radius_along", "SafeRadius", "predict_update", "SafeStep", "RhoController",
           "SafeRadiusMonitor"]
