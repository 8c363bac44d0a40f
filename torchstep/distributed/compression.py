"""EF21 / EF21-W error-feedback gradient compression (Top-k, Rand-k) as a DDP communication hook.

EF21 (paper arXiv 2106.05203, Richtárik, Sokolov, Fatkhullin, NeurIPS 2021) keeps, per worker i, an estimate g_i
of its local gradient and communicates only a compressed correction::

    init:  g_i⁰ = ∇f_i(x⁰) (uncompressed),  g⁰ = (1/n) Σ_i g_i⁰
    loop:  x⁺ = x − γ·g                                  # done by any optimizer reading .grad = g
           c_i = C(∇f_i(x⁺) − g_i)                       # contractive compressor, e.g. Top-k
           g_i ← g_i + c_i,   g ← g + (1/n) Σ_i c_i      # g = (1/n) Σ_i g_i stays true on every rank

EF21-W ("Error Feedback Reloaded", paper arXiv 2402.10774, Richtárik, Gasanov, Burlachenko, ICLR 2024) weights
the workers by their smoothness constants, w_i = L_i / Σ_j L_j::

    c_i = C(∇f_i/(n·w_i) − g_i),  g_i ← g_i + c_i,  g = Σ_i w_i g_i   (init g_i⁰ = ∇f_i(x⁰)/(n·w_i))

and improves the theoretical step from 1/(L + L_QM·√(β/θ)) to 1/(L + L_AM·√(β/θ)) (quadratic → arithmetic mean of
the L_i; :func:`ef21_stepsize`).  For a positively homogeneous compressor (Top-k; Rand-k with the same draw) the
two algorithms produce *identical* iterates (derived identity, checked in the tests), so with Top-k the gain of
the paper is simply the larger admissible step for plain EF21.  The exact theorem constants (L vs L_AM in the
first term, conditions) are **unverified — not checked against the paper**; the QM → AM replacement is from
its abstract.  This module uses the formula as written in the project's reference card.

Memory per worker and bucket: two d-sized tensors (g_i and g), in the bucket dtype.  Communication per worker and
step: Top-k sends k values + k int32 indices (``all_gather``); Rand-k sends k values only (indices are regenerated
on every rank from a shared seed).  Dense DDP all-reduce sends d values.  Counted in :class:`EF21State`.

Run ``python -m torchstep.distributed.compression`` to print the measured bytes per step on a small MLP.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_MASK64 = (1 << 64) - 1


def derive_seed(*parts: int) -> int:
    """Mix integers (base seed, step, bucket, rank, …) into one 63-bit seed, identically in every process.

    Python's ``hash`` is not used so the value cannot depend on the interpreter; splitmix64-style mixing.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (int(p) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
    return h & ((1 << 63) - 1)


def _kept(d: int, k: int | None, ratio: float | None) -> int:
    if (k is None) == (ratio is None):
        raise ValueError("give exactly one of k or ratio")
    if k is not None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        return min(k, d)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return min(d, max(1, math.ceil(ratio * d)))


class TopK:
    """Top-k sparsifier C(v) = v on the k largest |v_j|, 0 elsewhere; contractive with α = k/d.

    ‖C(v) − v‖² ≤ (1 − k/d)‖v‖² for every v (deterministic, tested).  Ties at the k-th magnitude are broken by
    the lower index (``torch.topk`` does not specify an order, and every rank and the simulator must agree).

    Args:
        k: coordinates kept per bucket (capped at d), or
        ratio: fraction kept, k = ⌈ratio·d⌉ (at least 1).  Exactly one of the two.
    """

    sends_indices = True

    def __init__(self, k: int | None = None, ratio: float | None = None):
        _kept(1, k, ratio)  # validate
        self.k, self.ratio = k, ratio

    def num_kept(self, d: int) -> int:
        return _kept(d, self.k, self.ratio)

    def select(self, v: Tensor, *, rank: int = 0, step: int = 0, bucket: int = 0) -> Tensor:
        """Sorted int64 indices of the kept coordinates of the flat tensor ``v`` (non-finite v unsupported)."""
        d = v.numel()
        k = self.num_kept(d)
        if k >= d:
            return torch.arange(d, device=v.device)
        a = v.abs()
        thr = torch.topk(a, k, sorted=False).values.min()   # the k-th largest magnitude is unique
        above = (a > thr).nonzero().flatten()
        tied = (a == thr).nonzero().flatten()[: k - above.numel()]
        return torch.cat([above, tied]).sort().values


