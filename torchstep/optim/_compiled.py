"""The compiled multi-tensor step of an :class:`~torchstep.optim._base.ElementwiseRule` (``compile=True``).

One ``torch.compile(fullgraph=True)`` graph updates every parameter of a group: the rule's ``kernel`` is
traced once per parameter inside a Python loop, and Inductor fuses the whole group into a few kernels (C++
with SIMD on CPU, Triton on GPU).  What changes from step to step is an *input* of the graph, never a
constant of it:

* the rule's ``plan`` runs on the host first (step counters are CPU tensors, so reading them is no device
  sync) and its float coefficients — lr, bias corrections, schedule factors — are packed into one
  ``(n_params, n_floats)`` fp32 tensor, moved to the device in one copy (pinned and non-blocking on CUDA);
  inside the graph each is a 0-d slice, so a new lr or step never recompiles and ``β^t`` is not recomputed
  per element (it is when the step itself is a graph tensor: measured 2× slower on CPU);
* its bools / ints / None are constants: a structural choice (e.g. a SPAM reset step) compiles one more
  graph the first time it occurs, then reuses it.

Recompiles happen only when the set or shapes of the parameters change (a parameter skipped by the
non-finite policy, a new group) or a hyperparameter the kernel reads from the group (β, ε, λ, …) is
changed — each distinct value is one more graph.  Each group of each rule has its own compiled function,
so groups do not share dynamo's recompile limit.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ._base import masked_update

#: group keys the compiled kernel never sees (the lr reaches it through the plan's coefficients)
_HOST_KEYS = frozenset({"params", "param_names", "name", "initial_lr", "lr", "compile"})

#: Inductor options: its generated wrapper re-checks every input's size and stride, which dynamo's guards
#: (``dynamic=False``) already did — ≈ 4 µs per tensor per step (measured: 0.52 → 0.30 ms for 50 tensors)
_INDUCTOR_OPTIONS = {"size_asserts": False}


def _loop(kernel: Callable, params: list[Tensor], grads: list[Tensor], keys: tuple[str, ...] | None,
          states: tuple[list[Tensor], ...] | list[dict[str, Tensor]], group: dict[str, Any],
          constants: list[dict[str, Any]], index: tuple[int, ...] | None, names: tuple[str, ...],
          values: Tensor) -> None:
    """The traced loop.  Flat inputs keep dynamo's guards cheap: ``states`` is one list per state key when
    every parameter has the same keys (``keys``; else one dict per parameter), and the plans are the
    distinct ones (``constants``/``values`` rows) with ``index`` mapping parameters to them (None: one)."""
    for i, (p, grad) in enumerate(zip(params, grads)):
        state = {k: states[j][i] for j, k in enumerate(keys)} if keys is not None else states[i]
        row = 0 if index is None else index[i]
        c = dict(constants[row])
        for j, name in enumerate(names):
            c[name] = values[row, j]
        if group["nonfinite"] == "mask":
            masked_update(lambda: kernel(p, grad, state, group, c), p, grad, state)
        else:
            kernel(p, grad, state, group, c)


def _backend(option: bool | str) -> str:
    return "inductor" if option is True else str(option)


def _plans(rule, states: list[dict[str, Any]], steps: list[float], group: dict[str, Any]
           ) -> tuple[list[dict], tuple[int, ...] | None]:
    """The distinct plans of a group and each parameter's row (None when all share one).  A plan depends
    only on the group, the step and the host state it declares (``rule.plan_state``), so the group plans
    once per distinct value of those — one call for the usual group whose parameters all took the same
    steps; parameters sharing a row receive the host state the plan wrote into the row's first."""
    keys = rule.plan_state
    rows: dict[tuple, int] = {}
    first: list[int] = []                  # each row's first parameter: the one that is planned
    index = []
    for i, (t, state) in enumerate(zip(steps, states)):
        key = (t, *(state[k] for k in keys))
        if key not in rows:
            rows[key] = len(first)
            first.append(i)
        index.append(rows[key])
    plans = [rule.plan(states[i], group) for i in first]
    for state, row in zip(states, index):  # (only with declared host state) copy what the plan wrote
        if keys and state is not states[first[row]]:
            state.update({k: states[first[row]][k] for k in keys})
    return plans, (None if len(plans) == 1 else tuple(index))


