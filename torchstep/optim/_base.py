"""Shared machinery for every torchstep optimizer: rules, and the optimizer that runs them.

An update rule (:class:`Rule`) is the algorithm, written once as plain functions of tensors:

* ``validate(group)`` – its own hyperparameters (``ValueError`` naming the argument and its range);
* ``init_state(p, state, group)`` – lazy state (``zeros_like(p)`` gives the right state dtype, see the
  low-precision policy below);
* ``update(params, grads, states, group)`` – update a *list* of parameters in place (so batched work such
  as Newton–Schulz stays batched).  :class:`ElementwiseRule` builds it from a per-tensor function.
  ``state["step"]`` has already been advanced (it is the 1-based step of this update); ``grads`` are
  read-only (never ``p.grad`` modified in place).

:class:`TorchstepOptimizer` routes every group to a rule (:meth:`TorchstepOptimizer.rule_for`; one rule for
most optimizers, several for hybrids) and owns what must be identical everywhere: closure handling, the
non-finite gradient policy, ``maximize``, the bf16/fp16 state policy, common hyperparameter validation,
the step counter, and a ``load_state_dict`` that keeps fp32 state.

Low-precision policy: parameters in bf16/fp16 get **fp32 state**; the update is computed
on an fp32 copy of the parameter and rounded back once per step.

Non-finite policy (group key ``nonfinite``):
``"skip"`` (default) – a parameter whose gradient holds inf/NaN is left untouched this
step: no parameter change, no state change, its step counter does not advance.  Costs one
2-norm per gradient and one host sync per step on accelerators.  A *huge* finite gradient whose squared
norm overflows (‖g‖ ≳ 1.8e19 in float32, where Adam's g² and every norm-based statistic would become inf)
is treated as non-finite too: skipped, so no state is ever poisoned by it.
``"raise"`` – ``FloatingPointError`` before anything is modified.
``"ignore"`` – no check, no sync (use when e.g. ``GradScaler`` already skips such steps).
``"mask"`` – sync-free (element-wise rules only): the finite flag of each gradient stays on the device and
the update is selected with ``torch.where``, so a parameter with an inf/NaN (or norm-overflowing) gradient
keeps its value and its tensor state, without the host ever waiting on the device.  Unlike ``"skip"`` its
step counter and host-side state (Schedule-Free's weight sum) still advance — reading the flag to stop
them would be the sync this policy avoids.  Costs one copy of the parameter and its state per step (fused
away under ``compile=True``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

NONFINITE_POLICIES = ("skip", "raise", "ignore", "mask")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} (valid range: {valid})")


def check_range(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``lo <(=) value <(=) hi``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must have exactly one element")
        value = value.item()
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = ("(" if lo_open else "["), (")" if hi_open else "]")
        raise invalid(name, value, f"{left}{lo}, {hi}{right}")


def check_betas(betas: Any, n: int = 2) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise invalid("betas", betas, f"a tuple of {n} floats in [0, 1)")
    for i, b in enumerate(betas):
        check_range(f"betas[{i}]", b, 0.0, 1.0, hi_open=True)


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise invalid(name, value, f"one of {choices}")


def scalar(x: float | Tensor) -> float:
    """A hyperparameter as a Python float; reads tensors every step (never cached).

    For a CPU tensor this is not a device sync; a tensor lr on an accelerator costs one sync
    per group and step (as in torch's non-capturable optimizers)."""
    return x.item() if isinstance(x, Tensor) else float(x)


class Rule:
    """An update rule: hyperparameter validation, lazy state and the update of a list of tensors.

    Subclass it (or use :class:`ElementwiseRule`) and give an optimizer class ``rule = YourRule()``; a
    hybrid optimizer maps group ``algo`` names to rules instead.  Rules hold no per-run data: everything
    lives in the group (hyperparameters) and the per-parameter ``state``.

    Args:
        (none) — a subclass sets ``name`` and overrides ``validate``, ``init_state`` and ``update``.
    """

    name: str
    batched: bool = True     # False: the rule treats each tensor on its own (the optimizer may call it per tensor)
    maskable: bool = False   # True: a per-tensor update whose whole effect is on p and its tensor state ("mask")

    def validate(self, group: dict[str, Any]) -> None:
        pass

    def init_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        pass

    def update(self, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
               group: dict[str, Any]) -> None:
        raise NotImplementedError


class ElementwiseRule(Rule):
    """A rule given by plain functions, applied to each tensor of a group in turn.

    Two ways to write it:

    * ``update_one(p, grad, state, group)`` — updates one parameter in place (eager only); or
    * ``plan`` + ``kernel`` (compilable, ``compile=True``): ``plan(state, group) -> dict`` is the host-side
      part — everything that depends on the step counter, the lr or host state (Python control flow, bias
      corrections, schedule factors); ``kernel(p, grad, state, group, c)`` is the tensor math, reading
      scalars from ``c``.  Eagerly ``update_one = kernel(..., plan(state, group))`` with ``c``'s floats as
      Python floats; compiled, ``c``'s floats arrive as 0-d tensors (so a new lr or step never recompiles, and
      Inductor does not recompute ``β^t`` per element) while its bools/ints/None stay constants (structural
      choices such as a SPAM reset step: one graph per variant).  A kernel therefore branches only on
      ``c``'s bools and on the group's constants, and writes scaled updates with :func:`add_scaled_` /
      :func:`addcdiv_scaled_` so that the same code runs on floats and 0-d tensors.

    Args:
        name: the rule's name (the ``algo`` a hybrid routes by).
        update_one: ``update_one(p, grad, state, group)`` — updates one parameter in place.
        init: ``init(p, state, group)`` — lazy state (default: none; see :func:`zeros_state`).
        check: ``check(group)`` — validates the rule's own hyperparameters (default: none).
        plan, kernel: the compilable formulation (both or neither; then ``update_one`` is derived).
        plan_state: the host (non-tensor) state keys the plan reads or updates besides ``"step"`` (default
            none; e.g. Schedule-Free's running lr maximum and weight sum): the compiled step plans once per
            distinct (step, those values) of a group, not once per parameter (tested for every rule).
    """

    batched = False
    maskable = True

    def __init__(self, name: str, update_one: Callable | None = None, init: Callable | None = None,
                 check: Callable | None = None, *, plan: Callable | None = None,
                 kernel: Callable | None = None, plan_state: tuple[str, ...] = ()) -> None:
        if (plan is None) != (kernel is None) or (update_one is None) == (kernel is None):
            raise TypeError("give update_one, or plan and kernel")
        if update_one is None:
            def update_one(p, grad, state, group):
                kernel(p, grad, state, group, plan(state, group))
        self.name, self.update_one, self.plan, self.kernel = name, update_one, plan, kernel
        self._init, self._check, self.plan_state = init, check, tuple(plan_state)

    @property
    def compilable(self) -> bool:
        return self.kernel is not None

    def validate(self, group):
        if self._check is not None:
            self._check(group)

    def init_state(self, p, state, group):
        if self._init is not None:
            self._init(p, state, group)

    def update(self, params, grads, states, group):
        for p, grad, state in zip(params, grads, states):
            self.update_one(p, grad, state, group)


def add_scaled_(p: Tensor, x: Tensor, c: float | Tensor) -> Tensor:
    """``p ← p + c·x`` for a Python float ``c`` (one fused op, the eager reference) or a 0-d tensor."""
    return p.add_(x, alpha=c) if not isinstance(c, Tensor) else p.add_(x * c)


def addcdiv_scaled_(p: Tensor, a: Tensor, b: Tensor, c: float | Tensor) -> Tensor:
    """``p ← p + c·a/b`` for a Python float ``c`` or a 0-d tensor."""
    return p.addcdiv_(a, b, value=c) if not isinstance(c, Tensor) else p.add_(a / b * c)


def finite_flag(grad: Tensor) -> Tensor:
    """A 0-d bool tensor on ``grad``'s device: its 2-norm is finite (the same test as the ``"skip"`` policy)."""
    dtype = torch.float32 if grad.dtype in _LOW_PRECISION else None
    return torch.linalg.vector_norm(grad, dtype=dtype).isfinite()


def masked_update(update: Callable[[], None], p: Tensor, grad: Tensor, state: dict[str, Any]) -> None:
    """Run ``update()`` and keep its effect on ``p`` and ``state``'s tensors only if ``grad`` is finite, with
    ``torch.where`` on the device (the ``"mask"`` policy: no host sync)."""
    ok = finite_flag(grad)
    keys = [k for k, v in state.items() if k != "step" and isinstance(v, Tensor)]
    old_p, old = p.clone(), {k: state[k].clone() for k in keys}
    update()
    p.copy_(torch.where(ok, p, old_p))
    for k in keys:
        state[k].copy_(torch.where(ok, state[k], old[k]))


def zeros_state(*keys: str) -> Callable:
    """An ``init_state`` that allocates one ``zeros_like(p)`` buffer per key."""
    def init(p, state, group):
        for key in keys:
            state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return init


def step_of(state: dict[str, Any]) -> int:
    """The 1-based step of the update being computed (a CPU tensor: reading it is no device sync)."""
    return int(state["step"])


from ._dtensor import is_dtensor as _is_dtensor  # noqa: E402  (FSDP2: DTensor gradients)


def _global_finite_flags(grads: list[Tensor]) -> list[bool]:
    """Finite flags of DTensor gradients (FSDP2 shards) that every rank agrees on: the local squared norms
    (float64 of the same norms the plain path uses) are summed over the sharded mesh dimensions — one
    stacked all-reduce per mesh and set of sharded dims, usually one per step — so a NaN/inf in any rank's
    shard, or a global norm that overflows the gradient's norm dtype, skips the parameter on every rank.
    Replicated mesh dimensions hold identical shards and are not reduced."""
    import torch.distributed as dist
    from torch.distributed.tensor import Replicate

    keys: dict[tuple, list[int]] = {}
    for i, g in enumerate(grads):
        dims = tuple(d for d, pl in enumerate(g.placements) if not isinstance(pl, Replicate))
        keys.setdefault((id(g.device_mesh), dims), []).append(i)
    flags: list[bool] = [True] * len(grads)
    for (_, dims), idx in keys.items():
        locals_ = [grads[i].to_local() for i in idx]
        norm_dtypes = [torch.float32 if g.dtype in _LOW_PRECISION else g.dtype for g in locals_]
        device = locals_[0].device
        sq = torch.stack([torch.linalg.vector_norm(g, dtype=dt).to(device=device, dtype=torch.float64).square()
                          for g, dt in zip(locals_, norm_dtypes)])
        mesh = grads[idx[0]].device_mesh
        for d in dims:
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        total = sq.sqrt()
        ok = torch.stack([n.to(dt).isfinite() for n, dt in zip(total, norm_dtypes)]).tolist()
        for i, f in zip(idx, ok):
            flags[i] = f
    return flags


class TorchstepOptimizer(torch.optim.Optimizer):
    """Runs rules: see the module docstring for the policies every optimizer inherits.

    Single-rule optimizers set the class attribute ``rule``; hybrids override :meth:`rule_for`.

    Args:
        params: parameters or parameter groups (torch semantics).
        defaults: every hyperparameter of the optimizer with its default (``maximize`` and
            ``nonfinite`` are added when missing); group keys outside it are rejected.
    """

    rule: Rule | None = None
    _BOOKKEEPING = {"params", "param_names", "name", "initial_lr"}   # partitioner / scheduler keys

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        defaults.setdefault("maximize", False)
        defaults.setdefault("nonfinite", "skip")
        super().__init__(params, defaults)

    def rule_for(self, group: dict[str, Any]) -> Rule:
        """The rule that updates ``group``."""
        return self.rule

    # ------------------------------------------------------------------ validation
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        unknown = set(group) - self._allowed_keys(group)   # typos are rejected
        if unknown:
            raise ValueError(f"Unknown hyperparameter(s) {sorted(unknown)} for {type(self).__name__}; "
                             f"valid: {sorted(self.defaults)}")
        self._validate(group)

    def _allowed_keys(self, group: dict[str, Any]) -> set[str]:
        """Keys a group may carry: the optimizer's hyperparameters and the partitioner/scheduler keys."""
        return set(self.defaults) | self._BOOKKEEPING

    def _validate(self, group: dict[str, Any]) -> None:
        validate_common(group)
        self.rule_for(group).validate(group)
        if group["nonfinite"] == "mask" and not (self.rule_for(group).maskable and not self.rule_for(group).batched):
            raise invalid("nonfinite", "mask", f"one of {NONFINITE_POLICIES[:3]} ('mask' needs a per-tensor rule "
                          f"acting only on the parameter and its tensor state; {self.rule_for(group).name!r} is not)")
        if group.get("compile", False) is not False:
            from ._compiled import check_compile
            check_compile(group["compile"], self.rule_for(group))

    # ------------------------------------------------------------------ step
    @staticmethod
    def _finite_flags(grads: list[Tensor]) -> list[bool]:
        """One flag per gradient, from its 2-norm: inf/NaN always propagate into it, a fused reduction
        is ~20x cheaper than ``isfinite(g).all()`` on CPU (measured: 0.14 vs 3.3 ms per 1M floats), and
        it also flags a finite gradient whose squared norm overflows (float32 accumulation for
        bf16/fp16: ‖g‖ ≳ 1.8e19), which would make g² or ‖g‖ inf inside the rules."""
        if not grads:
            return []
        sharded = [i for i, g in enumerate(grads) if _is_dtensor(g)]
        if not sharded:
            norms = [torch.linalg.vector_norm(g, dtype=torch.float32) if g.dtype in _LOW_PRECISION
                     else torch.linalg.vector_norm(g) for g in grads]
            device, dtype = norms[0].device, norms[0].dtype
            if any(n.device != device or n.dtype != dtype for n in norms):   # one stack needs one dtype/device
                norms = [n.to(device=device, dtype=torch.float64) for n in norms]
            return torch.stack(norms).isfinite().tolist()
        flags = dict(zip(sharded, _global_finite_flags([grads[i] for i in sharded])))
        plain = [i for i in range(len(grads)) if i not in flags]
        flags.update(zip(plain, TorchstepOptimizer._finite_flags([grads[i] for i in plain])))
        return [flags[i] for i in range(len(grads))]

    def _finite_only(self, items: list[tuple[dict[str, Any], Tensor, Tensor]], what: str
                     ) -> list[tuple[dict[str, Any], Tensor, Tensor]]:
        """``(group, param, tensor)`` triples whose tensor is finite, per each group's ``nonfinite`` policy
        (``raise`` raises before anything is modified).  Shared by :meth:`step` and Hessian refreshes."""
        checked = [i for i, (g, _, _) in enumerate(items) if g["nonfinite"] not in ("ignore", "mask")]
        flags = dict(zip(checked, self._finite_flags([items[i][2] for i in checked])))
        for i, (group, p, _) in enumerate(items):
            if not flags.get(i, True) and group["nonfinite"] == "raise":
                gi = next(k for k, g in enumerate(self.param_groups) if g is group)
                pi = next(k for k, q in enumerate(group["params"]) if q is p)
                names = group.get("param_names")
                where = names[pi] if names else f"#{pi}"
                raise FloatingPointError(f"non-finite {what} in parameter {where} of group {gi}")
        return [item for i, item in enumerate(items) if flags.get(i, True)]

    def _params_to_update(self) -> list[tuple[dict[str, Any], Tensor]]:
        todo = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                todo.append((group, p, p.grad))
        return [(g, p) for g, p, _ in self._finite_only(todo, "gradient")]

    def state_for(self, p: Tensor, group: dict[str, Any], work: Tensor | None = None) -> dict[str, Any]:
        """``p``'s state, initialised lazily by the group's rule (fp32 for bf16/fp16 parameters)."""
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            if work is None:
                work = p.float() if p.dtype in _LOW_PRECISION else p
            self.rule_for(group).init_state(work, state, group)
        return state

    def _working(self, p: Tensor, group: dict[str, Any]) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(working parameter, gradient, state): fp32 copies for bf16/fp16, ``maximize`` applied,
        lazy state initialised."""
        grad = -p.grad if group["maximize"] else p.grad
        low = p.dtype in _LOW_PRECISION
        work = p.float() if low else p
        if low:
            grad = grad.float()
        return work, grad, self.state_for(p, group, work)

    def _step_group(self, group: dict[str, Any], params: list[Tensor]) -> None:
        # A per-tensor rule runs one tensor at a time, so a bf16/fp16 model holds one fp32 working copy (and
        # fp32 gradient) at a time — not the whole group's (8 extra bytes per parameter at peak).  The compiled
        # step updates the whole group in one graph, so it holds every working copy at once.
        compiled = group.get("compile", False)
        chunks = [params] if compiled or self.rule_for(group).batched else [[p] for p in params]
        for chunk in chunks:
            items = [self._working(p, group) for p in chunk]
            works = [w for w, _, _ in items]
            grads, states = [g for _, g, _ in items], [s for _, _, s in items]
            if compiled:   # advances the step counters itself (the group's counters share one buffer)
                self._compiled_step(group)(self.rule_for(group), works, grads, states, group)
            else:
                torch._foreach_add_([state["step"] for state in states], 1)   # one call for the chunk's counters
                if group["nonfinite"] == "mask":   # per-tensor rules only (validated): one tensor per chunk
                    masked_update(lambda: self._apply_rule(group, chunk, works, grads, states), works[0],
                                  grads[0], states[0])
                else:
                    self._apply_rule(group, chunk, works, grads, states)
            for p, work in zip(chunk, works):
                if work is not p:
                    p.copy_(work)

    def _compiled_step(self, group: dict[str, Any]):
        """The group's :class:`~._compiled.CompiledStep`, built on first use (not part of ``state_dict``)."""
        from ._compiled import CompiledStep
        cache = self.__dict__.setdefault("_compiled_steps", {})
        entry = cache.get(id(group))
        if entry is None or entry[0] is not group or entry[1].option != group["compile"]:
            entry = cache[id(group)] = (group, CompiledStep(group["compile"]))
        return entry[1]

    def _apply_rule(self, group: dict[str, Any], params: list[Tensor], works: list[Tensor], grads: list[Tensor],
                    states: list[dict[str, Any]]) -> None:
        """Run the group's rule on the working tensors (``params`` are the live parameters, for rules that
        need a tensor's position in its group)."""
        self.rule_for(group).update(works, grads, states, group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimisation step; returns the closure's loss (evaluated with grad)."""
        loss = evaluate_closure(closure)
        by_group: dict[int, tuple[dict[str, Any], list[Tensor]]] = {}
        for group, p in self._params_to_update():
            by_group.setdefault(id(group), (group, []))[1].append(p)
        for group, params in by_group.values():
            self._step_group(group, params)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("maximize", False)
            group.setdefault("nonfinite", "skip")
            for key, value in self.defaults.items():
                if key != "differentiable":  # torch's own __setstate__ adds it to defaults
                    group.setdefault(key, value)  # flags added after a checkpoint was written
        for s in self.state.values():
            if "step" in s and not torch.is_tensor(s["step"]):
                s["step"] = torch.tensor(float(s["step"]))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch casts every state tensor to the parameter dtype; keep our fp32 state for bf16/fp16
        parameters and integer state (index sets of coordinate projections) as integers."""
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        live = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, live):
            saved = state_dict["state"].get(pid)
            if saved is None:
                continue
            for key, value in saved.items():
                if key == "step" or not torch.is_tensor(value):
                    continue
                if not value.is_floating_point() or p.dtype in _LOW_PRECISION:
                    self.state[p][key] = value.to(device=p.device, copy=True)


def validate_common(group: dict[str, Any]) -> None:
    """The hyperparameters every rule shares, when present in the group."""
    if "lr" in group:
        check_range("lr", group["lr"], 0.0)
    if "betas" in group:
        check_betas(group["betas"], len(group["betas"]) if isinstance(group["betas"], (tuple, list)) else 2)
    if "eps" in group:
        check_range("eps", group["eps"], 0.0, lo_open=True)
    if "weight_decay" in group:
        check_range("weight_decay", group["weight_decay"], 0.0)
    if "momentum" in group:
        check_range("momentum", group["momentum"], 0.0, 1.0, hi_open=True)
    check_choice("nonfinite", group["nonfinite"], NONFINITE_POLICIES)
    if not isinstance(group["maximize"], bool):
        raise invalid("maximize", group["maximize"], "True or False")


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """Run ``closure`` with gradients enabled (steps run under ``no_grad``) and return its loss."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def decay_(p: Tensor, lr: float, weight_decay: float) -> None:
    """Decoupled weight decay θ ← θ·(1 − η·λ)."""
    if weight_decay != 0:
        p.mul_(1.0 - lr * weight_decay)