class RandK:
    """Rand-k sparsifier (unscaled): C(v) = v on k uniformly drawn coordinates; E‖C(v) − v‖² = (1 − k/d)‖v‖².

    The draw depends only on (seed, rank, step, bucket), so other ranks regenerate a worker's indices and only
    the k values travel.  Unscaled (contractive, as EF21 requires), not the unbiased (d/k)-scaled variant.

    Args: ``k`` or ``ratio`` as for :class:`TopK`; ``seed`` (default 0) shared by all ranks.
    """

    sends_indices = False

    def __init__(self, k: int | None = None, ratio: float | None = None, seed: int = 0):
        _kept(1, k, ratio)
        self.k, self.ratio, self.seed = k, ratio, seed

    def num_kept(self, d: int) -> int:
        return _kept(d, self.k, self.ratio)

    def indices(self, d: int, device, *, rank: int, step: int, bucket: int) -> Tensor:
        gen = torch.Generator(device=device)
        gen.manual_seed(derive_seed(self.seed, rank, step, bucket))
        return torch.randperm(d, generator=gen, device=device)[: self.num_kept(d)].sort().values

    def select(self, v: Tensor, *, rank: int = 0, step: int = 0, bucket: int = 0) -> Tensor:
        return self.indices(v.numel(), v.device, rank=rank, step=step, bucket=bucket)


def compress(v: Tensor, compressor, **key) -> Tensor:
    """Dense C(v) (for tests and analysis; the hook never materialises it)."""
    idx = compressor.select(v.flatten(), **key)
    out = torch.zeros_like(v).flatten()
    out[idx] = v.flatten()[idx]
    return out.view_as(v)


# ----------------------------------------------------------------------------------------------- step sizes

