"""Stages 2 and 4 of ``torchstep.objectives``: token weights and loss aggregation.

Reference card: ``rl_objectives.md`` §2 (aggregation modes), §3 (GTPO conflict tokens), §4 (the
normaliser / gradient-accumulation pitfall).  The GTPO token weights and GTPO's own conflict-normalised
reduction live in :mod:`torchstep.objectives.gtpo` (``gtpo_conflict_token_weights`` is re-exported here).  torch only; no host syncs in :func:`aggregate` when
``check=False`` and ``num_seqs``/``num_groups`` are given.

Contract (card §2/§4): ``normalizer`` is the **global** count of the optimisation batch (tokens, sequences,
groups or Dr.GRPO's constant), supplied by the trainer.  Per-micro-batch results are **summed**; there is
no hidden division by accumulation steps.  Under DDP mean-reduction pass ``normalizer / world_size``.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from ._checks import check_token_pair
from .gtpo import gtpo_conflict_token_weights  # stage 2 (GTPO); defined in gtpo.py, re-exported here

__all__ = ["AGGREGATION_MODES", "aggregate", "gtpo_conflict_token_weights"]

#: mode -> what ``normalizer`` counts (global over the optimisation batch)
AGGREGATION_MODES = {
    "token-mean": "active tokens (Σ w>0 or Σ mask) of the whole batch",
    "seq-mean-token-mean": "sequences of the whole batch",
    "seq-mean-token-sum": "sequences of the whole batch",
    "seq-mean-token-sum-norm": "Dr.GRPO constant C (TRL: B·max_completion_length via max_len; verl: loss_scale_factor)",
    "group-mean-token-mean": "prompt groups of the whole batch (DAPO token_mean_scope='group')",
    "luspo": "sequences of the whole batch",
    "trl-bnpo": "none: local Σ w of the given micro-batch (TRL loss_type='bnpo'; NOT micro-batch invariant)",
}

_SEQ_MODES = {"seq-mean-token-mean", "seq-mean-token-sum", "group-mean-token-mean", "luspo"}

Number = Union[int, float]


def _per_seq(x: Tensor, seq_ids: Optional[Tensor], num_seqs: Optional[int]) -> Tensor:
    if x.dim() == 2:
        return x.sum(-1)
    S = int(seq_ids.max()) + 1 if num_seqs is None else int(num_seqs)
    return torch.zeros(S, dtype=x.dtype, device=x.device).index_add(0, seq_ids, x)


def aggregate(loss: Tensor, weights: Tensor, mode: str, normalizer: Optional[Union[Number, Tensor]] = None, *,
              max_len: Optional[int] = None, seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
              group_ids: Optional[Tensor] = None, num_groups: Optional[int] = None,
              check: bool = True) -> Tensor:
    """Reduce a per-token loss to a scalar (card §2 table) with an explicit global normaliser.

    With w = mask × token weights, |o_i|_w = Σ_t w_{i,t}, and Z = ``normalizer``:

    * ``token-mean`` (DAPO; TRL ``dapo``/``cispo``):        Σ_{i,t} ℓ w / Z,  Z = global active tokens
    * ``seq-mean-token-mean`` (GRPO; TRL ``grpo``):         Σ_i (Σ_t ℓ w / Σ_t w) / Z,  Z = global sequences
    * ``seq-mean-token-sum`` (verl option):                 Σ_i Σ_t ℓ w / Z,  Z = global sequences
    * ``seq-mean-token-sum-norm`` (Dr.GRPO):                Σ_{i,t} ℓ w / C,  C = Z·max_len if ``max_len``
      is given (TRL: Z = global B, max_len = max_completion_length) else C = Z (verl ``loss_scale_factor``)
    * ``group-mean-token-mean`` (DAPO per-group scope, TRL PR #5828 / verl #2776):
      Σ_g (Σ_{i∈g,t} ℓ w / Σ_{i∈g,t} w) / Z,  Z = global groups (micro-batches must not split a group)
    * ``luspo`` (LUSPO; card table only, formula mean_i(ℓ_i·|o_i|)):  Σ_i ℓ̄_i·n_i / Z with
      ℓ̄_i = Σ_t ℓ w / Σ_t w and n_i = #{t: w_{i,t} > 0}; for w = mask it equals ``seq-mean-token-sum``
    * ``trl-bnpo`` (TRL ``loss_type="bnpo"``, not the BNPO paper): Σ ℓ w / Σ w over the **local** tensor;
      ``normalizer`` must be None.  Kept for parity; it is *not* micro-batch invariant.

    Summing ``aggregate`` over micro-batches with the same global Z equals the full-batch value (all modes
    but ``trl-bnpo``); sequence/group modes need whole sequences/groups per micro-batch.

    Args:
        loss: per-token loss, (B, T) padded (rows = sequences) or (N,) flat.
        weights: w = mask × token weights, same shape (bool or float).
        mode: one of :data:`AGGREGATION_MODES`.
        normalizer: global count Z (Python number or 0-d tensor, > 0).  Required except for ``trl-bnpo``.
        max_len: Dr.GRPO's max completion length (``seq-mean-token-sum-norm`` only).
        seq_ids, num_seqs: flat layout only — sequence id in [0, num_seqs) per token (sequence modes).
            ``num_seqs=None`` reads ``seq_ids.max()+1`` (a host sync).
        group_ids, num_groups: group id in [0, num_groups) per **sequence** (``group-mean-token-mean``).
        check: value checks that need a host sync (weights not all zero, tensor normaliser > 0).
    Raises: ValueError on unknown mode, mismatched shapes, empty/all-zero weights, bad normaliser.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {sorted(AGGREGATION_MODES)}")
    check_token_pair(loss, weights, "loss", "weights")
    if max_len is not None and mode != "seq-mean-token-sum-norm":
        raise ValueError("max_len is only used by mode 'seq-mean-token-sum-norm'")
    if max_len is not None and (not isinstance(max_len, int) or max_len <= 0):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if mode == "trl-bnpo":
        if normalizer is not None:
            raise ValueError("mode 'trl-bnpo' normalises by the local Σ w; pass normalizer=None")
    else:
        if normalizer is None:
            raise ValueError(f"mode {mode!r} needs an explicit global normalizer ({AGGREGATION_MODES[mode]})")
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError("a tensor normalizer must have one element")
            if check and not bool(normalizer > 0):
                raise ValueError(f"normalizer must be > 0, got {normalizer}")
        elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) \
                or not math.isfinite(normalizer) or normalizer <= 0:
            raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    if loss.dim() == 1 and mode in _SEQ_MODES:
        if seq_ids is None:
            raise ValueError(f"flat (N,) input with mode {mode!r} needs seq_ids")
        if seq_ids.shape != loss.shape:
            raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} != loss shape {tuple(loss.shape)}")
        seq_ids = seq_ids.long()
    elif seq_ids is not None and loss.dim() == 2:
        raise ValueError("seq_ids is only for the flat (N,) layout; rows are sequences in (B, T)")
    if mode == "group-mean-token-mean" and group_ids is None:
        raise ValueError("mode 'group-mean-token-mean' needs group_ids (one per sequence)")
    if group_ids is not None and mode != "group-mean-token-mean":
        raise ValueError("group_ids is only used by mode 'group-mean-token-mean'")

    w = weights.to(loss.dtype)
    if check and not bool((w != 0).any()):
        raise ValueError("weights/mask select no token")
    lw = loss * w

    if mode == "trl-bnpo":
        return lw.sum() / w.sum().clamp(min=1.0)
    if mode == "token-mean":
        return lw.sum() / normalizer
    if mode == "seq-mean-token-sum-norm":
        c = normalizer * max_len if max_len is not None else normalizer
        return lw.sum() / c
    seq_num = _per_seq(lw, seq_ids, num_seqs)
    if mode == "seq-mean-token-sum":
        return seq_num.sum() / normalizer
    seq_den = _per_seq(w, seq_ids, num_seqs if num_seqs is not None else seq_num.shape[0])
    if mode == "seq-mean-token-mean":
        return (seq_num / seq_den.clamp(min=torch.finfo(w.dtype).tiny)).sum() / normalizer
    if mode == "luspo":
        n_active = _per_seq((weights != 0).to(loss.dtype), seq_ids, seq_num.shape[0])
        return (seq_num / seq_den.clamp(min=torch.finfo(w.dtype).tiny) * n_active).sum() / normalizer
    # group-mean-token-mean
    if group_ids.dim() != 1 or group_ids.shape[0] != seq_num.shape[0]:
        raise ValueError(f"group_ids must be (num_seqs,) = ({seq_num.shape[0]},), got {tuple(group_ids.shape)}")
    gid = group_ids.long()
    G = int(gid.max()) + 1 if num_groups is None else int(num_groups)
    g_num = torch.zeros(G, dtype=loss.dtype, device=loss.device).index_add(0, gid, seq_num)
    g_den = torch.zeros(G, dtype=loss.dtype, device=loss.device).index_add(0, gid, seq_den)
    return (g_num / g_den.clamp(min=torch.finfo(w.dtype).tiny)).sum() / normalizer
