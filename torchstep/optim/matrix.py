"""Matrix rules as a pipeline of small stages, and the stages that recur across methods.

A :class:`MatrixRule` is composed, not subclassed: for a group's tensors it runs

1. ``direction(grad, state, group)`` per tensor (momentum, Nesterov, … — updates the state);
2. the flattened ``(out, prod(rest))`` view (:func:`torchstep.ops.shapes.as_matrix`; any ``ndim >= 2``);
3. ``lmo(matrices, group)`` over the whole list, so Newton–Schulz runs batched;
4. ``post(u, state, group)`` per tensor (a normalisation after the LMO: NorMuon's rows, SWAN's rescale);
5. ``layer_factors(states, group)`` — per-tensor lr multipliers that depend on the whole group (Lanton);
6. ``θ ← θ(1 − ηλ) − η·scale(u, group)·factor·u`` — decoupled decay with the base lr, then the step.

Under FSDP2 (``fully_shard``: parameters, gradients and state are DTensors sharded on dim 0) stage 3 never
sees a row block: :func:`owner_lmo` gathers each whole direction matrix on one owner rank (the cost-balanced
plan of :func:`torchstep.ops.sharding.owner_plan`), runs the LMO there once, and sends every rank its rows of
the result; stages 1, 4, 5 and 6 run on DTensors (row statistics stay local, Frobenius norms and other
whole-matrix reductions become all-reduces by DTensor's sharding rules).  Single-process and DDP tensors
take the plain path unchanged.

A new matrix method is its rule (a ``MatrixRule(...)`` of stages from here or its own file) plus a
:class:`~torchstep.optim.hybrid.MatrixHybrid` class naming it.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from ..ops.newton_schulz import NS_METHODS, PRESETS, newton_schulz_many, newton_schulz_many_split, singular_value_bound
from ..ops.shapes import SHAPE_SCALES, as_matrix, shape_scale
from ._base import Rule, check_choice, check_range, decay_, scalar



def dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor`` if that module is loaded, else None — no tensor can be a DTensor
    before it is, so the check costs one dict lookup and ``import torchstep`` does not pay DTensor's ~1.4 s
    import (measured on this machine)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)

NS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}

Stage = Callable[..., Any]


def _none(*_: Any) -> None:
    return None


def raw_gradient(grad: Tensor, state: dict, group: dict) -> Tensor:
    return grad


def unit_scale(u: Tensor, group: dict) -> float:
    return 1.0


@dataclass(frozen=True)
class MatrixRule(Rule):
    """A matrix rule composed of stages (the pipeline in the module docstring).

    Args:
        name: the rule's ``algo`` name.
        lmo: ``lmo(matrices, group) -> list`` over the group's flattened matrices (batched).
        direction: ``direction(grad, state, group) -> Tensor`` (default: the raw gradient).
        init: ``init(p, state, group)`` lazy state (default: none).
        post: ``post(u, state, group) -> Tensor`` after the LMO, or None.
        layer_factors: ``layer_factors(states, group) -> list`` of per-tensor lr multipliers (None entries:
            none), or None.
        scale: ``scale(u, group) -> float`` shape scale of the step (default 1).
        check: ``check(group)`` validation of the rule's hyperparameters.
        accepts_vectors: ``accepts_vectors(group) -> bool`` — True lets 0-/1-D tensors in (sign LMOs).
    """

    name: str
    lmo: Stage
    direction: Stage = raw_gradient
    init: Stage = _none
    post: Stage | None = None
    layer_factors: Stage | None = None
    scale: Stage = unit_scale
    check: Stage = _none
    accepts_vectors: Callable[[dict], bool] = lambda group: False   # noqa: E731 (sign LMOs take any shape)

    def validate(self, group):
        self.check(group)
        if not self.accepts_vectors(group):
            bad = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
            if bad:
                raise ValueError(f"Invalid algo: {group['algo']!r} needs tensors with ndim >= 2, got shapes {bad}")

    def init_state(self, p, state, group):
        self.init(p, state, group)

    def update(self, params, grads, states, group):
        lr = scalar(group["lr"])
        directions = [self.direction(g, s, group) for g, s in zip(grads, states)]
        dtensor = dtensor_class()
        if dtensor is not None and any(isinstance(d, dtensor) for d in directions):
            updates = owner_lmo(self.lmo, directions, group)
        else:
            updates = self.lmo([as_matrix(d) if d.dim() >= 2 else d for d in directions], group)
        if self.post is not None:
            updates = [self.post(u, s, group) for u, s in zip(updates, states)]
        factors = self.layer_factors(states, group) if self.layer_factors is not None else [None] * len(params)
        for p, u, factor in zip(params, updates, factors):
            if factor is not None:
                u = u * factor
            decay_(p, lr, group["weight_decay"])
            p.add_(u.reshape_as(p), alpha=-lr * self.scale(u, group))


# ---------------------------------------------------------------------- sharded (FSDP2) LMO
#: Counters of :func:`owner_lmo` on this rank (plain ints, no device sync): calls (one per sharded group and
#: step), payload bytes sent to / received from other ranks (both exchanges), and this rank's owner work
#: Σ m·n·min(m, n).  Reset by assigning 0.
OWNER_STATS = {"calls": 0, "bytes_sent": 0, "bytes_received": 0, "work": 0}


def _layout(d: Tensor) -> tuple[str, Any]:
    """``("shard", mesh)`` for a 1-D-mesh ``Shard(0)`` DTensor, ``("full", None)`` for a replicated DTensor or
    a plain tensor; anything else (HSDP 2-D meshes, ``Shard(1)``, tensor parallelism) is refused."""
    from torch.distributed.tensor import DTensor, Replicate, Shard
    if not isinstance(d, DTensor):
        return "full", None
    placements = d.placements
    if all(isinstance(pl, Replicate) for pl in placements):
        return "full", None
    if d.device_mesh.ndim == 1 and d.dim() >= 1 and isinstance(placements[0], Shard) and placements[0].dim == 0:
        return "shard", d.device_mesh
    raise NotImplementedError(f"matrix rules support DTensors sharded Shard(0) on a 1-D mesh or replicated, "
                              f"got placements {placements} on a {d.device_mesh.ndim}-D mesh")


def _exchange(send: list[list[Tensor]], recv_numel: list[int], dtype: torch.dtype, device: torch.device,
              pg: Any) -> list[Tensor]:
    """One ``all_to_all_single``: ``send[r]`` (pieces, concatenated) goes to rank r; returns the flat block
    received from each rank (``recv_numel[r]`` elements)."""
    import torch.distributed as dist
    rank = dist.get_rank(pg)
    in_splits = [sum(t.numel() for t in pieces) for pieces in send]
    flat = torch.cat([t.reshape(-1) for pieces in send for t in pieces]) if sum(in_splits) else \
        torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(recv_numel), dtype=dtype, device=device)
    dist.all_to_all_single(out, flat, recv_numel, in_splits, group=pg)
    size = out.element_size()
    OWNER_STATS["bytes_sent"] += size * (sum(in_splits) - in_splits[rank])
    OWNER_STATS["bytes_received"] += size * (sum(recv_numel) - recv_numel[rank])
    return list(out.split(recv_numel))


_STEP_LOADS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("torchstep_owner_loads", default=None)


@contextlib.contextmanager
def shared_owner_loads() -> Iterator[None]:
    """Within the block, the owner plans of successive calls (parameter groups) continue from each other's
    per-rank loads, so that many small groups do not all start on rank 0.  :class:`MatrixHybrid.step
    <torchstep.optim.hybrid.MatrixHybrid>` wraps every step in it; every rank makes the same calls in the same
    order (the collectives require it), so the plans stay identical across ranks."""
    token = _STEP_LOADS.set({})
    try:
        yield
    finally:
        _STEP_LOADS.reset(token)


def carried_loads(key: Any, world: int) -> list[int] | None:
    """The running per-rank load list of process group ``key`` in the current :func:`shared_owner_loads`
    block (mutated by the caller), or None outside one."""
    loads = _STEP_LOADS.get()
    return None if loads is None else loads.setdefault((key, world), [0] * world)


@functools.lru_cache(maxsize=64)
def _row_layout(dims: tuple[tuple[int, int], ...], world: int) -> tuple[list[list[int]], list[list[int]]]:
    """(rows per rank, row offsets per rank) of a group's matrices — the same every step, cached."""
    from ..ops.sharding import shard_rows
    rows = [shard_rows(m, world) for m, _ in dims]
    return rows, [[0, *itertools.accumulate(r[:-1])] for r in rows]