def ef21_theta_beta(alpha: float) -> tuple[float, float]:
    """θ = 1 − √(1 − α), β = (1 − α)/(1 − √(1 − α)) for a contractive compressor with parameter α ∈ (0, 1]."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    r = math.sqrt(1.0 - alpha)
    return 1.0 - r, (1.0 - alpha) / (1.0 - r)


def ef21_stepsize(L: float, Ls: Sequence[float], alpha: float, mean: str = "arithmetic") -> float:
    """Theoretical EF21 step γ = 1/(L + M·√(β/θ)).

    Args:
        L: smoothness constant of f = (1/n) Σ f_i.
        Ls: the workers' constants L_i.
        alpha: compressor parameter (k/d for Top-k / Rand-k).
        mean: ``"arithmetic"`` (default) — M = L_AM = (1/n) Σ L_i, the "Error Feedback Reloaded" rule
            (arXiv 2402.10774; stated there for EF21-W and for the new analysis of EF21); ``"quadratic"`` —
            M = L_QM = √((1/n) Σ L_i²), the original EF21 theorem (arXiv 2106.05203).
    Exact theorem constants are unverified against the papers (see the module docstring).  α = 1 (k = d) gives
    γ = 1/L, plain gradient descent.
    """
    Ls = [float(x) for x in Ls]
    if mean == "arithmetic":
        M = sum(Ls) / len(Ls)
    elif mean == "quadratic":
        M = math.sqrt(sum(x * x for x in Ls) / len(Ls))
    else:
        raise ValueError(f"mean must be 'arithmetic' or 'quadratic', got {mean!r}")
    theta, beta = ef21_theta_beta(alpha)
    return 1.0 / (L + M * math.sqrt(beta / theta)) if alpha < 1.0 else 1.0 / L


def ef21w_weights(Ls: Sequence[float]) -> list[float]:
    """EF21-W worker weights w_i = L_i / Σ_j L_j (pass as ``EF21State(weights=...)``)."""
    s = float(sum(Ls))
    if s <= 0 or min(Ls) <= 0:
        raise ValueError("smoothness constants must be positive")
    return [float(x) / s for x in Ls]


# ------------------------------------------------------------------------------- shared EF21 arithmetic

def _aggregate_(g: Tensor, idx: Sequence[Tensor], vals: Sequence[Tensor], weights) -> Tensor:
    """g += (1/n) Σ_j c_j (EF21) or Σ_j w_j c_j (EF21-W), c_j sparse; same op order in hook and simulator."""
    delta = torch.zeros_like(g)
    for j, (ij, vj) in enumerate(zip(idx, vals)):
        delta.index_add_(0, ij.long(), vj if weights is None else vj * weights[j])
    return g.add_(delta.div_(len(idx)) if weights is None else delta)


def _check_weights(weights, n: int):
    if weights is None:
        return None
    if len(weights) != n:
        raise ValueError(f"{len(weights)} weights for {n} workers")
    return [float(w) for w in weights]


def _scaled(grad: Tensor, weights, rank: int) -> Tensor:
    # EF21-W compresses ∇f_i/(n·w_i); plain EF21 uses ∇f_i as is (no multiply by a rounded 1.0)
    return grad if weights is None else grad * (1.0 / (len(weights) * weights[rank]))


class EF21Simulator:
    """Single-process reference of n EF21 / EF21-W workers on flat gradient vectors (fast, deterministic).

    ``init(grads)`` sets g_i⁰ from uncompressed gradients and returns g⁰; ``step(grads)`` returns the new g.
    Uses the same compressor calls (rank = worker index, step = call count + ``step_offset``) and the same
    aggregation arithmetic as :func:`ef21_hook`, so it reproduces a DDP run.  ``bytes_sent``: bytes per worker in
    the last step (values + int32 indices when the compressor sends them).
    """

    def __init__(self, n: int, compressor, weights: Sequence[float] | None = None, step_offset: int = 0):
        self.n, self.compressor = n, compressor
        self.weights = _check_weights(weights, n)
        self.step_count = step_offset
        self.g_local: list[Tensor] = []
        self.g: Tensor | None = None
        self.bytes_sent = 0

    def init(self, grads: Sequence[Tensor]) -> Tensor:
        self.g_local = [_scaled(gr, self.weights, i).clone() for i, gr in enumerate(grads)]
        self.g = sum(gr / self.n for gr in grads)          # what DDP's all_reduce(buffer / n) computes
        self.step_count += 1
        return self.g.clone()

    def step(self, grads: Sequence[Tensor]) -> Tensor:
        idx, vals = [], []
        for i, gr in enumerate(grads):
            v = _scaled(gr, self.weights, i) - self.g_local[i]
            ii = self.compressor.select(v, rank=i, step=self.step_count, bucket=0)
            idx.append(ii)
            vals.append(v[ii])
            self.g_local[i].index_add_(0, ii, vals[-1])
        _aggregate_(self.g, idx, vals, self.weights)
        k = idx[0].numel()
        self.bytes_sent = k * grads[0].element_size() + (4 * k if self.compressor.sends_indices else 0)
        self.step_count += 1
        return self.g.clone()


# ------------------------------------------------------------------------------------------- DDP hook

class _ByteCounter:
    """Per-iteration bytes this worker hands to collectives, vs what DDP's dense all-reduce would hand over."""

    def _reset_bytes(self):
        self.iter = 0
        self.bytes_sent = 0            # last completed iteration, this worker, all buckets
        self.dense_bytes = 0           # same iteration, dense all-reduce payload (d · element size)
        self.total_bytes_sent = 0
        self.total_dense_bytes = 0
        self._iter_bytes = self._iter_dense = 0

    def _count(self, sent: int, dense: int):
        self._iter_bytes += sent
        self._iter_dense += dense

    def _end_bucket(self, bucket):
        # PowerSGD convention: the iteration ends with the last bucket
        if bucket.is_last():
            self.bytes_sent, self.dense_bytes = self._iter_bytes, self._iter_dense
            self.total_bytes_sent += self._iter_bytes
            self.total_dense_bytes += self._iter_dense
            self._iter_bytes = self._iter_dense = 0
            self.iter += 1

    @property
    def compression_ratio(self) -> float:
        """dense_bytes / bytes_sent of the last completed iteration."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else float("nan")

    def __getstate__(self):
        # process groups do not pickle; a restored state uses the default group (PowerSGD does the same)
        return {k: v for k, v in self.__dict__.items() if k != "process_group"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.process_group = None


class EF21State(_ByteCounter):
    """State of :func:`ef21_hook`: per bucket g_i (this worker) and g (the mean estimate, identical on all ranks).

    Args:
        process_group: group to communicate in (default ``None`` = the world group).
        compressor: :class:`TopK` (default ``TopK(ratio=0.01)``) or :class:`RandK` (any object with
            ``select(v, rank=, step=, bucket=)``, ``num_kept(d)`` and ``sends_indices``; fixed k per bucket).
        start_iter: iterations of plain all-reduce averaging before compressing (default 2, must be ≥ 2: DDP
            rebuilds its buckets after iteration 0, and g_i must be taken from the final bucket layout).  The
            last warm-up iteration sets EF21's uncompressed initialisation g_i = ∇f_i, g = mean.
        weights: ``None`` (EF21) or the n EF21-W weights w_i (:func:`ef21w_weights`).
    Attributes: ``iter``; ``bytes_sent`` / ``dense_bytes`` (last completed iteration, this worker) and
    ``total_bytes_sent`` / ``total_dense_bytes``; ``compression_ratio``; ``g_local``, ``g`` keyed by bucket index.
    Memory: 2·d per worker in the bucket dtype (keep gradients in fp32 or fp64: g accumulates corrections).
    """

    def __init__(self, process_group=None, compressor=None, start_iter: int = 2,
                 weights: Sequence[float] | None = None):
        if start_iter < 2:
            raise ValueError("start_iter must be >= 2 (DDP rebuilds buckets after the first iteration)")
        self.process_group = process_group
        self.compressor = compressor if compressor is not None else TopK(ratio=0.01)
        self.start_iter = start_iter
        self.weights = None if weights is None else [float(w) for w in weights]
        self.g_local: dict[int, Tensor] = {}
        self.g: dict[int, Tensor] = {}
        self._reset_bytes()


def _group(state):
    return state.process_group if state.process_group is not None else dist.group.WORLD


def ef21_hook(state, bucket):
    """DDP comm hook: EF21 / EF21-W compressed aggregation; the bucket becomes g = mean_i g_i (or Σ w_i g_i).

    Register once before the first backward: ``ddp_model.register_comm_hook(EF21State(...), ef21_hook)``.
    The bucket buffer holds this worker's local gradient ∇f_i (DDP has not averaged it).  Compressed
    iterations: c_i = C(∇f_i − g_i) is exchanged as (values, int32 indices) with two ``all_gather`` of fixed size
    k (values only for Rand-k); every rank applies all corrections in rank order, so g is bitwise identical on
    all ranks.  Returns a copy of g (DDP copies it into ``.grad``; the state is never aliased).
    """
    group = _group(state)
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    weights = _check_weights(state.weights, n)
    buf, key, it = bucket.buffer(), bucket.index(), state.iter
    dense = buf.numel() * buf.element_size()

    if it < state.start_iter:                     # warm-up: DDP's default mean
        init = it == state.start_iter - 1
        if init:
            state.g_local[key] = _scaled(buf, weights, rank).clone()
        fut = dist.all_reduce(buf.div_(n), group=group, async_op=True).get_future()
        state._count(dense, dense)
        state._end_bucket(bucket)

        def finish_dense(f):
            out = f.value()[0]
            if init:
                state.g[key] = out.clone()
            return out
        return fut.then(finish_dense)

    own, g = state.g_local.get(key), state.g.get(key)
    if own is None or own.shape != buf.shape:
        raise RuntimeError(f"EF21 state for bucket {key} missing or of a different size: buckets changed after "
                           "the warm-up (raise start_iter)")
    comp = state.compressor
    v = _scaled(buf, weights, rank) - own
    idx = comp.select(v, rank=rank, step=it, bucket=key)
    vals = v[idx]
    own.index_add_(0, idx, vals)                  # g_i ← g_i + c_i
    val_list = [torch.empty_like(vals) for _ in range(n)]
    futs = [dist.all_gather(val_list, vals, group=group, async_op=True).get_future()]
    sent = vals.numel() * vals.element_size()
    if comp.sends_indices:
        idx32 = idx.to(torch.int32) if buf.numel() < 2 ** 31 else idx
        idx_list = [torch.empty_like(idx32) for _ in range(n)]
        futs.append(dist.all_gather(idx_list, idx32, group=group, async_op=True).get_future())
        sent += idx32.numel() * idx32.element_size()
    else:                                         # Rand-k: every rank regenerates every worker's draw
        idx_list = [comp.indices(buf.numel(), buf.device, rank=j, step=it, bucket=key) for j in range(n)]
    state._count(sent, dense)
    state._end_bucket(bucket)

    def finish(f):
        for x in f.value():                       # re-raise communication errors
            x.value()
        _aggregate_(g, idx_list, val_list, weights)
        return g.clone()
    return torch.futures.collect_all(futs).then(finish)


# ------------------------------------------------------------------------------------- bytes table

def _bytes_table(steps: int = 4) -> list[tuple[str, int, int, int]]:
    """Train a small MLP for a few DDP steps (world size 1, gloo) under each hook; read the byte counters."""
    import os
    import tempfile

    from .sketch import CountSketch, GaussianSketch, SketchState, sketch_hook

    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            setups = [("dense all-reduce (DDP default)", None, None)]
            for r in (0.1, 0.01):
                setups.append((f"EF21 Top-k, k/d = {r}", EF21State(compressor=TopK(ratio=r)), ef21_hook))
                setups.append((f"EF21 Rand-k, k/d = {r}", EF21State(compressor=RandK(ratio=r)), ef21_hook))
            for r in (0.1, 0.01):
                setups.append((f"CountSketch, s/d = {r}", SketchState(sketch=CountSketch(ratio=r)), sketch_hook))
                setups.append((f"Gaussian sketch, s/d = {r}", SketchState(sketch=GaussianSketch(ratio=r)),
                               sketch_hook))
            for name, state, hook in setups:
                torch.manual_seed(0)
                net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                          torch.nn.ReLU(), torch.nn.Linear(128, 10))
                d = sum(p.numel() for p in net.parameters())
                model = torch.nn.parallel.DistributedDataParallel(net)
                if hook is not None:
                    model.register_comm_hook(state, hook)
                opt = torch.optim.SGD(model.parameters(), lr=1e-2)
                for _ in range(steps):
                    opt.zero_grad()
                    model(torch.randn(32, 64)).square().mean().backward()
                    opt.step()
                sent = d * 4 if state is None else state.bytes_sent
                dense = d * 4 if state is None else state.dense_bytes
                rows.append((name, d, sent, dense))
        finally:
            dist.destroy_process_group()
    return rows


def main():
    rows = _bytes_table()
    print("| method | d (fp32 params) | bytes sent per worker per step | dense all-reduce bytes | dense / sent |")
    print("|---|---|---|---|---|")
    for name, d, sent, dense in rows:
        print(f"| {name} | {d} | {sent} | {dense} | {dense / sent:.1f}× |")


if __name__ == "__main__":
    main()
