"""Exact optimizer-state memory: the bytes of every tensor an optimizer keeps (any ``torch.optim.Optimizer``)."""
from __future__ import annotations

from typing import Any

import torch


def _tensors(value: Any):
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def state_bytes(optimizer: torch.optim.Optimizer, by: str | None = None) -> int | dict[str, int]:
    """Exact bytes of the optimizer's state tensors (``numel × element_size``; views counted at their own size).

    Args:
        optimizer: any ``torch.optim.Optimizer`` (torch's own included).
        by: ``None`` – the total (int); ``"param"`` – a dict keyed by parameter name (the group's
            ``param_names`` when present, else ``"group{i}.{j}"``); ``"kind"`` – a dict keyed by state entry
            (``exp_avg``, ``exp_avg_sq``, ``proj_u``, ``step``, …).  Python scalars in the state count 0.
    """
    if by not in (None, "param", "kind"):
        raise ValueError(f"Invalid by: {by!r} (valid range: one of (None, 'param', 'kind'))")
    if by is None:
        return sum(_nbytes(s) for s in optimizer.state.values())
    out: dict[str, int] = {}
    if by == "kind":
        for s in optimizer.state.values():
            for key, value in s.items():
                n = _nbytes(value)
                if n:
                    out[key] = out.get(key, 0) + n
        return out
    for gi, group in enumerate(optimizer.param_groups):
        names = group.get("param_names") or [f"group{gi}.{j}" for j in range(len(group["params"]))]
        for name, p in zip(names, group["params"]):
            out[name] = _nbytes(optimizer.state.get(p, {}))
    return out


__all__ = ["state_bytes"]