def owner_lmo(lmo: Stage, directions: list[Tensor], group: dict) -> list[Tensor]:
    """Run a whole-matrix ``lmo`` on row-sharded DTensor directions: each matrix once, on its owner.

    For the matrices ``D_i`` (global ``m_i × n_i`` after the (out, prod(rest)) flattening) sharded on dim 0
    over a 1-D mesh of W ranks (FSDP2's ``torch.chunk`` layout: ⌈m/W⌉ rows per rank, trailing ranks short or
    empty — :func:`torchstep.ops.sharding.shard_rows`):

    1. every rank computes the same owner plan ``o_i`` (:func:`torchstep.ops.sharding.owner_plan`, LPT on
       m·n·min(m, n)) from the global shapes alone — no communication;
    2. one ``all_to_all_single`` per dtype sends each rank's row block of ``D_i`` to ``o_i``; the owner
       concatenates the blocks in rank order into the full ``D_i``;
    3. the owner runs ``lmo`` on all its full matrices in one call (so Newton–Schulz stays batched by shape);
    4. a second ``all_to_all_single`` sends every rank its rows of each result, returned as a DTensor with
       the direction's mesh, placement and global shape.

    Replicated DTensors and plain tensors in the list are computed locally on every rank (in the same
    ``lmo`` call).  The result equals the single-process LMO of the full matrices up to the LMO's own
    rounding (the same kernels on the same full matrix: bitwise in practice on CPU).

    Args:
        lmo: ``lmo(matrices, group) -> list`` on full tensors (2-D matrices; 0-/1-D vectors for sign LMOs).
        directions: the per-tensor directions (DTensors or plain tensors, any shape).
        group: the parameter group; ``split_across_ranks`` is switched off inside (the owner already holds
            a share of the work).

    Communication per matrix: ``2·(1 − 1/W)·m·n`` elements in total, two collectives per group and dtype
    per step (:func:`torchstep.ops.sharding.exchange_bytes`).  Memory: an owner holds its matrices in full
    (and their results) during the call; other ranks hold only their blocks.  Deviation from dion's
    ``megabatch`` all_to_all: no zero-padding of shards or matrix lists (uneven splits are sent as they are).
    """
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from ..ops.sharding import matrix_dims, ns_cost, owner_plan
    layouts = [_layout(d) for d in directions]
    sharded = [i for i, (kind, _) in enumerate(layouts) if kind == "shard"]
    mesh = layouts[sharded[0]][1] if sharded else None
    if any(layouts[i][1] != mesh for i in sharded):   # FSDP2 gives each fully_shard call an equal mesh object
        raise NotImplementedError("owner_lmo: every sharded tensor of a group must live on the same device mesh")
    inner = {**group, "split_across_ranks": False}

    def full_view(d: Tensor) -> Tensor:   # the LMO's input form of a full tensor
        d = d.full_tensor() if isinstance(d, DTensor) else d
        return as_matrix(d) if d.dim() >= 2 else d

    def wrap(r: Tensor, d: Tensor) -> Tensor:   # a full result back in the direction's (replicated) layout
        return DTensor.from_local(r, d.device_mesh, d.placements, run_check=False) if isinstance(d, DTensor) else r

    if not sharded:
        return [wrap(r, d) for r, d in zip(lmo([full_view(d) for d in directions], inner), directions)]
    pg = mesh.get_group(0)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    if mesh.get_local_rank(0) != rank:   # shard index (mesh coordinate) must be the all_to_all slot
        raise NotImplementedError("owner_lmo: a device mesh whose coordinates differ from its group's ranks")
    dims = {i: matrix_dims(directions[i].shape) for i in sharded}
    rows, offsets = _row_layout(tuple(dims[i] for i in sharded), world)
    loads = carried_loads(id(pg), world)
    owners = owner_plan([dims[i] for i in sharded], world, initial_loads=loads)
    if loads is not None:
        for i, o in zip(sharded, owners):
            loads[o] += ns_cost(dims[i])
    plan = dict(zip(sharded, owners))
    rows = dict(zip(sharded, rows))
    offsets = dict(zip(sharded, offsets))
    local = {}
    for i in sharded:
        t = directions[i].to_local()
        if t.shape[0] != rows[i][rank]:
            raise RuntimeError(f"owner_lmo: local shard of a {tuple(directions[i].shape)} DTensor has "
                               f"{t.shape[0]} rows on rank {rank}, expected {rows[i][rank]} (torch.chunk layout)")
        local[i] = t.reshape(t.shape[0], dims[i][1])
    OWNER_STATS["calls"] += 1
    OWNER_STATS["work"] += sum(ns_cost(dims[i]) for i in sharded if plan[i] == rank)

    buckets: dict[tuple, list[list[int]]] = {}     # (dtype, device) → matrices by owner rank
    for i in sharded:
        buckets.setdefault((local[i].dtype, local[i].device), [[] for _ in range(world)])[plan[i]].append(i)
    full: dict[int, Tensor] = {}
    for (dtype, device), by_owner in buckets.items():
        own = by_owner[rank]
        blocks = _exchange([[local[i] for i in by_owner[r]] for r in range(world)],
                           [sum(rows[i][r] * dims[i][1] for i in own) for r in range(world)], dtype, device, pg)
        pieces: dict[int, list[Tensor]] = {i: [] for i in own}
        for r, block in enumerate(blocks):
            for piece, i in zip(block.split([rows[i][r] * dims[i][1] for i in own]), own):
                pieces[i].append(piece.view(rows[i][r], dims[i][1]))
        for i in own:
            full[i] = torch.cat(pieces[i])
            if directions[i].dim() < 2:
                full[i] = full[i].reshape(directions[i].shape)
    todo = list(full) + [i for i in range(len(directions)) if i not in plan]
    results = dict(zip(todo, lmo([full[i] if i in full else full_view(directions[i]) for i in todo], inner)))
    result_local: dict[int, Tensor] = {}
    for (dtype, device), by_owner in buckets.items():
        own = by_owner[rank]
        send = [[results[i].reshape(dims[i])[offsets[i][r]:offsets[i][r] + rows[i][r]].to(dtype) for i in own]
                for r in range(world)]
        blocks = _exchange(send, [sum(rows[i][rank] * dims[i][1] for i in by_owner[r]) for r in range(world)],
                           dtype, device, pg)
        for r, block in enumerate(blocks):
            theirs = by_owner[r]
            for piece, i in zip(block.split([rows[i][rank] * dims[i][1] for i in theirs]), theirs):
                result_local[i] = piece.view(rows[i][rank], *((dims[i][1],) if directions[i].dim() >= 2
                                                              else directions[i].shape[1:]))
    out = []
    for i, d in enumerate(directions):
        if i not in plan:
            out.append(wrap(results[i], d))
            continue
        shape = torch.Size(dims[i]) if d.dim() >= 2 else d.shape
        stride = (dims[i][1], 1) if d.dim() >= 2 else d.stride()
        out.append(DTensor.from_local(result_local[i], mesh, d.placements, run_check=False, shape=shape,
                                      stride=stride))
    return out