class CompiledStep:
    """The compiled update of one group (held by the optimizer, rebuilt after ``load_state_dict``)."""

    def __init__(self, option: bool | str) -> None:
        # a fresh function object per group: dynamo's cache is per code object, so copy the code
        code = _loop.__code__
        fn = type(_loop)(code.replace(), _loop.__globals__, f"_loop_{id(self)}")
        self.option, self.backend = option, _backend(option)
        options = _INDUCTOR_OPTIONS if self.backend == "inductor" else None
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend, options=options)
        self._steps: Tensor | None = None          # the group's step counters, one buffer (see _advance)
        self._views: list[Tensor] = []

    def _advance(self, states: list[dict[str, Any]]) -> list[float]:
        """Advance every parameter's step counter by one and return the new values.  The counters stay
        ordinary 0-d CPU tensors in the state, but views of one buffer, so this is one ``add_`` and one
        read instead of one of each per parameter (≈ 4 µs each).  A counter replaced from outside
        (``load_state_dict``, a hand-edited state) or a changed parameter set rebuilds the buffer."""
        steps = [s["step"] for s in states]
        if len(steps) != len(self._views) or any(a is not b for a, b in zip(steps, self._views)):
            self._steps = torch.stack([t.detach().float() for t in steps])
            self._views = list(self._steps.unbind())
            for state, view in zip(states, self._views):
                state["step"] = view
        self._steps.add_(1)
        return self._steps.tolist()

    def __call__(self, rule, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 group: dict[str, Any]) -> None:
        """One step of the group: advances the step counters, plans on the host, runs the graph."""
        plans, index = _plans(rule, states, self._advance(states), group)
        names = tuple(k for k, v in plans[0].items() if isinstance(v, float))
        constants = [{k: v for k, v in plan.items() if k not in names} for plan in plans]
        for plan in plans[1:]:   # every parameter's plan must give the same float keys
            if tuple(k for k, v in plan.items() if isinstance(v, float)) != names:
                raise RuntimeError(f"{rule.name}: plan() returned different float coefficients across parameters")
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        values = torch.tensor([[plan[k] for k in names] for plan in plans], dtype=dtype)
        device = params[0].device
        if device.type != "cpu":
            values = values.pin_memory().to(device, non_blocking=True)
        tensor_keys = [tuple(k for k, v in s.items() if k != "step" and isinstance(v, Tensor)) for s in states]
        keys = tensor_keys[0] if all(k == tensor_keys[0] for k in tensor_keys) else None
        if keys is not None:
            tensor_states = tuple(_1d([s[k] for s in states]) for k in keys)
        else:
            tensor_states = [dict(zip(ks, _1d([s[k] for k in ks]))) for s, ks in zip(states, tensor_keys)]
        constants_group = {k: v for k, v in group.items() if k not in _HOST_KEYS}
        self.fn(rule.kernel, _1d(params), _1d(grads), keys, tensor_states, constants_group, constants, index,
                names, values)


def _1d(tensors: list[Tensor]) -> list[Tensor]:
    """0-d tensors as 1-element views: dynamo drops in-place updates of 0-d float64 CPU inputs (it treats
    them like Python scalars; measured on torch 2.13), a view of shape (1,) keeps them."""
    return [t.view(1) if t.dim() == 0 else t for t in tensors]


def check_compile(value: Any, rule) -> None:
    from ._base import invalid   # _base imports this module lazily
    """``compile`` is False, True (Inductor) or a ``torch.compile`` backend name, and needs a compilable rule."""
    if value is False:
        return
    if not (value is True or isinstance(value, str)):
        raise invalid("compile", value, "False, True or a torch.compile backend name")
    if isinstance(value, str):
        backends = set(torch._dynamo.list_backends(exclude_tags=()))
        if value not in backends:
            raise invalid("compile", value, f"False, True or one of {sorted(backends)}")
    if not getattr(rule, "compilable", False):
        raise invalid("compile", value, f"False (rule {rule.name!r} has no compiled formulation)")
