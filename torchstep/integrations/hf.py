"""Hugging Face ``transformers.Trainer`` integration through its optimizer-factory path.

``Trainer(..., optimizer_cls_and_kwargs=(torchstep.integrations.hf.factory("lion"), {"lr": 1e-4}))``

The Trainer treats a first element that is not an ``Optimizer`` subclass as a factory: it calls
``factory()(model, **kwargs)``.  Our factory hands the whole model to :func:`torchstep.create`,
which partitions it (matrices / embeddings / head / no-decay norms and biases) and records
parameter names — the Trainer's own two-group split is bypassed.  Schedulers from
``get_scheduler`` then scale each group's own lr.
"""
from __future__ import annotations

from typing import Any, Callable

from ..registry import create, get_spec


def factory(name: str, **fixed: Any) -> Callable[[], Callable[..., Any]]:
    """A zero-argument callable returning ``build(model, **kwargs) -> optimizer``."""
    get_spec(name)  # fail early on an unknown name

    def instantiate() -> Callable[..., Any]:
        def build(model: Any, **kwargs: Any):
            return create(name, model, **{**fixed, **kwargs})
        return build

    return instantiate
