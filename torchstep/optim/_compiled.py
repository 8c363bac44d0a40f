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


def _loop(kernel: Callable, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Tensor]],
          group: dict[str, Any], constants: list[dict[str, Any]], names: tuple[str, ...], values: Tensor) -> None:
    for i, (p, grad, state) in enumerate(zip(params, grads, states)):
        c = dict(constants[i])
        for j, name in enumerate(names):
            c[name] = values[i, j]
        if group["nonfinite"] == "mask":
            masked_update(lambda: kernel(p, grad, state, group, c), p, grad, state)
        else:
            kernel(p, grad, state, group, c)


def _backend(option: bool | str) -> str:
    return "inductor" if option is True else str(option)


class CompiledStep:
    """The compiled update of one group (held by the optimizer, rebuilt after ``load_state_dict``)."""

    def __init__(self, option: bool | str) -> None:
        # a fresh function object per group: dynamo's cache is per code object, so copy the code
        code = _loop.__code__
        fn = type(_loop)(code.replace(), _loop.__globals__, f"_loop_{id(self)}")
        self.option, self.backend = option, _backend(option)
        self.fn = torch.compile(fn, fullgraph=True, dynamic=False, backend=self.backend)

    def __call__(self, rule, params: list[Tensor], grads: list[Tensor], states: list[dict[str, Any]],
                 group: dict[str, Any]) -> None:
        plans = [rule.plan(state, group) for state in states]
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
        tensor_states = [{k: _1d(v) for k, v in s.items() if k != "step" and isinstance(v, Tensor)} for s in states]
        constants_group = {k: v for k, v in group.items() if k not in _HOST_KEYS}
        self.fn(rule.kernel, [_1d(p) for p in params], [_1d(g) for g in grads], tensor_states, constants_group,
                constants, names, values)


def _1d(t: Tensor) -> Tensor:
    """A 0-d tensor as a 1-element view: dynamo drops in-place updates of 0-d float64 CPU inputs (it
    treats them like Python scalars; measured on torch 2.13), a view of shape (1,) keeps them."""
    return t.view(1) if t.dim() == 0 else t


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
