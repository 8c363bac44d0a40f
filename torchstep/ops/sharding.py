"""Owner plans for whole-matrix work across data-parallel ranks (Newton–Schulz, Sinkhorn, whitening).

A matrix rule's LMO needs the whole matrix, so under data parallelism (DDP: every rank holds every matrix;
FSDP2: every rank holds a row block) each matrix is given to one **owner** rank that computes it once and
sends the result back.  This module is the pure part: which rank owns which matrix, and what that costs.

Plan (:func:`owner_plan`): LPT — *longest processing time first* (Graham 1969).  Jobs are sorted by cost
``c(m, n) = m·n·min(m, n)`` (∝ the Newton–Schulz FLOPs of :func:`torchstep.ops.newton_schulz.flops`,
``steps·(4m²n + 2m³)`` for m ≤ n, up to the m³ term), descending, ties by index, and each is given to the
currently least-loaded rank (ties: lowest rank).  Deterministic from the shapes alone, so every rank computes
the same plan with no communication.

Bound (Graham): with ``OPT`` the best possible makespan, ``max load ≤ (4/3 − 1/(3W))·OPT``; and, since OPT ≥
mean load and OPT ≥ the largest job, also ``max load ≤ mean + max job`` (the least-loaded rank before the
last job placed on the makespan rank had at most the mean).  Round robin (matrix i → rank i mod W) has no
such bound: when the matrix list repeats a per-layer pattern whose length is a multiple of W, every large
matrix lands on the same ranks.

``python -m torchstep.ops.sharding`` prints the LPT vs round-robin balance for real model shapes and the
bytes one step moves at a given world size (``--help``).
"""
from __future__ import annotations

import argparse
import heapq
import math
from typing import Callable, Sequence

Shape = Sequence[int]


def matrix_dims(shape: Shape) -> tuple[int, int]:
    """``(out, prod(rest))`` — the flattened matrix every matrix rule works on (a 1-D shape is (n, 1))."""
    shape = tuple(int(s) for s in shape)
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def ns_cost(shape: Shape) -> int:
    """``m·n·min(m, n)`` of the flattened matrix: Newton–Schulz work up to a constant factor."""
    m, n = matrix_dims(shape)
    return m * n * min(m, n)


def owner_plan(shapes: Sequence[Shape], world: int, cost: Callable[[Shape], int] = ns_cost,
               initial_loads: Sequence[int] | None = None) -> list[int]:
    """The owner rank of each matrix by LPT on ``cost`` (module docstring); ``len(shapes)`` entries in [0, W).

    Args:
        shapes: the matrices' shapes (any ndim; flattened as :func:`matrix_dims`).
        world: number of ranks W ≥ 1.
        cost: job cost (default :func:`ns_cost`).
        initial_loads: per-rank load already assigned (default zeros) — so that successive parameter groups
            of one step continue balancing where the previous group left off instead of each starting on
            rank 0 (:func:`torchstep.optim.matrix.shared_owner_loads`).
    """
    if world < 1:
        raise ValueError(f"Invalid world: {world!r} (valid range: an int >= 1)")
    costs = [cost(s) for s in shapes]
    order = sorted(range(len(shapes)), key=lambda i: (-costs[i], i))
    start = [0] * world if initial_loads is None else list(initial_loads)
    heap = [(start[r], r) for r in range(world)]   # (load, rank): the min is the least-loaded, lowest rank
    heapq.heapify(heap)
    plan = [0] * len(shapes)
    for i in order:
        load, r = heapq.heappop(heap)
        plan[i] = r
        heapq.heappush(heap, (load + costs[i], r))
    return plan


def round_robin_plan(shapes: Sequence[Shape], world: int) -> list[int]:
    """Matrix i → rank i mod W (the plan before LPT; kept for comparison)."""
    return [i % world for i in range(len(shapes))]


def plan_loads(shapes: Sequence[Shape], plan: Sequence[int], world: int,
               cost: Callable[[Shape], int] = ns_cost) -> list[int]:
    """Total cost per rank under ``plan``."""
    loads = [0] * world
    for s, r in zip(shapes, plan):
        loads[r] += cost(s)
    return loads


