"""COPO — Consistency-aware policy optimisation (Han et al. 2025, arXiv 2508.04138) — **reconstructed**.

Card ``rl_objectives.md`` §3 COPO is tagged **unverified — check the paper**; the paper's method section and
the author repo (hijih/copo-code) were not available here.  What the sources read confirm (abstract; an
ICLR 2026 review excerpt): a *global* prompt-level signal that does not vanish when a group's outcomes are
all equal ("compute prompt returns, standardize across the mini-batch"), blended with the local GRPO loss
by an *entropy-based soft gate* ("mix with a simple entropy gate"):

    L = Σ_q [ w_q · L_local(q) + (1 − w_q) · L_global(q) ]

Reconstruction (every item below is a choice made here, **unverified**):

* prompt return R_q = group mean reward p̂_q (the paper's "structured global reward based on outcome
  consistency" may be defined differently);
* global advantage A^glob_i = (R_q − mean_q R) / (std_q R + ε) over the distinct prompts of the batch,
  population std, ε = 1e-6, shared by every completion of q;
* gate w_q = H_b(p̂_q) / ln 2, the binary entropy of the group's success rate (rewards mapped to [0, 1]),
  so w_q = 0 for all-correct / all-wrong groups (pure global loss) and 1 at p̂ = ½;
* L_local and L_global are the same token-level clipped surrogate (ε = 0.2) with A^local (GRPO) and
  A^glob, blended per token, then one aggregation (``seq-mean-token-mean``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from .advantages import _check_inputs, _group_stats
from .surrogates import SurrogateOutput, k3_kl, ppo_clip_loss

__all__ = ["copo_global_advantages", "copo_entropy_gate", "copo_loss"]


def _group_rate(rewards: Tensor, group_ids: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    rewards, gid, G = _check_inputs(rewards, group_ids, None, True, allow_nan=False)
    valid = torch.ones_like(rewards, dtype=torch.bool)
    mean_g, _, cnt, _ = _group_stats(rewards, gid, G, valid)
    return mean_g, cnt, gid


def copo_global_advantages(rewards: Tensor, group_ids: Tensor, *, std_eps: float = 1e-6) -> Tensor:
    """COPO global advantage (arXiv 2508.04138) — **reconstructed, unverified**.

    A^glob_i = (R_q − mean_q R) / (std_q R + ε),  R_q = mean reward of i's group q; mean and population std
    over the distinct groups present in the batch (a batch statistic: compute on the full batch).
    If std + ε == 0 the advantage is 0.

    Args: ``rewards`` (B,) float (NaN raises), ``group_ids`` (B,) integer, ``std_eps`` ε ≥ 0 (1e-6).
    """
    if isinstance(std_eps, bool) or not isinstance(std_eps, (int, float)) or not math.isfinite(std_eps) \
            or std_eps < 0:
        raise ValueError(f"std_eps must be a finite number >= 0, got {std_eps!r}")
    mean_g, cnt, gid = _group_rate(rewards, group_ids)
    present = cnt > 0
    R = mean_g[present]
    mu = R.mean()
    sd = R.std(unbiased=False) if R.numel() > 1 else torch.zeros((), dtype=R.dtype, device=R.device)
    den = sd + std_eps
    A_q = torch.where(den > 0, (mean_g - mu) / torch.where(den > 0, den, torch.ones_like(den)),
                      torch.zeros_like(mean_g))
    return A_q[gid]


def copo_entropy_gate(rewards: Tensor, group_ids: Tensor, *,
                      reward_range: Tuple[float, float] = (0.0, 1.0)) -> Tensor:
    """COPO entropy gate w_q = H_b(p̂_q)/ln 2 per completion (arXiv 2508.04138) — **reconstructed, unverified**.

    p̂_q = group mean of the rewards mapped affinely from ``reward_range`` to [0, 1];
    H_b(p) = −p ln p − (1 − p) ln(1 − p) (H_b(0) = H_b(1) = 0).  Returns (B,) in [0, 1]: 0 for groups with
    identical outcomes, 1 at p̂ = ½.  Rewards outside ``reward_range`` raise ValueError.
    """
    lo, hi = reward_range
    if not hi > lo:
        raise ValueError(f"reward_range must be (lo, hi) with hi > lo, got {reward_range!r}")
    if not isinstance(rewards, Tensor):
        raise ValueError("rewards must be a tensor")
    r = (rewards.to(torch.get_default_dtype()) if not rewards.dtype.is_floating_point else rewards)
    r = (r - lo) / (hi - lo)
    if bool(((r < 0) | (r > 1)).any()):
        raise ValueError(f"rewards must lie in reward_range {reward_range}")
    p, _, gid = _group_rate(r, group_ids)
    p = p[gid]
    zero = torch.zeros_like(p)
    h = -(torch.where(p > 0, p * torch.log(p.clamp(min=1e-300)), zero)
          + torch.where(p < 1, (1 - p) * torch.log1p(-p.clamp(max=1 - 1e-16)), zero))
    return (h / math.log(2.0)).clamp(0.0, 1.0)


def copo_loss(logp: Tensor, old_logp: Tensor, local_advantages: Tensor, global_advantages: Tensor,
              gate: Tensor, eps_low: float = 0.2, eps_high: Optional[float] = None, *,
              ref_logp: Optional[Tensor] = None, beta: float = 0.0) -> SurrogateOutput:
    """COPO per-token blended surrogate (arXiv 2508.04138) — **reconstructed, unverified**.

    ℓ_{i,t} = w_i·ℓ^clip_{i,t}(A^local_i) + (1 − w_i)·ℓ^clip_{i,t}(A^glob_i) (+ β·k3),
    ℓ^clip = :func:`~torchstep.objectives.surrogates.ppo_clip_loss` (ε_low, ε_high).  Aggregate with
    :func:`~torchstep.objectives.aggregate.aggregate`.  The clip indicators mark where a clip binds in a
    term of non-zero weight.

    Args: ``logp``/``old_logp`` (B, T); ``local_advantages``, ``global_advantages``, ``gate`` (B,), gate in
    [0, 1]; clip widths as in ``ppo_clip_loss``; optional k3 KL.
    """
    B = logp.shape[0] if isinstance(logp, Tensor) and logp.dim() == 2 else None
    if B is None:
        raise ValueError(f"logp must be a (B, T) tensor, got {tuple(getattr(logp, 'shape', ()))}")
    for name, x in (("local_advantages", local_advantages), ("global_advantages", global_advantages),
                    ("gate", gate)):
        if not isinstance(x, Tensor) or x.shape != (B,):
            raise ValueError(f"{name} must be ({B},), got {tuple(getattr(x, 'shape', ()))}")
    if bool(((gate < 0) | (gate > 1)).any()):
        raise ValueError("gate must lie in [0, 1]")
    loc = ppo_clip_loss(logp, old_logp, local_advantages, eps_low, eps_high)
    glo = ppo_clip_loss(logp, old_logp, global_advantages, eps_low, eps_high)
    w = gate.detach().to(logp.dtype).unsqueeze(-1)
    loss = w * loc.loss + (1 - w) * glo.loss
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if beta != 0:
        if ref_logp is None:
            raise ValueError("beta != 0 needs ref_logp")
        loss = loss + beta * k3_kl(logp, ref_logp)
    on_l, on_g = w > 0, w < 1
    return SurrogateOutput(loss, loc.ratio, (loc.clipped_low & on_l) | (glo.clipped_low & on_g),
                           (loc.clipped_high & on_l) | (glo.clipped_high & on_g))
