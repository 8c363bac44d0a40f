"""Stage 3 of ``torchstep.objectives``: token-level policy-gradient surrogates.

Reference card: ``rl_objectives.md`` §2 (surrogates) and §3 (GRPO, DAPO).  All functions are pure tensor
functions of ``torch`` only, work on any device and do no host synchronisation.

Layouts
-------
``logp``/``old_logp`` are either padded ``(B, T)`` tensors (rows are sequences, padding handled by the
aggregation weights) or flat token tensors ``(N,)``.  ``advantages`` is either the same shape as ``logp``
(per-token) or ``(B,)`` for a ``(B, T)`` layout (per-sequence, broadcast over tokens); in the flat layout
expand per-sequence advantages yourself (``A[seq_ids]``).

Every surrogate returns a :class:`SurrogateOutput` ``(loss, ratio, clipped_low, clipped_high)`` with the
**per-token** loss (to be reduced by :func:`torchstep.objectives.aggregate.aggregate`) and boolean
indicators of where the clip binds (and therefore, for the PPO family, where the gradient is exactly zero).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._checks import check_token_pair

__all__ = [
    "SurrogateOutput",
    "ppo_clip_loss",
    "two_sided_clip_loss",
    "gspo_loss",
    "gspo_sequence_ratio",
    "cispo_loss",
    "k3_kl",
]


class SurrogateOutput(NamedTuple):
    """Per-token surrogate loss plus clip diagnostics (all shaped like ``logp``).

    loss:          per-token loss ℓ_{i,t} (un-aggregated; includes +β·k3 when requested).
    ratio:         the importance ratio used (token ρ_{i,t}, or the broadcast sequence ratio s_i for GSPO).
    clipped_low:   True where the lower clip binds (ρ < 1 − ε_low and A < 0).
    clipped_high:  True where the upper clip binds (ρ > 1 + ε_high and A > 0; for the δ clip also ρ > δ and
                   A < 0; for CISPO: ρ > ε_max, i.e. the stop-gradient weight is capped).
    """

    loss: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor


def _check_eps(eps_low: float, eps_high: float) -> None:
    for name, v in (("eps_low", eps_low), ("eps_high", eps_high)):
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if eps_low >= 1:
        raise ValueError(f"eps_low must be < 1 (lower bound 1 - eps_low > 0), got {eps_low}")


def _broadcast_adv(advantages: Tensor, logp: Tensor) -> Tensor:
    if advantages.shape == logp.shape:
        return advantages
    if logp.dim() == 2 and advantages.dim() == 1 and advantages.shape[0] == logp.shape[0]:
        return advantages.unsqueeze(-1)
    raise ValueError(
        f"advantages shape {tuple(advantages.shape)} must equal logp shape {tuple(logp.shape)} "
        f"or be (B,) for a (B, T) logp")


def _check_pair(logp: Tensor, old_logp: Tensor, name: str = "old_logp") -> None:
    check_token_pair(logp, old_logp, "logp", name)


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 estimator of KL(π_θ ‖ π_ref) per token (card §2; Schulman's k3, as in TRL/verl) [code].

    D_{i,t} = exp(ref − logp) − (ref − logp) − 1   (≥ 0, = 0 iff ref == logp).

    Args:
        logp: current-policy log-probs of the sampled tokens, (N,) or (B, T).
        ref_logp: reference-policy log-probs, same shape.  Gradients flow to both arguments as given;
            detach ``ref_logp`` yourself if it should be constant.
    Returns: per-token tensor shaped like ``logp``.  Added to a surrogate as +β·D (TRL default β = 0).
    """
    _check_pair(logp, ref_logp, "ref_logp")
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def _add_kl(loss: Tensor, logp: Tensor, ref_logp: Optional[Tensor], beta: float) -> Tensor:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if ref_logp is None:
        if beta != 0:
            raise ValueError("beta != 0 needs ref_logp")
        return loss
    if beta == 0:
        return loss
    return loss + beta * k3_kl(logp, ref_logp)


