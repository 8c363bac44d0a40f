"""Stage 0 of the objective decomposition: reward transforms over flat tensors.

* DAPO soft overlong punishment (length shaping added to the reward),
* DLER truncation penalty (reward 0 beyond the target length),
* reward-model ensembles: mean, WCO (worst-case), UWO (uncertainty-weighted).

All functions are pure torch, device-agnostic, and do not reshape by group. Reference card:
``rl_objectives.md`` §3 (DAPO, DLER, WCO/UWO).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "overlong_penalty",
    "truncation_penalty",
    "ensemble_mean",
    "ensemble_wco",
    "ensemble_uwo",
    "ensemble_rewards",
]


def _check_lengths(lengths: torch.Tensor, check: bool) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        raise ValueError("lengths must be a torch tensor")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be flat (B,), got shape {tuple(lengths.shape)}")
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise ValueError("lengths must be integer or float")
    if check and bool((lengths < 0).any()):
        raise ValueError("lengths must be non-negative")
    return lengths


def _check_rewards_like(rewards: Optional[torch.Tensor], lengths: torch.Tensor, check: bool):
    if rewards is None:
        return None
    if not isinstance(rewards, torch.Tensor):
        raise ValueError("rewards must be a torch tensor")
    if rewards.shape != lengths.shape:
        raise ValueError(f"rewards shape {tuple(rewards.shape)} does not match lengths {tuple(lengths.shape)}")
    if check and rewards.dtype.is_floating_point and bool(torch.isnan(rewards).any()):
        raise ValueError("rewards contain NaN")
    return rewards


def overlong_penalty(
    lengths: torch.Tensor,
    max_length: int,
    cache_length: int,
    rewards: Optional[torch.Tensor] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    check: bool = True,
) -> torch.Tensor:
    """DAPO soft overlong punishment (Yu et al. 2025, arXiv 2503.14476). **[code]**

    Formula (card §3 DAPO), ``L_max = max_length``, ``L_c = cache_length``::

        R_len(y) = 0                              if |y| <= L_max - L_c
                 = ((L_max - L_c) - |y|) / L_c    if L_max - L_c < |y| <= L_max
                 = -1                             if |y| > L_max

    Args:
        lengths: ``(B,)`` completion lengths |y| (tokens), >= 0.
        max_length: L_max > 0.
        cache_length: L_c with 0 < L_c <= L_max.
        rewards: optional ``(B,)`` rewards; if given, returns ``rewards + R_len`` instead of ``R_len``.
        dtype: float dtype of the result (default: rewards' dtype, else the default dtype).

    Example: L_max = 100, L_c = 20, lengths (90, 50, 120) -> (-0.5, 0, -1).
    Raises ValueError on negative lengths/budgets, L_c > L_max, or shape mismatch.
    """
    if not (isinstance(max_length, (int, float)) and max_length > 0):
        raise ValueError(f"max_length must be > 0, got {max_length}")
    if not (isinstance(cache_length, (int, float)) and 0 < cache_length <= max_length):
        raise ValueError(f"cache_length must satisfy 0 < cache_length <= max_length, got {cache_length}")
    lengths = _check_lengths(lengths, check)
    rewards = _check_rewards_like(rewards, lengths, check)
    if dtype is None:
        dtype = rewards.dtype if (rewards is not None and rewards.dtype.is_floating_point) else torch.get_default_dtype()
    L = lengths.to(dtype)
    start = float(max_length - cache_length)
    ramp = (start - L) / float(cache_length)
    zero = torch.zeros((), dtype=dtype, device=L.device)
    pen = torch.where(L <= start, zero, torch.where(L <= float(max_length), ramp, -torch.ones((), dtype=dtype, device=L.device)))
    return pen if rewards is None else rewards.to(dtype) + pen


def truncation_penalty(
    rewards: torch.Tensor,
    lengths: torch.Tensor,
    max_length: int,
    *,
    truncated: Optional[torch.Tensor] = None,
    check: bool = True,
) -> torch.Tensor:
    """DLER truncation length penalty (Liu et al. 2025, arXiv 2510.15110; NVlabs/DLER). **[code]**

    Formula: ``r'_i = 0 if |y_i| > max_length (or truncated_i) else r_i`` -- a completion that exceeds the
    target length (is truncated) gets reward 0. The released config uses max response length 4000.

    Args:
        rewards: ``(B,)`` rewards.
        lengths: ``(B,)`` completion lengths, >= 0.
        max_length: target length, >= 0 (negative budget raises ValueError).
        truncated: optional ``(B,)`` bool flags (e.g. no EOS); OR-ed with ``lengths > max_length``.

    Difficulty-aware truncation (tighter on easy prompts) is not implemented (not in verl main either).
    """
    if not (isinstance(max_length, (int, float)) and max_length >= 0):
        raise ValueError(f"max_length must be >= 0, got {max_length}")
    lengths = _check_lengths(lengths, check)
    rewards = _check_rewards_like(rewards, lengths, check)
    cut = lengths > max_length
    if truncated is not None:
        if not isinstance(truncated, torch.Tensor) or truncated.shape != lengths.shape:
            raise ValueError("truncated must be a (B,) tensor matching lengths")
        cut = cut | truncated.bool()
    return torch.where(cut, torch.zeros_like(rewards), rewards)


def _check_scores(scores: torch.Tensor, min_k: int, check: bool) -> torch.Tensor:
    if not isinstance(scores, torch.Tensor):
        raise ValueError("scores must be a torch tensor")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (K, B) (models x completions), got {tuple(scores.shape)}")
    if scores.shape[0] < min_k:
        raise ValueError(f"need at least {min_k} reward models, got K={scores.shape[0]}")
    if not scores.dtype.is_floating_point:
        scores = scores.to(torch.get_default_dtype())
    if check and bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN")
    return scores


def ensemble_mean(scores: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Mean ensemble (Coste et al. 2024, arXiv 2310.02743). **[code]** ``R = mean_k R_k``; scores ``(K, B)``."""
    return _check_scores(scores, 1, check).mean(dim=0)


def ensemble_wco(scores: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Worst-case optimisation ensemble (Coste et al. 2024, arXiv 2310.02743). **[code]**

    ``R = min_k R_k`` over K reward models; scores ``(K, B)``.
    """
    return _check_scores(scores, 1, check).min(dim=0).values


def ensemble_uwo(scores: torch.Tensor, lam: float = 1.0, *, check: bool = True) -> torch.Tensor:
    """Uncertainty-weighted optimisation ensemble (Coste et al. 2024, arXiv 2310.02743). **[code]**

    ``R = mean_k R_k - lam * Var_k R_k`` with the **unbiased** (K-1) variance; default ``lam = 1``.
    Needs K >= 2; ``lam`` must be finite and >= 0. scores ``(K, B)``.
    Example: scores [[1, 0], [3, 0]], lam = 0.5 -> [1, 0].
    """
    if not (isinstance(lam, (int, float)) and lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    s = _check_scores(scores, 2, check)
    return s.mean(dim=0) - lam * s.var(dim=0, unbiased=True)


def ensemble_rewards(scores: torch.Tensor, mode: str = "mean", lam: float = 1.0, *, check: bool = True) -> torch.Tensor:
    """Dispatch to :func:`ensemble_mean` / :func:`ensemble_wco` / :func:`ensemble_uwo` by ``mode``."""
    if mode == "mean":
        return ensemble_mean(scores, check=check)
    if mode == "wco":
        return ensemble_wco(scores, check=check)
    if mode == "uwo":
        return ensemble_uwo(scores, lam, check=check)
    raise ValueError(f"mode must be 'mean', 'wco' or 'uwo', got {mode!r}")
