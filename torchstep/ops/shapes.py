"""Matrix views of parameters, written once: the flattened (out, rest) matrix, the wide orientation and
the per-shape step scales every matrix rule uses."""
from __future__ import annotations

import math

from torch import Tensor


def as_matrix(t: Tensor) -> Tensor:
    """Any ``ndim >= 2`` tensor as ``(out, prod(rest))`` — Conv1d ``(out, in, k)`` and Conv2d
    ``(out, in, kh, kw)`` alike; 2-D tensors unchanged.  (Batches of matrices are handled by the
    ops that take them, e.g. :func:`torchstep.ops.newton_schulz.newton_schulz`, never by this view.)"""
    if t.dim() < 2:
        raise ValueError(f"as_matrix needs a tensor with ndim >= 2, got shape {tuple(t.shape)}")
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def matrix_dims(t: Tensor) -> tuple[int, int]:
    """``(d_out, d_in)`` of the flattened matrix view of ``t`` (see :func:`as_matrix`)."""
    return t.shape[0], math.prod(t.shape[1:])


def to_wide(X: Tensor) -> tuple[Tensor, bool]:
    """``(X or Xᵀ, transposed)`` so that rows ≤ columns (the Gram matrix ``X Xᵀ`` is the small one);
    undo with :func:`from_wide`.  Works on batches (…, m, n)."""
    tall = X.shape[-2] > X.shape[-1]
    return (X.mT if tall else X), tall


def from_wide(X: Tensor, transposed: bool) -> Tensor:
    return X.mT if transposed else X


SHAPE_SCALES = ("original", "match_rms_adamw", "spectral_norm", "none")


def shape_scale(rule: str, m: int, n: int) -> float:
    """Per-matrix lr multiplier for an (out m) × (in n) matrix (flattened conv shape).

    ``original`` √max(1, m/n) (Keller's Muon, SPECTRA), ``match_rms_adamw`` 0.2·√max(m, n) (Moonlight),
    ``spectral_norm`` √(m/n) (Dion, μP's spectral condition), ``none`` 1."""
    if rule == "original":
        return math.sqrt(max(1.0, m / n))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "spectral_norm":
        return math.sqrt(m / n)
    if rule == "none":
        return 1.0
    raise ValueError(f"Invalid adjust_lr: {rule!r} (valid range: one of {SHAPE_SCALES})")