def zeros_rows(p: Tensor, cols: int = 1) -> Tensor:
    """A zero ``(p.shape[0], cols)`` row statistic of ``p``'s dtype/device; for a DTensor parameter a DTensor
    on its mesh with its placements (``Shard(0)`` rows follow the parameter's rows)."""
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(p, dtensor):
        import torch.distributed.tensor as dt
        return dt.zeros((p.shape[0], cols), dtype=p.dtype, device_mesh=p.device_mesh, placements=p.placements)
    return torch.zeros(p.shape[0], cols, dtype=p.dtype, device=p.device)


def zeros_scalar(p: Tensor) -> Tensor:
    """A zero 0-D statistic of ``p``'s dtype/device; for a DTensor parameter a replicated DTensor."""
    dtensor = dtensor_class()
    if dtensor is not None and isinstance(p, dtensor):
        import torch.distributed.tensor as dt
        return dt.zeros((), dtype=p.dtype, device_mesh=p.device_mesh,
                        placements=[dt.Replicate()] * p.device_mesh.ndim)
    return torch.zeros((), dtype=p.dtype, device=p.device)


# ---------------------------------------------------------------------- stages shared by several rules
def init_momentum(p: Tensor, state: dict, group: dict) -> None:
    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def momentum_direction(grad: Tensor, state: dict, group: dict, nesterov: bool | None = None) -> Tensor:
    """EMA momentum ``b ← μb + (1−μ)g``; returns ``(1−μ)g + μb`` with Nesterov, else ``b``."""
    buf, mu = state["momentum_buffer"], group["momentum"]
    buf.lerp_(grad, 1 - mu)
    return grad.lerp(buf, mu) if (group["nesterov"] if nesterov is None else nesterov) else buf