def plan_balance(shapes: Sequence[Shape], plan: Sequence[int], world: int,
                 cost: Callable[[Shape], int] = ns_cost) -> float:
    """max/mean load of ``plan`` (1.0 = perfect; W when one rank does everything); 1.0 for no work."""
    loads = plan_loads(shapes, plan, world, cost)
    total = sum(loads)
    return max(loads) * world / total if total else 1.0


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard under ``Shard(0)`` (``torch.chunk`` semantics, FSDP2's layout):
    ⌈m/W⌉ per rank, the trailing ranks short or empty (m = 7, W = 2 → [4, 3]; m = 5, W = 4 → [2, 2, 1, 0])."""
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def exchange_bytes(shapes: Sequence[Shape], world: int, plan: Sequence[int] | None = None,
                   element_bytes: int = 4, sharded: bool = True) -> list[int]:
    """Bytes each rank **sends** in one step of the owner exchange (self-copies excluded).

    ``sharded=True`` (FSDP2, :func:`torchstep.optim.matrix.owner_lmo`): rank r sends its row block of every
    matrix it does not own to the owner, and as owner sends every other rank its rows of the result —
    ``2·(1 − 1/W)·mn`` elements per matrix in total.  ``sharded=False`` (DDP,
    :func:`torchstep.ops.newton_schulz.newton_schulz_many_split`): the owner broadcasts each result —
    counted here as the owner's ``(W − 1)·mn`` (what a flat broadcast moves; a tree or ring moves the same
    total spread over the ranks).
    """
    plan = owner_plan(shapes, world) if plan is None else plan
    sent = [0] * world
    for s, o in zip(shapes, plan):
        m, n = matrix_dims(s)
        if not sharded:
            sent[o] += (world - 1) * m * n * element_bytes
            continue
        rows = shard_rows(m, world)
        for r in range(world):
            if r != o:
                sent[r] += rows[r] * n * element_bytes          # my block of the direction → owner
                sent[o] += rows[r] * n * element_bytes          # owner → my block of the result
    return sent


# ---------------------------------------------------------------------- model shapes for the tables
def transformer_shapes(d_model: int, d_ff: int, layers: int, *, fused_qkv: bool = False, gated: bool = False,
                       kv_dim: int | None = None) -> list[tuple[int, int]]:
    """Hidden matrices of a decoder stack, (out, in) as ``nn.Linear`` stores them, layer by layer.

    ``fused_qkv``: one (3d, d) attention input (GPT-2's ``c_attn``) instead of q, k, v; ``gated``: SwiGLU
    (gate and up (d_ff, d), down (d, d_ff)) instead of fc (d_ff, d), proj (d, d_ff); ``kv_dim``: k/v output
    width (grouped-query attention; default d).  Embeddings and the head go to the AdamW fallback and are
    not listed.
    """
    kv = d_model if kv_dim is None else kv_dim
    per_layer: list[tuple[int, int]] = []
    per_layer += [(3 * d_model, d_model)] if fused_qkv else [(d_model, d_model), (kv, d_model), (kv, d_model)]
    per_layer += [(d_model, d_model)]
    per_layer += [(d_ff, d_model), (d_ff, d_model), (d_model, d_ff)] if gated else [(d_ff, d_model), (d_model, d_ff)]
    return per_layer * layers


#: Model shapes for the balance tables (sources: GPT-2 config — d 768/1024, 12/24 layers, d_ff 4d, fused
#: c_attn; Llama-2-7B config — d 4096, 32 layers, d_ff 11008, q/k/v/o/gate/up/down; Llama-3-8B — d 4096,
#: 32 layers, d_ff 14336, GQA with 8 kv heads of 128 → k/v (1024, 4096)).  ``gpt-tiny`` is the small
#: GPT-shaped model of the 2-rank measurement (d 128, 4 layers).
MODELS: dict[str, list[tuple[int, int]]] = {
    "gpt-tiny": transformer_shapes(128, 512, 4, fused_qkv=True),
    "gpt2-small": transformer_shapes(768, 3072, 12, fused_qkv=True),
    "gpt2-medium": transformer_shapes(1024, 4096, 24, fused_qkv=True),
    "llama2-7b": transformer_shapes(4096, 11008, 32, gated=True),
    "llama3-8b": transformer_shapes(4096, 14336, 32, gated=True, kv_dim=1024),
}


def balance_table(models: Sequence[str], worlds: Sequence[int]) -> str:
    """A markdown table of max/mean NS load, LPT vs round robin, per model and world size; ``any plan ≥`` is
    max(mean, largest matrix)/mean — no whole-matrix plan can do better (with more ranks than matrices
    the largest matrix decides)."""
    lines = ["| model | matrices | W | LPT max/mean | round-robin max/mean | any plan ≥ | ranks with work (LPT) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in models:
        shapes = MODELS[name]
        costs = [ns_cost(s) for s in shapes]
        for w in worlds:
            plan = owner_plan(shapes, w)
            lpt = plan_balance(shapes, plan, w)
            rr = plan_balance(shapes, round_robin_plan(shapes, w), w)
            floor = max(sum(costs) / w, max(costs)) * w / sum(costs)   # OPT ≥ mean and ≥ the largest matrix
            lines.append(f"| {name} | {len(shapes)} | {w} | {lpt:.3f} | {rr:.3f} | {floor:.3f} | "
                         f"{len(set(plan))} |")
    return "\n".join(lines)


def traffic_table(models: Sequence[str], world: int, element_bytes: int = 4, steps: int = 5) -> str:
    """A markdown table of per-rank NS FLOPs (standard iteration) and bytes sent per step at ``world``."""
    from .newton_schulz import flops
    lines = [f"| model | W | plan | NS GFLOP per rank (max / min) | FSDP2 owner exchange MB sent per rank (max) "
             f"| DDP broadcast MB sent per rank (max) |", "|---|---:|---|---:|---:|---:|"]
    for name in models:
        shapes = MODELS[name]
        for label, plan in (("LPT", owner_plan(shapes, world)), ("round robin", round_robin_plan(shapes, world))):
            fl = [0] * world
            for s, r in zip(shapes, plan):
                fl[r] += flops(*matrix_dims(s), steps=steps)
            fsdp = exchange_bytes(shapes, world, plan, element_bytes, sharded=True)
            ddp = exchange_bytes(shapes, world, plan, element_bytes, sharded=False)
            lines.append(f"| {name} | {world} | {label} | {max(fl) / 1e9:.3f} / {min(fl) / 1e9:.3f} | "
                         f"{max(fsdp) / 1e6:.2f} | {max(ddp) / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchstep.ops.sharding", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2-small", "gpt2-medium", "llama2-7b", "llama3-8b"],
                        choices=sorted(MODELS))
    parser.add_argument("--worlds", nargs="+", type=int, default=[8, 64, 256, 1024])
    parser.add_argument("--traffic-world", type=int, default=2, help="world size of the FLOPs/bytes table")
    parser.add_argument("--traffic-models", nargs="+", default=["gpt-tiny", "gpt2-small"], choices=sorted(MODELS))
    args = parser.parse_args(argv)
    print(balance_table(args.models, args.worlds))
    print()
    print(traffic_table(args.traffic_models, args.traffic_world))


if __name__ == "__main__":
    main()