def _clip_core(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
               delta: Optional[float]) -> SurrogateOutput:
    r1 = ratio if delta is None else torch.clamp(ratio, max=delta)
    clipped = torch.clamp(r1, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.minimum(r1 * adv, clipped * adv)
    low = (ratio < 1.0 - eps_low) & (adv < 0)
    high = (ratio > 1.0 + eps_high) & (adv > 0)
    if delta is not None:
        high = high | ((ratio > delta) & (adv < 0))
    return SurrogateOutput(loss, ratio, low, high)


def ppo_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float = 0.2,
                  eps_high: Optional[float] = None, *, ref_logp: Optional[Tensor] = None,
                  beta: float = 0.0) -> SurrogateOutput:
    """PPO/GRPO clipped surrogate with asymmetric clip ("clip-higher", DAPO) [code].

    ℓ_{i,t} = −min(ρ_{i,t} A, clip(ρ_{i,t}, 1 − ε_low, 1 + ε_high) A) (+ β·k3(logp, ref_logp)),
    ρ_{i,t} = exp(logp − old_logp).

    GRPO (Shao et al. 2024, arXiv 2402.03300): ε_low = ε_high = 0.2.  DAPO (Yu et al. 2025, arXiv
    2503.14476): ε_low = 0.2, ε_high = 0.28, no KL.  Card status: [code] (TRL/verl).

    Args:
        logp: current log-probs (grad flows), (N,) or (B, T).
        old_logp: behaviour-policy log-probs (treated as constant: detached here).
        advantages: per-token (same shape) or per-sequence (B,) for (B, T) inputs; detached here.
        eps_low: lower clip width, default 0.2.
        eps_high: upper clip width, default ``None`` → ``eps_low`` (symmetric PPO clip).
        ref_logp, beta: optional k3 KL penalty +β·D (default β = 0, no reference model).
    Returns: :class:`SurrogateOutput`; the gradient wrt ``logp`` is exactly zero where ``clipped_low`` or
    ``clipped_high`` is True (KL term aside).
    """
    if eps_high is None:
        eps_high = eps_low
    _check_eps(eps_low, eps_high)
    _check_pair(logp, old_logp)
    adv = _broadcast_adv(advantages, logp).detach()
    ratio = torch.exp(logp - old_logp.detach())
    out = _clip_core(ratio, adv, eps_low, eps_high, None)
    return out._replace(loss=_add_kl(out.loss, logp, ref_logp, beta))


def two_sided_clip_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, delta: float,
                        eps_low: float = 0.2, eps_high: Optional[float] = None, *,
                        ref_logp: Optional[Tensor] = None, beta: float = 0.0) -> SurrogateOutput:
    """Two-sided δ clip (INTELLECT-2, arXiv 2505.07291; TRL ``delta``) [code per card].

    ρ ← min(ρ, δ) before the clipped surrogate: ℓ = −min(ρ' A, clip(ρ', 1 − ε_low, 1 + ε_high) A),
    ρ' = min(ρ, δ).  This bounds the loss of negative-advantage tokens with a huge ratio (for A < 0 the
    plain PPO clip never binds from above).  For δ ≥ 1 + ε_high clamping ρ in both terms equals clamping
    only the unclipped term (TRL's form).

    Args: as :func:`ppo_clip_loss`, plus ``delta`` (> 1 + ε_high expected; must be > 1 − ε_low).
    Returns: :class:`SurrogateOutput`; ``clipped_high`` also marks ρ > δ with A < 0 (zero gradient).
    """
    if eps_high is None:
        eps_high = eps_low
    _check_eps(eps_low, eps_high)
    if not isinstance(delta, (int, float)) or not math.isfinite(delta) or delta <= 1.0 - eps_low:
        raise ValueError(f"delta must be a finite number > 1 - eps_low, got {delta!r}")
    _check_pair(logp, old_logp)
    adv = _broadcast_adv(advantages, logp).detach()
    ratio = torch.exp(logp - old_logp.detach())
    out = _clip_core(ratio, adv, eps_low, eps_high, float(delta))
    return out._replace(loss=_add_kl(out.loss, logp, ref_logp, beta))


