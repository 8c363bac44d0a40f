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


def settled(t: Tensor) -> Tensor:
    """``t`` with any pending reduction (``Partial`` placement, e.g. a norm over a sharded dimension) carried
    out as ``Replicate``; plain tensors and settled DTensors are returned as they are.  State created from a
    reduction must be settled: an in-place update of a ``Partial`` DTensor is rejected or wrong."""
    if not is_dtensor(t):
        return t
    from torch.distributed.tensor import Partial, Replicate

    if not any(isinstance(pl, Partial) for pl in t.placements):
        return t
    return t.redistribute(placements=[Replicate() if isinstance(pl, Partial) else pl for pl in t.placements])


def run_gathered(fn, p: Tensor, grad: Tensor, state: dict, *args) -> None:
    """Run ``fn(p, grad, state, *args)`` (an in-place per-tensor update) on the **whole** tensors of the DTensor
    parameter ``p`` and take the local shards back — for rules that need the full matrix (random / coordinate /
    SVD subspaces whose state is not shaped like the parameter).  Every rank computes the same full update
    (the inputs are gathered, the rule is deterministic: seeded draws, no global RNG), then keeps its shard,
    so no second collective is needed.  Cost: one all-gather of the parameter, the gradient and every sharded
    state tensor, and full-size transients, per step.  State tensors keep their placement where their shape is
    unchanged; new ones get :func:`state_placements` (index sets and low-rank bases are replicated)."""
    from torch.distributed.tensor import distribute_tensor

    mesh = p.device_mesh

    def full(t):
        return settled(t).full_tensor() if is_dtensor(t) else t

    work_p, work_g = full(p), full(grad)
    work_state = {k: full(v) for k, v in state.items()}
    fn(work_p, work_g, work_state, *args)
    p.copy_(distribute_tensor(work_p, mesh, p.placements, src_data_rank=None))
    old = dict(state)
    state.clear()
    for key, value in work_state.items():
        if not isinstance(value, Tensor) or is_dtensor(value) or value is old.get(key):
            state[key] = value           # Python state, the plain step counter
            continue
        prev = old.get(key)
        placements = (prev.placements if is_dtensor(prev) and tuple(prev.shape) == tuple(value.shape)
                      else state_placements(p, value.shape))
        state[key] = distribute_tensor(value, mesh, placements, src_data_rank=None)
