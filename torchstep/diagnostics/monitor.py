"""The one interface every live diagnostic implements, so any of them plugs into a plain loop, a Hugging Face
``TrainerCallback``, a Lightning ``Callback`` and the benchmark harness (``torchstep bench --monitor``).

Convention (the same for every diagnostic in this package): a model, a loss ``loss_fn(outputs, targets) -> scalar``
(mean-reduced unless a diagnostic says otherwise), and a batch ``(inputs, targets)`` with
``outputs = model(inputs)`` — so curvature code can run the model functionally
(``torch.func.functional_call(model, params, (inputs,))``).  A monitor measures every ``every`` steps and
keeps its records (``history``: dicts with ``step`` and floats), which are plain data for ``state_dict``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Monitor:
    """Base of live diagnostics.  Subclasses implement :meth:`measure`.

    Args:
        every: measure at steps ``0, every, 2·every, …`` (an int ≥ 1).
    """

    name = "monitor"

    def __init__(self, every: int = 1) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r} (valid range: an int >= 1)")
        self.every = every
        self.history: list[dict[str, float]] = []

    def measure(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                batch: tuple[Any, Any], step: int) -> dict[str, float]:
        raise NotImplementedError

    def __call__(self, step: int, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 loss_fn: LossFn, batch: tuple[Any, Any]) -> dict[str, float] | None:
        """Measure if ``step`` is due; returns (and records) ``{"step": step, …}`` or None."""
        if step % self.every:
            return None
        record = {"step": step, **self.measure(model=model, optimizer=optimizer, loss_fn=loss_fn, batch=batch,
                                               step=step)}
        self.history.append(record)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {"every": self.every, "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.every, self.history = state["every"], [dict(r) for r in state["history"]]


__all__ = ["Monitor", "LossFn"]
