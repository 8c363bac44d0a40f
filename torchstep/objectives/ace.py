"""ACE — Asymmetric Confidence-aware Error penalty (Xu et al. 2026, arXiv 2602.21420), stage-1 modifier.

Card ``rl_objectives.md`` §3 ACE is tagged **unverified — check the paper**.  What the sources read here
confirm (paper abstract; third-party summaries):

* the per-rollout confidence shift c_i = log(π_θ(y_i|x) / π_ref(y_i|x)) = Σ_t (logp_θ − logp_ref) over the
  rollout's valid tokens (abstract);
* it modulates the **negative** advantages of **incorrect** rollouts, scaling them by a softplus of c_i
  (summaries: "scales negative advantages by a softplus of the log-policy difference"; softplus better than
  ReLU); correct rollouts are untouched; binary rewards assumed; plugs into GRPO and DAPO (verl).

Not confirmed (reconstruction choices, marked in the code):

* the exact form A_i ← A_i·(1 + α·softplus(c_i)) — where α sits and whether a "1 +" is present is the
  card's reading, not read in the paper;
* the default α (1.0 here is the card's toy-run value, §5; the paper's value is not recovered);
* c_i is **detached** (a per-rollout constant, computed once before the update).  The paper's Theorem 1
  (gradient = selective-regulariser gradient + residual) is consistent with a constant weight, but the
  detaching is not confirmed;
* which π_θ enters c_i: the :func:`~torchstep.objectives.presets.preset` ``"ace"`` passes the behaviour
  policy's ``old_logp`` (available at advantage time, like verl's ``old_log_prob``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ace_confidence_shift", "ace_advantages"]


def ace_confidence_shift(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """ACE confidence shift c_i = Σ_t m_{i,t}·(logp_{i,t} − ref_logp_{i,t}), detached (arXiv 2602.21420).

    The sequence log-ratio log π_θ(y_i|x) − log π_ref(y_i|x) of the abstract, summed (not averaged) over valid
    tokens.  Detaching is a reconstruction choice (see module docstring).

    Args:
        logp: (B, T) log-probs of the sampled tokens under π_θ.
        ref_logp: (B, T) log-probs under the reference policy.
        mask: (B, T) validity mask.
    Returns: (B,) tensor in ``logp``'s dtype.
    """
    if not isinstance(logp, Tensor) or logp.dim() != 2:
        raise ValueError(f"logp must be a (B, T) tensor, got {tuple(getattr(logp, 'shape', ()))}")
    for name, x in (("ref_logp", ref_logp), ("mask", mask)):
        if not isinstance(x, Tensor) or x.shape != logp.shape:
            raise ValueError(f"{name} must be {tuple(logp.shape)}, got {tuple(getattr(x, 'shape', ()))}")
    m = mask.to(logp.dtype)
    return ((logp.detach() - ref_logp.detach().to(logp.dtype)) * m).sum(-1)


def ace_advantages(advantages: Tensor, correct: Tensor, logp: Tensor, ref_logp: Tensor, mask: Tensor, *,
                   alpha: float = 1.0, confidence: Optional[Tensor] = None) -> Tensor:
    """ACE advantages (Xu et al. 2026, arXiv 2602.21420) — **unverified — check the paper**.

    Formula (card reading)::

        c_i = Σ_t m_{i,t} (logp_{i,t} − ref_logp_{i,t})             # detached
        A'_i = A_i · (1 + α · softplus(c_i))   if not correct_i and A_i < 0
        A'_i = A_i                              otherwise

    Since softplus > 0 and α ≥ 0, |A'_i| ≥ |A_i| and the sign never changes; only incorrect rollouts with
    A_i < 0 change (exactly, for α > 0) — §6 #11.

    Args:
        advantages: (B,) stage-1 advantages (e.g. GRPO's).
        correct: (B,) bool (or 0/1) — which rollouts are correct (binary reward).
        logp, ref_logp, mask: (B, T) as in :func:`ace_confidence_shift` (ignored when ``confidence`` given).
        alpha: α ≥ 0, default 1.0 (card §5 toy value; the paper's default is not recovered).
        confidence: optional precomputed (B,) c_i.
    Deviations / unverified: α placement, the "1 +", α's default and the detaching of c_i (module docstring).
    Raises: ValueError on shape mismatch or a negative / non-finite ``alpha``.
    """
    if not isinstance(advantages, Tensor) or advantages.dim() != 1:
        raise ValueError(f"advantages must be (B,), got {tuple(getattr(advantages, 'shape', ()))}")
    B = advantages.shape[0]
    if not isinstance(correct, Tensor) or correct.shape != (B,):
        raise ValueError(f"correct must be ({B},), got {tuple(getattr(correct, 'shape', ()))}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if confidence is None:
        if not isinstance(logp, Tensor) or logp.dim() != 2 or logp.shape[0] != B:
            raise ValueError(f"logp must be ({B}, T), got {tuple(getattr(logp, 'shape', ()))}")
        c = ace_confidence_shift(logp, ref_logp, mask)
    else:
        if not isinstance(confidence, Tensor) or confidence.shape != (B,):
            raise ValueError(f"confidence must be ({B},), got {tuple(getattr(confidence, 'shape', ()))}")
        c = confidence.detach()
    scale = 1.0 + alpha * F.softplus(c.to(advantages.dtype))
    hit = (~correct.bool()) & (advantages < 0)
    return torch.where(hit, advantages * scale, advantages)
