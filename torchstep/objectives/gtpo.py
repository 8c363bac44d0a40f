"""GTPO (Simoni et al. 2025, arXiv 2508.03772; author repo winstonsmith1897/GTPO) as stage functions.

Card ``rl_objectives.md`` §3 GTPO, checked against the author's ``gtpo/gtpo_training.py`` (read, not copied;
constants ``ENT_THRESHOLD = 0.7``, ``ENT_SCALE = 0.1``, ``W_RAW = 2.0`` in its ``config.yaml``):

    stage 1   A_i = r_i − mean_g r                              (author code: the std division is commented out)
    stage 2   λ_{i,t} = conflict-token weights (2 on A>0, 0 on A<0 conflict runs, 1 elsewhere)   [code]
    stage 1b  H_i = masked token mean of the per-token entropy (detached)                   [code]
              A_i ← 0 if H_i > τ, else A_i − γ·H_i   (τ = 0.7, γ = 0.1; every sign, A = 0 included) [code]
    stage 3   ℓ_{i,t} = −(π/sg(π))_{i,t}·A_i       (ratio of value 1 that carries the gradient; no clip, no KL)
    stage 4   L = Σ_i [Σ_t ℓ_{i,t} λ_{i,t} m_{i,t} / |o_i|] / max(n_i, 1) / Z

with |o_i| = Σ_t m_{i,t} (the *mask* count, not Σ λ m) and n_i the number of conflict tokens of completion i.
The author code sums the per-completion terms (Z = 1); here Z is an explicit normaliser, so summing
micro-batches (whole groups each) with the same Z gives the full-batch loss.  The conflict weights use the
sign of the stage-1 advantages *before* entropy shaping (the author code builds them first).

Name clash: "Group Token Policy Optimization" (Tan et al., arXiv 2508.04349) is a different method; all
functions here carry the ``gtpo_`` prefix and refer to Simoni et al.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["gtpo_conflict_tokens", "gtpo_conflict_token_weights", "gtpo_num_conflict_tokens",
           "gtpo_sequence_entropy", "gtpo_entropy_filter", "gtpo_entropy_shaping", "gtpo_entropy_advantages",
           "gtpo_surrogate", "gtpo_aggregate"]

Number = Union[int, float]


def _check_seq_tensors(token_ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor) -> None:
    if not isinstance(token_ids, Tensor) or token_ids.dim() != 2:
        raise ValueError(f"token_ids must be a (B, T) tensor, got {tuple(getattr(token_ids, 'shape', ()))}")
    if not isinstance(mask, Tensor) or mask.shape != token_ids.shape:
        raise ValueError(f"mask shape {tuple(getattr(mask, 'shape', ()))} != token_ids shape {tuple(token_ids.shape)}")
    B, T = token_ids.shape
    if B == 0 or T == 0:
        raise ValueError("empty token_ids")
    if token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
        raise ValueError("token_ids must be an integer tensor")
    if not isinstance(advantages, Tensor) or advantages.shape != (B,):
        raise ValueError(f"advantages must be ({B},), got {tuple(getattr(advantages, 'shape', ()))}")
    if not isinstance(group_ids, Tensor) or group_ids.shape != (B,):
        raise ValueError(f"group_ids must be ({B},), got {tuple(getattr(group_ids, 'shape', ()))}")


def _conflict_raw(keys: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
    """(i, t) is a conflict when its key occurs in an opposite-sign valid token of the group."""
    pos_keys = torch.where(pos, keys, torch.full_like(keys, -1))
    neg_keys = torch.where(neg, keys, torch.full_like(keys, -2))
    return (pos & torch.isin(keys, neg_keys)) | (neg & torch.isin(keys, pos_keys))


def gtpo_conflict_tokens(token_ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor, *,
                         trailing: bool = False) -> Tuple[Tensor, Tensor]:
    """GTPO conflict-token runs (Simoni et al. 2025, arXiv 2508.03772) [code per card + author code].

    A valid token (i, t) of a completion with A_i ≠ 0 is a *raw conflict* when the same token id sits at the
    same position in at least one valid token of an opposite-sign completion of the same group.  Only runs
    count:

    * leading run (card rule, always): t = 0, 1, … up to the first non-conflict position of completion i;
    * trailing run (``trailing=True``, author code's second pass): positions are counted from the **end**
      of each completion (s = |o_i| − 1 − t), raw conflicts are recomputed on that alignment, and the run
      t = |o_i| − 1, |o_i| − 2, … up to the first non-conflict is taken.  Needs left-aligned masks (each row
      a prefix of ones).

    Args:
        token_ids: (B, T) integer ids aligned at the completion start.
        mask: (B, T) validity mask.
        advantages: (B,) per-completion advantages (only the sign is used; A = 0 rows never conflict).
        group_ids: (B,) prompt-group ids (any integers; unequal group sizes allowed).
        trailing: also compute the trailing run (default False, the card's leading-run rule).
    Returns: ``(leading, trailing_run)`` bool (B, T) tensors (``trailing_run`` all False unless
    ``trailing``).  Host syncs: a few (id checks, id range); this runs once per batch, outside the loss.
    Raises: ValueError on shape/dtype errors, negative ids, non-prefix masks with ``trailing=True``.
    """
    _check_seq_tensors(token_ids, mask, advantages, group_ids)
    B, T = token_ids.shape
    ids = token_ids.long()
    if bool((ids < 0).any()):
        raise ValueError("token ids must be >= 0")
    valid = mask.bool()
    _, gid = torch.unique(group_ids, return_inverse=True)
    V = int(ids.max()) + 1
    if (int(gid.max()) + 1) * T * V >= 2 ** 62:
        raise ValueError("group count × length × vocab too large for int64 keys")
    pos = (advantages > 0).unsqueeze(1) & valid
    neg = (advantages < 0).unsqueeze(1) & valid
    t_idx = torch.arange(T, device=ids.device).expand(B, T)
    keys = (gid.unsqueeze(1) * T + t_idx) * V + ids
    leading = torch.cumprod(_conflict_raw(keys, pos, neg).to(torch.int64), dim=1).bool()
    trail = torch.zeros_like(leading)
    if trailing:
        lengths = valid.sum(-1)
        if not torch.equal(valid, t_idx < lengths.unsqueeze(1)):
            raise ValueError("trailing=True needs left-aligned masks (each row a prefix of ones)")
        s_idx = (lengths.unsqueeze(1) - 1 - t_idx).clamp(min=0)          # position counted from the end
        rkeys = (gid.unsqueeze(1) * T + s_idx) * V + ids
        raw_r = _conflict_raw(rkeys, pos, neg)
        # reorder each row by s (s = 0 is the last valid token), take the run, map back
        src = (lengths.unsqueeze(1) - 1 - t_idx).clamp(min=0)            # t of the token with s = column index
        by_s = torch.gather(raw_r, 1, src) & (t_idx < lengths.unsqueeze(1))
        run_s = torch.cumprod(by_s.to(torch.int64), dim=1).bool()
        trail = torch.gather(run_s, 1, s_idx) & valid
    return leading & valid, trail


def gtpo_conflict_token_weights(token_ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor, *,
                                pos_weight: float = 2.0, neg_weight: float = 0.0,
                                trailing: bool = False) -> Tensor:
    """GTPO conflict-token weights λ_{i,t}·m_{i,t} (Simoni et al. 2025, arXiv 2508.03772) [code per card].

    λ = ``pos_weight`` (2.0) on conflict-run tokens of A > 0 completions, ``neg_weight`` (0.0) on those of
    A < 0 completions, 1 elsewhere; runs as in :func:`gtpo_conflict_tokens`.  With ``trailing=True`` the
    leading-run and trailing-run factors are **multiplied**, as in the author code (a positive token in both
    runs gets pos_weight², a negative one 0); default False keeps the card's leading-run rule (§6 #10).
    Returns λ·mask as float32, shape (B, T).

    Args: as :func:`gtpo_conflict_tokens`, plus ``pos_weight`` / ``neg_weight`` (finite, >= 0).
    """
    for name, v in (("pos_weight", pos_weight), ("neg_weight", neg_weight)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    leading, trail = gtpo_conflict_tokens(token_ids, mask, advantages, group_ids, trailing=trailing)
    valid = mask.bool()
    pos = (advantages > 0).unsqueeze(1)
    neg = (advantages < 0).unsqueeze(1)

    def factor(run):
        lam = torch.ones(run.shape, dtype=torch.float32, device=run.device)
        lam = torch.where(run & pos, torch.full_like(lam, float(pos_weight)), lam)
        return torch.where(run & neg, torch.full_like(lam, float(neg_weight)), lam)

    lam = factor(leading)
    if trailing:
        lam = lam * factor(trail)
    return lam * valid.to(lam.dtype)


def gtpo_num_conflict_tokens(token_ids: Tensor, mask: Tensor, advantages: Tensor, group_ids: Tensor, *,
                             trailing: bool = False) -> Tensor:
    """n_i = number of conflict-run tokens of completion i (leading ∪ trailing run, valid tokens), (B,) float.

    This is GTPO's per-completion loss divisor (author code: clamped to >= 1 in the loss; rows with A = 0
    have n_i = 0).  Args as :func:`gtpo_conflict_tokens`.
    """
    leading, trail = gtpo_conflict_tokens(token_ids, mask, advantages, group_ids, trailing=trailing)
    return (leading | trail).sum(-1).to(torch.float32)


def gtpo_sequence_entropy(entropy: Tensor, mask: Tensor) -> Tensor:
    """H_i = Σ_t m_{i,t} H_{i,t} / max(Σ_t m_{i,t}, 1), detached (author code: grad-free, ``n_tok`` ≥ 1).

    Args:
        entropy: (B, T) per-token entropies of the **current** policy's full next-token distribution
            (natural log; the author code computes them from the new logits).
        mask: (B, T) validity mask.
    Returns: (B,) tensor in entropy's dtype.
    """
    if not isinstance(entropy, Tensor) or entropy.dim() != 2:
        raise ValueError(f"entropy must be a (B, T) tensor, got {tuple(getattr(entropy, 'shape', ()))}")
    if not isinstance(mask, Tensor) or mask.shape != entropy.shape:
        raise ValueError(f"mask shape {tuple(getattr(mask, 'shape', ()))} != entropy shape {tuple(entropy.shape)}")
    m = mask.to(entropy.dtype)
    return ((entropy.detach() * m).sum(-1) / m.sum(-1).clamp(min=1.0))


def _check_adv_entropy(advantages: Tensor, seq_entropy: Tensor) -> None:
    if not isinstance(advantages, Tensor) or advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,), got {tuple(getattr(advantages, 'shape', ()))}")
    if not isinstance(seq_entropy, Tensor) or seq_entropy.shape != advantages.shape:
        raise ValueError(f"seq_entropy must be {tuple(advantages.shape)}, got "
                         f"{tuple(getattr(seq_entropy, 'shape', ()))}")


def _check_pos_finite(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def gtpo_entropy_filter(advantages: Tensor, seq_entropy: Tensor, tau: float = 0.7) -> Tensor:
    """GTPO entropy filter: A_i ← 0 where H_i > τ (default τ = 0.7, author ``ENT_THRESHOLD``) [code].

    The paper calls τ "a provable threshold"; the value 0.7 is the released code's.  H_i = τ is kept
    (the code keeps ``H <= τ``).  Args: ``advantages`` (B,), ``seq_entropy`` (B,) from
    :func:`gtpo_sequence_entropy`, ``tau`` >= 0.
    """
    _check_adv_entropy(advantages, seq_entropy)
    _check_pos_finite("tau", tau)
    return torch.where(seq_entropy.to(advantages.dtype) > tau, torch.zeros_like(advantages), advantages)


def gtpo_entropy_shaping(advantages: Tensor, seq_entropy: Tensor, gamma: float = 0.1,
                         tau: Optional[float] = 0.7) -> Tensor:
    """GTPO entropy shaping: A_i ← A_i − γ·H_i (default γ = 0.1, author ``ENT_SCALE``) [code].

    Applied to **every** completion with H_i ≤ τ whatever the sign of A_i — including A_i = 0 ones, which
    thus get −γ·H_i (author code: ``where(H <= τ, A − γ·H, 0)``).  Completions with H_i > τ are left as
    given (run :func:`gtpo_entropy_filter` first, or use :func:`gtpo_entropy_advantages`); ``tau=None``
    shapes all.
    """
    _check_adv_entropy(advantages, seq_entropy)
    _check_pos_finite("gamma", gamma)
    if tau is not None:
        _check_pos_finite("tau", tau)
    h = seq_entropy.to(advantages.dtype)
    shaped = advantages - gamma * h
    return shaped if tau is None else torch.where(h > tau, advantages, shaped)


def gtpo_entropy_advantages(advantages: Tensor, seq_entropy: Tensor, *, tau: float = 0.7,
                            gamma: float = 0.1) -> Tensor:
    """Filter then shape (author code's one-liner): A_i ← (A_i − γ·H_i) if H_i ≤ τ else 0 [code].

    Defaults τ = 0.7, γ = 0.1 (author ``config.yaml``).  Returns (B,) in ``advantages``' dtype.
    """
    return gtpo_entropy_shaping(gtpo_entropy_filter(advantages, seq_entropy, tau), seq_entropy, gamma, tau)


def gtpo_surrogate(logp: Tensor, advantages: Tensor) -> Tensor:
    """GTPO per-token surrogate ℓ_{i,t} = −exp(logp − sg(logp))·A_i  (value −A_i, gradient −A_i·∇logp) [code].

    The author code's "ratio = 1 with gradient" π/sg(π): an on-policy REINFORCE term with no clip, no old
    policy and no KL.  Args: ``logp`` (B, T) with grad, ``advantages`` (B,) (detached here).
    """
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a (B, T) tensor, got {tuple(getattr(logp, 'shape', ()))}")
    if not isinstance(advantages, Tensor) or advantages.shape != (logp.shape[0],):
        raise ValueError(f"advantages must be ({logp.shape[0]},), got {tuple(getattr(advantages, 'shape', ()))}")
    return -torch.exp(logp - logp.detach()) * advantages.detach().to(logp.dtype).unsqueeze(-1)


def gtpo_aggregate(loss: Tensor, token_weights: Tensor, mask: Tensor, num_conflict: Tensor,
                   normalizer: Union[Number, Tensor]) -> Tensor:
    """GTPO's conflict-normalised reduction with an explicit normaliser Z [code; Z explicit here].

    L = Σ_i [Σ_t ℓ_{i,t} λ_{i,t} m_{i,t} / max(Σ_t m_{i,t}, 1)] / max(n_i, 1) / Z.

    The token mean divides by the **mask** count |o_i| (author code ``n_tok``), not by Σ_t λ m, so the
    weights λ rescale the sequence's gradient.  The author code sums over completions (Z = 1); pass Z = the
    global number of completions for a per-completion mean.  Micro-batches (whole sequences; the weights
    and n_i must have been computed on whole groups) summed with one Z give the full-batch value.

    Args:
        loss: (B, T) per-token loss (e.g. :func:`gtpo_surrogate`).
        token_weights: (B, T) λ (e.g. :func:`gtpo_conflict_token_weights`; multiplied by ``mask`` here).
        mask: (B, T) validity mask.
        num_conflict: (B,) n_i (:func:`gtpo_num_conflict_tokens`).
        normalizer: Z > 0 (Python number or one-element tensor).
    """
    if not isinstance(loss, Tensor) or loss.dim() != 2:
        raise ValueError(f"loss must be a (B, T) tensor, got {tuple(getattr(loss, 'shape', ()))}")
    for name, x in (("token_weights", token_weights), ("mask", mask)):
        if not isinstance(x, Tensor) or x.shape != loss.shape:
            raise ValueError(f"{name} must be {tuple(loss.shape)}, got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(num_conflict, Tensor) or num_conflict.shape != (loss.shape[0],):
        raise ValueError(f"num_conflict must be ({loss.shape[0]},), got {tuple(getattr(num_conflict, 'shape', ()))}")
    if isinstance(normalizer, Tensor):
        if normalizer.numel() != 1 or not bool(normalizer > 0):
            raise ValueError(f"normalizer must be one element > 0, got {normalizer}")
    elif isinstance(normalizer, bool) or not isinstance(normalizer, (int, float)) \
            or not math.isfinite(normalizer) or normalizer <= 0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer!r}")
    m = mask.to(loss.dtype)
    per_seq = (loss * token_weights.to(loss.dtype) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    return (per_seq / num_conflict.to(loss.dtype).clamp(min=1.0)).sum() / normalizer
