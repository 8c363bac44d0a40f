"""Gradient sketching (Gaussian, CountSketch) with shared-seed sketch matrices, as a DDP communication hook.

"Sketching for First Order Method: Efficient Algorithm for Low-Bandwidth Channel and Vulnerability" (paper arXiv
2210.08371, Song, Wang, Yu, Zhang, ICML 2023): each worker sends R·g_i ∈ R^s (s ≪ d) instead of g_i ∈ R^d and the
receiver de-sketches with Rᵀ.  Because sketching is linear, an ``all_reduce`` of the sketches gives R·Σ_i g_i, so::

    round t:  R_t from a seed shared by all ranks (regenerated, never stored or sent)
              y = Σ_i R_t g_i                       (all_reduce of s numbers per worker)
              g = R_tᵀ y / n = R_tᵀ R_t · (1/n) Σ_i g_i      E[R_tᵀ R_t] = I  ⇒  unbiased

Variance factors, E‖RᵀRg − g‖² = factor·‖g‖² (derived; checked by Monte Carlo in the tests):
Gaussian R with N(0, 1/s) entries: (d + 1)/s;  CountSketch (one ±1 per column, uniform bucket): (d − 1)/s.

What the paper specifies beyond the abstract (its sketch family, s as a function of d, local steps, the
differential-privacy noise) is **unverified — not checked against the paper**.  Choices made here: a fresh R per
iteration and bucket (seed = f(seed, iteration, bucket index)); no DP noise (the abstract notes that sketching
alone does not protect against gradient-leakage attacks).  Unlike EF21 there is no error feedback and no state,
but the variance grows like d/s, so small s needs small steps.

Cost per bucket and step: Gaussian s·d multiply-adds and s·d random numbers, twice (sketch and de-sketch),
generated in column blocks of at most ``block_elems`` entries so memory stays O(s·block); CountSketch O(d) with
two d-sized hash tensors transient.  Bytes sent per worker: s values.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .compression import _ByteCounter, _group, _kept, derive_seed


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # half-precision buckets are sketched in fp32 (sums of d terms)
    return torch.promote_types(dtype, torch.float32)


class GaussianSketch:
    """Dense Gaussian sketch R ∈ R^{s×d}, entries N(0, 1/s); variance factor (d + 1)/s.

    Args:
        s: sketch size per bucket (capped at d), or ratio: s = ⌈ratio·d⌉.  Exactly one.
        block_elems: largest block of R generated at once (default 2²⁰ entries).
    """

    def __init__(self, s: int | None = None, ratio: float | None = None, block_elems: int = 1 << 20):
        _kept(1, s, ratio)
        self.s, self.ratio, self.block_elems = s, ratio, block_elems

    def size(self, d: int) -> int:
        return _kept(d, self.s, self.ratio)

    def variance_factor(self, d: int) -> float:
        return (d + 1) / self.size(d)

    def _blocks(self, d: int, s: int, seed: int, dtype, device):
        width = max(1, self.block_elems // s)
        for b, j0 in enumerate(range(0, d, width)):
            j1 = min(d, j0 + width)
            gen = torch.Generator(device=device)
            gen.manual_seed(derive_seed(seed, b))   # each block regenerable on its own
            yield j0, j1, torch.randn(s, j1 - j0, generator=gen, dtype=dtype, device=device) / math.sqrt(s)

    def sketch(self, v: Tensor, seed: int) -> Tensor:
        """y = R·v for a flat v (returned in v's dtype promoted to at least fp32)."""
        v = v.to(_work_dtype(v.dtype))
        s = self.size(v.numel())
        y = torch.zeros(s, dtype=v.dtype, device=v.device)
        for j0, j1, R in self._blocks(v.numel(), s, seed, v.dtype, v.device):
            y.addmv_(R, v[j0:j1])
        return y

    def desketch(self, y: Tensor, d: int, seed: int) -> Tensor:
        """Rᵀ·y ∈ R^d."""
        out = torch.empty(d, dtype=y.dtype, device=y.device)
        for j0, j1, R in self._blocks(d, y.numel(), seed, y.dtype, y.device):
            torch.mv(R.t(), y, out=out[j0:j1])
        return out


class CountSketch:
    """CountSketch: column j of R has one entry σ_j ∈ {±1} in row h_j ~ U{0..s−1}; variance factor (d − 1)/s.

    Args: ``s`` or ``ratio`` as for :class:`GaussianSketch`.
    """

    def __init__(self, s: int | None = None, ratio: float | None = None):
        _kept(1, s, ratio)
        self.s, self.ratio = s, ratio

    def size(self, d: int) -> int:
        return _kept(d, self.s, self.ratio)

    def variance_factor(self, d: int) -> float:
        return (d - 1) / self.size(d)

    def _hash(self, d: int, s: int, seed: int, dtype, device):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        rows = torch.randint(s, (d,), generator=gen, device=device)
        signs = torch.randint(2, (d,), generator=gen, device=device).to(dtype).mul_(2).sub_(1)
        return rows, signs

    def sketch(self, v: Tensor, seed: int) -> Tensor:
        v = v.to(_work_dtype(v.dtype))
        s = self.size(v.numel())
        rows, signs = self._hash(v.numel(), s, seed, v.dtype, v.device)
        return torch.zeros(s, dtype=v.dtype, device=v.device).index_add_(0, rows, signs * v)

    def desketch(self, y: Tensor, d: int, seed: int) -> Tensor:
        rows, signs = self._hash(d, y.numel(), seed, y.dtype, y.device)
        return signs * y[rows]


class SketchState(_ByteCounter):
    """State of :func:`sketch_hook`.

    Args:
        process_group: group to communicate in (default ``None`` = world).
        sketch: :class:`CountSketch` (default ``CountSketch(ratio=0.01)``) or :class:`GaussianSketch`.
        seed: base seed shared by all ranks (default 0); R for iteration t, bucket b uses
            ``derive_seed(seed, t, b)``.
    Attributes: ``iter``, ``bytes_sent`` / ``dense_bytes`` (last completed iteration, this worker),
    ``total_bytes_sent`` / ``total_dense_bytes``, ``compression_ratio``.  No per-parameter memory.
    """

    def __init__(self, process_group=None, sketch=None, seed: int = 0):
        self.process_group = process_group
        self.sketch = sketch if sketch is not None else CountSketch(ratio=0.01)
        self.seed = seed
        self._reset_bytes()


def sketch_hook(state, bucket):
    """DDP comm hook: bucket ← Rᵀ(Σ_i R·∇f_i)/n with a shared-seed sketch R (unbiased estimate of the mean).

    Register with ``ddp_model.register_comm_hook(SketchState(...), sketch_hook)``.  Every rank sends s numbers
    through one ``all_reduce`` (sum) and de-sketches the same sum, so the result is identical on all ranks.
    """
    group = _group(state)
    n = dist.get_world_size(group)
    buf, d = bucket.buffer(), bucket.buffer().numel()
    seed = derive_seed(state.seed, state.iter, bucket.index())
    y = state.sketch.sketch(buf, seed)
    fut = dist.all_reduce(y, group=group, async_op=True).get_future()
    state._count(y.numel() * y.element_size(), d * buf.element_size())
    state._end_bucket(bucket)

    def finish(f):
        return state.sketch.desketch(f.value()[0], d, seed).div_(n).to(buf.dtype)
    return fut.then(finish)