def newton_schulz_lmo(matrices: list[Tensor], group: dict) -> list[Tensor]:
    """Batched Newton–Schulz with the group's ``ns_steps/ns_preset/ns_dtype/ns_method``; with
    ``split_across_ranks`` each data-parallel (DDP) rank orthogonalises the matrices the LPT owner plan gives
    it and broadcasts them (:func:`torchstep.ops.newton_schulz.newton_schulz_many_split`).  A group without
    ``ns_method`` (a checkpoint saved before it existed) runs the standard iteration.  (FSDP2 DTensors never
    reach this function sharded: :meth:`MatrixRule.update` routes them through :func:`owner_lmo`.)"""
    kwargs = dict(steps=group["ns_steps"], preset=group["ns_preset"], compute_dtype=NS_DTYPES[group["ns_dtype"]],
                  method=group.get("ns_method", "standard"))
    if group.get("split_across_ranks"):
        import torch.distributed as dist
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        return newton_schulz_many_split(matrices, loads=carried_loads(None, world), **kwargs)
    return newton_schulz_many(matrices, **kwargs)


def sign_lmo(matrices: list[Tensor], group: dict) -> list[Tensor]:
    return [m.sign() for m in matrices]


def adjust_lr_scale(u: Tensor, group: dict) -> float:
    """Muon's shape scale chosen by the group's ``adjust_lr`` (:func:`torchstep.ops.shapes.shape_scale`)."""
    return shape_scale(group["adjust_lr"], u.shape[0], u.shape[1])


_bound = functools.lru_cache(maxsize=None)(singular_value_bound)


def certified_spectral_scale(u: Tensor, group: dict) -> float:
    """√(d_out/d_in)/ν with ν the largest singular value the group's Newton–Schulz can output: then
    ``‖step‖₂ ≤ lr·√(d_out/d_in)`` for any input (MuonPP, Lanton)."""
    return shape_scale("spectral_norm", u.shape[0], u.shape[1]) / _bound(group["ns_steps"], group["ns_preset"])


def check_newton_schulz(group: dict) -> None:
    check_range("ns_steps", group["ns_steps"], 1, 99)
    check_choice("ns_preset", group["ns_preset"], tuple(PRESETS))
    check_choice("ns_dtype", group["ns_dtype"], tuple(NS_DTYPES))
    check_choice("ns_method", group.get("ns_method", "standard"), NS_METHODS)


def check_muon(group: dict) -> None:
    check_newton_schulz(group)
    check_choice("adjust_lr", group["adjust_lr"], SHAPE_SCALES)


MUON = MatrixRule("muon", lmo=newton_schulz_lmo, direction=momentum_direction, init=init_momentum,
                  scale=adjust_lr_scale, check=check_muon)
