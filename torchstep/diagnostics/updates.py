"""Which parameters a finetune changed: update sparsity, per-tensor / per-layer density, update rank.

Mukherjee, Yuan, Hakkani-Tür, Peng, "Reinforcement Learning Finetunes Small Subnetworks in Large Language
Models" (NeurIPS 2025, arXiv 2505.11711); official scripts SagnikMukherjee/sparsity_in_rl (commit c0d5511,
``src/check_sparsity.py``, ``src/update_rank.py``), read, not run.

``Δ = θ_new − θ_ref`` over two checkpoints of the same architecture, tensor by tensor (memory: the largest
tensor, never a concatenation).  An entry is *unchanged* when ``|Δ_i| ≤ tol`` (``tol = 0``: exactly equal).

* update sparsity ``= #unchanged / n`` over every compared entry (the paper's ``1 − ‖Δ‖₀/n`` at ``tol = 0``);
* per-tensor density ``ρ_W = #changed(W) / numel(W)``; per-layer density = unweighted mean of ρ_W over the
  tensors of block i (as the official printout, which calls it "sparsity"), and the numel-weighted mean;
* update rank ``rank(Δ_W)/min(m, n)`` per matrix, averaged over matrices.

**dtype.** ``dtype=None`` compares the checkpoints as stored (a pair of different dtypes in their promoted
dtype).  ``dtype=torch.bfloat16`` first rounds both to bf16 (round-to-nearest-even, ``Tensor.to``) — what the
official scripts do by loading both in bf16.  Δ is then formed in float64 from the (rounded) values, so
"unchanged at tol = 0" means *the two stored values are bit-identical in that dtype*, and ``|Δ| ≤ tol`` is
decided on the exact difference of the two rounded values.  Deviation: the official code forms Δ in bf16, so a
difference can itself be rounded across ``tol``; zero tests agree exactly (x − y = 0 iff x = y in IEEE).
Caveat (ours, not the paper's): bf16's spacing at |w| = 0.02 is 2⁻¹³ ≈ 1.2e-4, so an update below half an ulp
vanishes when a bf16 checkpoint is stored, and for |w| ≳ 2⁻⁹ ≈ 2e-3 one ulp already exceeds ``tol = 1e-5`` —
the tolerance only matters for small weights.  Report fp32 (master-weight) sparsity beside bf16 when both exist.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from ..optim._base import check_range

LAYER_PATTERN = r"(?:^|\.)(?:layers|blocks|h)\.(\d+)\."
Checkpoint = Mapping[str, Tensor] | nn.Module


@dataclass(frozen=True)
class UpdateSparsity:
    """The result of :func:`update_sparsity` (plain data)."""
    sparsity: float                          # fraction of compared entries with |Δ| ≤ tol
    exact_sparsity: float                    # fraction with Δ = 0 exactly (in the comparison dtype)
    changed: int                             # entries with |Δ| > tol
    total: int                               # compared entries
    density: dict[str, float]                # per tensor: changed / numel (at tol)
    layer_density: dict[int, float]          # per block index: unweighted mean of the tensors' densities
    layer_density_weighted: dict[int, float]  # per block index: changed / numel summed over its tensors
    missing: list[str] = field(default_factory=list)   # in ref, not in new
    extra: list[str] = field(default_factory=list)     # in new, not in ref


def _tensors(ckpt: Checkpoint) -> dict[str, Tensor]:
    if isinstance(ckpt, nn.Module):
        return dict(ckpt.named_parameters())      # parameters only, as the official scripts
    return dict(ckpt)


def _default_include(name: str, t: Tensor) -> bool:
    return t.is_floating_point()


def _pairs(ref: Checkpoint, new: Checkpoint, include, strict: bool):
    a, b = _tensors(ref), _tensors(new)
    missing, extra = [k for k in a if k not in b], [k for k in b if k not in a]
    if strict and (missing or extra):
        raise ValueError(f"Invalid checkpoints: keys differ (missing in new: {missing}, extra in new: {extra})")
    out = []
    for name, x in a.items():
        if name not in b or not include(name, x):
            continue
        y = b[name]
        if x.shape != y.shape:
            raise ValueError(f"Invalid checkpoints: {name!r} has shape {tuple(x.shape)} vs {tuple(y.shape)}")
        out.append((name, x, y))
    return out, missing, extra


def parameter_delta(ref: Tensor, new: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """``new − ref`` in float64 after rounding both to ``dtype`` (None: their promoted dtype, no rounding).

    Float64 holds the difference of two bf16/fp16/fp32 values exactly except at extreme exponent gaps, so
    Δ = 0 exactly when the two values are equal in ``dtype``.
    """
    with torch.no_grad():
        dt = dtype if dtype is not None else torch.promote_types(ref.dtype, new.dtype)
        return new.detach().to(dt).to(torch.float64) - ref.detach().to(dt).to(torch.float64)


def update_sparsity(ref: Checkpoint, new: Checkpoint, *, tol: float = 0.0, dtype: torch.dtype | None = None,
                    include: Callable[[str, Tensor], bool] | None = None, layer_pattern: str = LAYER_PATTERN,
                    strict: bool = False) -> UpdateSparsity:
    """Update sparsity and per-tensor / per-layer density between two checkpoints (arXiv 2505.11711).

    ``sparsity = #{i: |Δ_i| ≤ tol} / n``, ``density_W = #{i ∈ W: |Δ_i| > tol} / numel(W)``.

    Args:
        ref, new: the reference (SFT / base) and the finetuned checkpoint: state dicts, or modules (their
            ``named_parameters()``, i.e. buffers excluded, as the official scripts).
        tol: entries with ``|Δ| ≤ tol`` count as unchanged (default 0.0: exact equality, the paper's ‖Δ‖₀;
            the official script also prints ``tol = 1e-5``, via ``isclose(Δ, 0, atol=tol)`` whose rtol term
            vanishes against 0 — identical to this test).  NaN deltas count as changed.
        dtype: comparison dtype (default None: as stored; ``torch.bfloat16`` reproduces the official scripts'
            loading — see the module docstring for what counts as unchanged then).
        include: ``include(name, tensor) -> bool`` selects tensors (default: floating-point tensors).
        layer_pattern: regex whose first group is the block index (default matches ``layers.i.``,
            ``blocks.i.``, ``h.i.`` anywhere in the name; the official code uses names starting
            ``model.layers.`` only).  Names that do not match are counted in the totals, not in a layer.
        strict: raise if the key sets differ (default False: report them in ``missing`` / ``extra``).

    Cost: O(P) time, memory of the largest tensor (in float64).
    """
    check_range("tol", tol, 0.0)
    pairs, missing, extra = _pairs(ref, new, include or _default_include, strict)
    pattern = re.compile(layer_pattern)
    changed = zero = total = 0
    density: dict[str, float] = {}
    per_layer: dict[int, list[tuple[int, int]]] = {}
    for name, x, y in pairs:
        delta = parameter_delta(x, y, dtype)
        n = delta.numel()
        c = int((~(delta.abs() <= tol)).sum())
        changed, total, zero = changed + c, total + n, zero + int((delta == 0).sum())
        density[name] = c / n if n else 0.0
        m = pattern.search(name)
        if m:
            per_layer.setdefault(int(m.group(1)), []).append((c, n))
    layer = {i: sum(c / n for c, n in v if n) / len(v) for i, v in sorted(per_layer.items())}
    weighted = {i: sum(c for c, _ in v) / max(sum(n for _, n in v), 1) for i, v in sorted(per_layer.items())}
    return UpdateSparsity(sparsity=1 - changed / total if total else float("nan"),
                          exact_sparsity=zero / total if total else float("nan"), changed=changed, total=total,
                          density=density, layer_density=layer, layer_density_weighted=weighted,
                          missing=missing, extra=extra)


@dataclass(frozen=True)
class UpdateRank:
    """The result of :func:`update_rank`."""
    rank: dict[str, int]            # per matrix: numerical rank of Δ
    max_rank: dict[str, int]        # per matrix: min(m, n)
    mean_ratio: float               # mean over matrices of rank / min(m, n)


def update_rank(ref: Checkpoint, new: Checkpoint, *, dtype: torch.dtype | None = None,
                rank_dtype: torch.dtype = torch.float32, atol: float | None = None, rtol: float | None = None,
                exclude: Iterable[str] = ("layernorm",),
                include: Callable[[str, Tensor], bool] | None = None, strict: bool = False) -> UpdateRank:
    """Numerical rank of every matrix update ``Δ_W``, relative to full rank (arXiv 2505.11711).

    ``rank(Δ_W) = #{σ_i > max(atol, rtol·σ_max)}`` (``torch.linalg.matrix_rank``); reported per matrix and as
    ``mean_W rank(Δ_W)/min(m, n)``.

    Args:
        ref, new: checkpoints as :func:`update_sparsity`.
        dtype: rounding of both checkpoints before Δ is formed (default None: as stored; see the module
            docstring).
        rank_dtype: dtype of the SVD (default float32, as the official script).
        atol, rtol: singular-value tolerances (default both None: torch's default
            ``rtol = eps(rank_dtype)·max(m, n)``, ``atol = 0`` — the official script's choice).
        exclude: name substrings to skip, case-insensitive (default ``("layernorm",)``, as the official script).
            Tensors with fewer than 2 dims are always skipped; a tensor with more is flattened to
            ``(shape[0], −1)``.
        include, strict: as :func:`update_sparsity`.

    Cost: one SVD per matrix, O(m·n·min(m, n)).
    """
    pairs, _, _ = _pairs(ref, new, include or _default_include, strict)
    skip = tuple(s.lower() for s in exclude)
    rank, max_rank = {}, {}
    for name, x, y in pairs:
        if x.dim() < 2 or any(s in name.lower() for s in skip):
            continue
        delta = parameter_delta(x, y, dtype).reshape(x.shape[0], -1).to(rank_dtype)
        rank[name] = int(torch.linalg.matrix_rank(delta, atol=atol, rtol=rtol))
        max_rank[name] = min(delta.shape)
    ratio = [rank[k] / max_rank[k] for k in rank if max_rank[k]]
    return UpdateRank(rank=rank, max_rank=max_rank,
                      mean_ratio=sum(ratio) / len(ratio) if ratio else float("nan"))


__all__ = ["UpdateSparsity", "UpdateRank", "parameter_delta", "update_sparsity", "update_rank", "LAYER_PATTERN"]