def gspo_sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor, *, seq_ids: Optional[Tensor] = None,
                        num_seqs: Optional[int] = None) -> Tensor:
    """GSPO sequence ratio s_i = exp(mean_t (logp − old_logp)) over valid tokens, broadcast to tokens.

    (B, T) layout: rows are sequences, ``mask`` (B, T).  Flat layout: ``mask`` (N,) and ``seq_ids`` (N,)
    with ids in [0, num_seqs); ``num_seqs=None`` reads ``seq_ids.max()+1`` (one host sync).  A sequence
    with no valid token gets s_i = 1 (its tokens carry zero weight in aggregation anyway).
    Returns a tensor shaped like ``logp`` (grad flows through ``logp``; ``old_logp`` is detached).
    """
    _check_pair(logp, old_logp)
    if mask.shape != logp.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != logp shape {tuple(logp.shape)}")
    m = mask.to(logp.dtype)
    d = (logp - old_logp.detach()) * m
    if logp.dim() == 2:
        if seq_ids is not None:
            raise ValueError("seq_ids is only for the flat (N,) layout; rows are sequences in (B, T)")
        mean = d.sum(-1) / m.sum(-1).clamp(min=1.0)
        return torch.exp(mean).unsqueeze(-1).expand_as(logp)
    if seq_ids is None:
        raise ValueError("flat (N,) GSPO needs seq_ids")
    if seq_ids.shape != logp.shape:
        raise ValueError(f"seq_ids shape {tuple(seq_ids.shape)} != logp shape {tuple(logp.shape)}")
    seq_ids = seq_ids.long()
    S = int(seq_ids.max()) + 1 if num_seqs is None else int(num_seqs)
    num = torch.zeros(S, dtype=logp.dtype, device=logp.device).index_add(0, seq_ids, d)
    den = torch.zeros(S, dtype=logp.dtype, device=logp.device).index_add(0, seq_ids, m)
    return torch.exp(num / den.clamp(min=1.0))[seq_ids]


def gspo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, eps_low: float = 3e-4,
              eps_high: float = 4e-4, *, seq_ids: Optional[Tensor] = None, num_seqs: Optional[int] = None,
              ref_logp: Optional[Tensor] = None, beta: float = 0.0) -> SurrogateOutput:
    """GSPO: clipped surrogate with the sequence-level ratio (Zheng et al. 2025, arXiv 2507.18071).

    ℓ_{i,t} = −min(s_i A_i, clip(s_i, 1 − ε_low, 1 + ε_high) A_i),  s_i = exp((1/|o_i|) Σ_t m (logp − old)).
    Card §2 gives the ratio replacement only ([code] per card); the defaults ε_low = 3e-4, ε_high = 4e-4 are
    the paper's (not in the card; confirmed only through a secondary source quoting the paper's Eq. 5 setting).  Aggregate with ``seq-mean-token-mean`` for
    the paper's sequence objective.  The clip indicators are per sequence (constant along a row).

    Args: as :func:`ppo_clip_loss`, plus ``mask`` and (flat layout) ``seq_ids``/``num_seqs``; advantages
    should be per sequence (constant within a sequence).
    """
    _check_eps(eps_low, eps_high)
    s = gspo_sequence_ratio(logp, old_logp, mask, seq_ids=seq_ids, num_seqs=num_seqs)
    adv = _broadcast_adv(advantages, logp).detach()
    out = _clip_core(s, adv, eps_low, eps_high, None)
    return out._replace(loss=_add_kl(out.loss, logp, ref_logp, beta))


def cispo_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_max: float, *,
               ref_logp: Optional[Tensor] = None, beta: float = 0.0) -> SurrogateOutput:
    """CISPO (MiniMax-M1, arXiv 2506.13585): clipped importance-sampling weight, REINFORCE-style.

    ℓ_{i,t} = −sg(min(ρ_{i,t}, ε_max))·A·logp_{i,t}   (card §2: TRL's ``epsilon_high`` plays ε_max) [code].
    The gradient never vanishes (the weight is capped, not the token dropped).  ``eps_max`` is an absolute
    cap on ρ (not a width); no default because the card gives none.

    Returns: :class:`SurrogateOutput`; ``clipped_high`` marks ρ > ε_max (weight capped), ``clipped_low`` is
    all False.
    """
    if not isinstance(eps_max, (int, float)) or not math.isfinite(eps_max) or eps_max <= 0:
        raise ValueError(f"eps_max must be a finite number > 0, got {eps_max!r}")
    _check_pair(logp, old_logp)
    adv = _broadcast_adv(advantages, logp).detach()
    ratio = torch.exp(logp.detach() - old_logp.detach())
    w = torch.clamp(ratio, max=float(eps_max))
    loss = -w * adv * logp
    high = ratio > eps_max
    out = SurrogateOutput(loss, ratio, torch.zeros_like(high), high)
    return out._replace(loss=_add_kl(out.loss, logp, ref_logp, beta))
