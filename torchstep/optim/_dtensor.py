"""DTensor (FSDP2) helpers for rules whose state or statistics are not shaped like the parameter.

Under FSDP2 a parameter, its gradient and its ``zeros_like`` state are ``DTensor`` shards (placement
``Shard(0)`` on a 1-D mesh).  Element-wise work runs on the shards unchanged, and reductions (norms, sums,
``max``) become collectives through DTensor's sharding propagation.  What does not follow by itself is state
created with a plain factory (``torch.zeros(())``, ``torch.full(shape)``): an in-place update of a plain
tensor with a DTensor operand raises.  :func:`full_state` creates such state as a DTensor on the parameter's
mesh — sharded along a dimension the state shares with the parameter, replicated otherwise — so it also
carries the placement ``torch.distributed.checkpoint`` needs to reshard it.  For plain parameters every helper
is the plain torch call (bit-exact with the single-process code).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def is_dtensor(t: object) -> bool:
    """``t`` is a ``torch.distributed.tensor.DTensor`` (False on torch builds without distributed)."""
    if type(t) in (Tensor, torch.nn.Parameter) or not isinstance(t, Tensor):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        return False
    return isinstance(t, DTensor)


def state_placements(p: Tensor, shape: Sequence[int]) -> list:
    """Placements for state of ``shape`` next to the DTensor ``p``: ``p``'s ``Shard(d)`` is kept where the state
    has dimension ``d`` of the same size (per-row statistics of a row-sharded weight stay local), any other
    mesh dimension is ``Replicate`` (scalars, per-column statistics)."""
    from torch.distributed.tensor import Replicate, Shard

    shape = tuple(shape)
    out = []
    for pl in p.placements:
        keep = isinstance(pl, Shard) and pl.dim < len(shape) and shape[pl.dim] == p.shape[pl.dim]
        out.append(pl if keep else Replicate())
    return out


def full_state(p: Tensor, shape: Sequence[int], value: float, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.full(shape, value)`` for state of ``p`` — a DTensor on ``p``'s mesh (:func:`state_placements`,
    created without communication) when ``p`` is one."""
    dtype = p.dtype if dtype is None else dtype
    if not is_dtensor(p):
        return torch.full(tuple(shape), value, dtype=dtype, device=p.device)
    from torch.distributed.tensor import full

    return full(tuple(shape), value, dtype=dtype, device_mesh=p.device_mesh,
                placements=state_placements(p, shape))
