"""Stage 1 of the objective decomposition: advantage estimators over flat tensors.

Every estimator takes ``rewards`` of shape ``(B,)`` and ``group_ids`` of shape ``(B,)`` (non-negative
integer labels; one label per prompt; groups may have unequal sizes and need not be contiguous) and
returns advantages of shape ``(B,)``. Nothing is ever reshaped to ``(n, G)``: group statistics are
computed with ``index_add_`` segment sums, so the code is device-agnostic.

Host syncs: the main path has none when ``num_groups`` is passed and ``check=False``. With the defaults
(``num_groups=None``, ``check=True``) there are a few (``group_ids.max()`` and the input checks, which
read a scalar back to raise ``ValueError``).

Reference: ``docs``-side card ``rl_objectives.md`` §3 (GRPO, Dr.GRPO, DAPO dynamic sampling, RLOO,
REINFORCE++-baseline, BNPO). Status tags follow the card: **[code]** = read in official/author code.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = [
    "grpo_advantages",
    "drgrpo_advantages",
    "rloo_advantages",
    "reinforce_pp_baseline_advantages",
    "bnpo_advantages",
    "bnpo_beta_params",
    "dynamic_sampling_keep",
    "group_mean",
]


# ----------------------------------------------------------------------------------------------------
# segment helpers
# ----------------------------------------------------------------------------------------------------


def _check_inputs(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: Optional[int],
    check: bool,
    allow_nan: bool,
) -> Tuple[torch.Tensor, torch.Tensor, int]:
    if not isinstance(rewards, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
        raise ValueError("rewards and group_ids must be torch tensors")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be flat (B,), got shape {tuple(rewards.shape)}")
    if group_ids.shape != rewards.shape:
        raise ValueError(
            f"group_ids shape {tuple(group_ids.shape)} does not match rewards shape {tuple(rewards.shape)}"
        )
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool or group_ids.is_complex():
        raise ValueError("group_ids must be an integer tensor")
    if group_ids.device != rewards.device:
        raise ValueError("rewards and group_ids must be on the same device")
    if rewards.numel() == 0:
        raise ValueError("rewards is empty")
    if not rewards.dtype.is_floating_point:
        rewards = rewards.to(torch.get_default_dtype())
    gid = group_ids.long()
    if check:
        if bool((gid < 0).any()):
            raise ValueError("group_ids must be non-negative")
        if not allow_nan and bool(torch.isnan(rewards).any()):
            raise ValueError("rewards contain NaN")
    if num_groups is None:
        num_groups = int(gid.max().item()) + 1
    elif check and bool((gid >= num_groups).any()):
        raise ValueError(f"group_ids must be < num_groups={num_groups}")
    return rewards, gid, int(num_groups)


def _seg_sum(values: torch.Tensor, gid: torch.Tensor, num_groups: int) -> torch.Tensor:
    out = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    return out.index_add_(0, gid, values)


def _seg_count(gid: torch.Tensor, num_groups: int, dtype: torch.dtype, valid=None) -> torch.Tensor:
    ones = torch.ones(gid.shape, dtype=dtype, device=gid.device) if valid is None else valid.to(dtype)
    return _seg_sum(ones, gid, num_groups)


def _group_stats(rewards, gid, num_groups, valid):
    """Per-sample group mean, sum of squared deviations and count over ``valid`` members."""
    dtype = rewards.dtype
    r0 = torch.where(valid, rewards, torch.zeros((), dtype=dtype, device=rewards.device))
    cnt = _seg_count(gid, num_groups, dtype, valid)
    s = _seg_sum(r0, gid, num_groups)
    mean_g = s / cnt.clamp_min(1)
    dev = torch.where(valid, rewards - mean_g[gid], torch.zeros((), dtype=dtype, device=rewards.device))
    ss_g = _seg_sum(dev * dev, gid, num_groups)
    return mean_g, ss_g, cnt, dev


def _check_min_group_size(gid, num_groups, min_size, name, check):
    if not check:
        return
    cnt = torch.bincount(gid, minlength=num_groups)
    bad = (cnt > 0) & (cnt < min_size)
    if bool(bad.any()):
        g = int(torch.nonzero(bad)[0].item())
        raise ValueError(f"{name} needs groups of size >= {min_size}; group {g} has size {int(cnt[g].item())}")


def group_mean(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """Per-sample group mean ``mean_g r`` broadcast back to ``(B,)`` (no NaN allowed)."""
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=False)
    valid = torch.ones_like(rewards, dtype=torch.bool)
    mean_g, _, _, _ = _group_stats(rewards, gid, G, valid)
    return mean_g[gid]


def _safe_div(num, den):
    zero = torch.zeros((), dtype=num.dtype, device=num.device)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), zero)


# ----------------------------------------------------------------------------------------------------
# GRPO / Dr.GRPO
# ----------------------------------------------------------------------------------------------------


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    scale: str = "group",
    std_eps: float = 1e-4,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """GRPO group-relative advantages (Shao et al. 2024, DeepSeekMath, arXiv 2402.03300). **[code]**

    Formula (card §3 GRPO, TRL convention)::

        A_i = (r_i - mean_g r) / (std r + std_eps)

    where ``mean_g`` is the mean over ``i``'s group and ``std`` is the **Bessel-corrected** (n-1) standard
    deviation taken over

    * ``scale="group"`` (default, TRL ``scale_rewards="group"``): ``i``'s group;
    * ``scale="batch"`` (TRL ``"batch"``; Lite-PPO / DLER): the whole batch (the mean is still per group);
    * ``scale="none"`` (TRL ``"none"`` = Dr.GRPO): no division, ``A_i = r_i - mean_g r``.

    Args:
        rewards: ``(B,)`` float rewards. NaN marks an unscorable completion: following TRL it is excluded
            from every mean/std and its advantage is **0** (it does not raise).
        group_ids: ``(B,)`` non-negative integer prompt labels; unequal group sizes allowed.
        scale: ``"group" | "batch" | "none"``.
        std_eps: added to the std. Default ``1e-4`` (TRL); verl uses ``1e-6``. Must be >= 0.
        num_groups: number of group labels (``max(group_ids)+1`` if None, which costs a host sync).
        check: run the input checks (each reads a scalar back to the host).

    Edge cases: a group with fewer than two scorable members has std 0 (Bessel std undefined) and its
    deviations are 0, so its advantages are 0. When ``std + std_eps == 0`` (``std_eps=0`` on a constant
    group) the advantage is defined as 0 instead of 0/0.
    """
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if not (std_eps >= 0) or math.isinf(std_eps):
        raise ValueError(f"std_eps must be a finite number >= 0, got {std_eps}")
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=True)
    valid = ~torch.isnan(rewards)
    mean_g, ss_g, cnt, dev = _group_stats(rewards, gid, G, valid)
    if scale == "none":
        return dev
    if scale == "group":
        std_g = torch.sqrt(_safe_div(ss_g, cnt - 1))
        den = std_g[gid] + std_eps
    else:
        n = valid.sum().to(rewards.dtype)
        r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
        bmean = r0.sum() / n.clamp_min(1)
        bdev = torch.where(valid, rewards - bmean, torch.zeros_like(rewards))
        bstd = torch.sqrt(_safe_div((bdev * bdev).sum(), n - 1))
        den = (bstd + std_eps).expand_as(rewards)
    return _safe_div(dev, den)


def drgrpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """Dr.GRPO advantages (Liu et al. 2025, "Understanding R1-Zero-Like Training", arXiv 2503.20783). **[code]**

    Formula: ``A_i = r_i - mean_g r`` (mean-centring only, no std division). Identical to
    ``grpo_advantages(..., scale="none")`` including the NaN convention (NaN reward -> advantage 0,
    excluded from the mean). Pair with aggregation ``seq-mean-token-sum-norm`` (stage 4).
    """
    return grpo_advantages(rewards, group_ids, scale="none", num_groups=num_groups, check=check)


# ----------------------------------------------------------------------------------------------------
# RLOO / REINFORCE++-baseline
# ----------------------------------------------------------------------------------------------------


def rloo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """RLOO leave-one-out advantages (Kool et al. 2019; Ahmadian et al. 2024, arXiv 2402.14740). **[code]**

    Formula::

        A_i = r_i - (1/(G-1)) * sum_{j != i, j in g} r_j  =  G/(G-1) * (r_i - mean_g r)

    with ``G`` the size of ``i``'s group (may differ per group).

    Raises ValueError for a group of size 1 (no leave-one-out baseline), NaN rewards, or shape mismatch.
    With ``check=False`` a size-1 group yields advantage 0.
    """
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=False)
    _check_min_group_size(gid, G, 2, "RLOO", check)
    dtype = rewards.dtype
    cnt = _seg_count(gid, G, dtype)
    s = _seg_sum(rewards, gid, G)
    n_i = cnt[gid]
    loo = _safe_div(s[gid] - rewards, n_i - 1)
    return torch.where(n_i > 1, rewards - loo, torch.zeros_like(rewards))


def reinforce_pp_baseline_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    lengths: Optional[torch.Tensor] = None,
    eps: float = 1e-8,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """REINFORCE++-baseline (Hu 2025, arXiv 2501.03262; verl ``reinforce_plus_plus_baseline``). **[code]**

    Formula (card §3)::

        s_i = r_i - mean_g r                                  # group-mean baseline
        A_i = (s_i - mean_batch s) / sqrt(var_batch s + eps)  # whitened across the whole batch

    ``var_batch`` is unbiased (n-1), ``eps`` inside the square root, as in verl's ``masked_whiten``.
    Whitening in verl runs over *tokens* (each sequence's score broadcast over its response mask); pass
    ``lengths`` (``(B,)`` valid-token counts) to reproduce that token-weighted whitening exactly; with
    ``lengths=None`` every sequence has weight 1. (The card only says "whitened across the whole batch";
    the token weighting, unbiased var and eps=1e-8 are from verl's ``core_algos``, not re-checked here.)

    Raises ValueError on NaN rewards, shape mismatch, negative lengths, or fewer than 2 weighted items.
    """
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=False)
    valid = torch.ones_like(rewards, dtype=torch.bool)
    _, _, _, s = _group_stats(rewards, gid, G, valid)
    if lengths is None:
        w = torch.ones_like(s)
    else:
        if lengths.shape != rewards.shape:
            raise ValueError(f"lengths shape {tuple(lengths.shape)} does not match rewards {tuple(rewards.shape)}")
        w = lengths.to(s.dtype)
        if check and bool((w < 0).any()):
            raise ValueError("lengths must be non-negative")
    n = w.sum()
    if check and bool(n <= 1):
        raise ValueError("REINFORCE++-baseline whitening needs more than one (weighted) item")
    m = (w * s).sum() / n
    var = (w * (s - m) ** 2).sum() / n * (n / (n - 1))
    return (s - m) * torch.rsqrt(var + eps)


# ----------------------------------------------------------------------------------------------------
# BNPO
# ----------------------------------------------------------------------------------------------------


def _beta_log_pdf(p, a, b):
    return (
        (a - 1) * torch.log(p)
        + (b - 1) * torch.log1p(-p)
        - (torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b))
    )


def bnpo_beta_params(
    p_hat: torch.Tensor, *, var_eps: float = 1e-12
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BNPO's Beta parameters from the per-prompt success rates ``p_hat`` (one value per prompt).

    ``mu, sigma2`` = mean and **population** variance of ``p_hat`` over prompts;
    ``k = mu(1-mu)/sigma2 - 1``; ``a = k mu``, ``b = k (1-mu)``; ``alpha = max(1, 1 + a/3)``,
    ``beta = max(1, 1 + b/3)``. ``sigma2`` is clamped to ``var_eps`` (all prompts equal -> very peaked Beta).
    The card does not say whether sigma2 is population or sample variance: population is a
    reconstruction choice.
    """
    mu = p_hat.mean()
    var = p_hat.var(unbiased=False).clamp_min(var_eps)
    k = mu * (1 - mu) / var - 1
    a = k * mu
    b = k * (1 - mu)
    one = torch.ones((), dtype=p_hat.dtype, device=p_hat.device)
    return torch.maximum(one, 1 + a / 3), torch.maximum(one, 1 + b / 3)


def bnpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    reward_range: Tuple[float, float] = (0.0, 1.0),
    alpha: Optional[float] = None,
    beta: Optional[float] = None,
    p_clamp: float = 1e-6,
    inv_pdf_max: float = 1e6,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """BNPO, Beta-normalised policy optimisation (Xiao et al. 2025, arXiv 2506.02864, id checked; author repo
    changyi7231/BNPO). **[code]** per the card.

    Formula (card §3 BNPO)::

        r~_i  = (r_i - lo) / (hi - lo)                   # affine map to [0,1], reward_range=(lo, hi)
        p^_g  = mean_g r~                                # per-prompt success rate
        alpha, beta = bnpo_beta_params(p^ over prompts)  # unless given explicitly
        A_i   = (r~_i - p^_g) * clamp(1 / Beta_pdf(clamp(p^_g, p_clamp, 1-p_clamp); alpha, beta), 0, inv_pdf_max)

    Special cases: ``alpha = beta = 1`` gives ``r~ - p^`` (REINFORCE with group-mean baseline);
    ``alpha = beta = 3/2`` gives ``(pi/8) (r~ - p^) / sqrt(p^(1-p^))``, i.e. (pi/8)·GRPO with population std
    for binary rewards, since the Beta(1.5, 1.5) density is (8/pi)·sqrt(p(1-p)).

    Args:
        rewards, group_ids: as in :func:`grpo_advantages` (NaN raises ValueError).
        reward_range: ``(lo, hi)`` with ``hi > lo``; rewards outside it raise ValueError when ``check``.
        alpha, beta: override the data-derived Beta parameters (both or neither).
        p_clamp: clamp of p^ before the log-pdf (1e-6).
        inv_pdf_max: upper clamp of 1/pdf (1e6).

    The batch statistics (mu, sigma2) are taken over the prompts present in the batch (empty group labels
    are ignored); sigma2 is the population variance (see :func:`bnpo_beta_params`). The multi-component
    reward decomposition of the paper is not implemented.
    """
    lo, hi = float(reward_range[0]), float(reward_range[1])
    if not hi > lo:
        raise ValueError(f"reward_range must satisfy hi > lo, got {reward_range}")
    if (alpha is None) != (beta is None):
        raise ValueError("give both alpha and beta, or neither")
    if alpha is not None and (alpha <= 0 or beta <= 0):
        raise ValueError("alpha and beta must be > 0")
    if not (0 < p_clamp < 0.5):
        raise ValueError("p_clamp must be in (0, 0.5)")
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=False)
    if check and bool(((rewards < lo) | (rewards > hi)).any()):
        raise ValueError(f"rewards outside reward_range {reward_range}")
    rt = (rewards - lo) / (hi - lo)
    valid = torch.ones_like(rt, dtype=torch.bool)
    mean_g, _, cnt, dev = _group_stats(rt, gid, G, valid)
    if alpha is None:
        present = cnt > 0
        # masked mean/var over present prompts without boolean indexing (no host sync)
        w = present.to(rt.dtype)
        n = w.sum()
        mu = (w * mean_g).sum() / n
        var = (w * (mean_g - mu) ** 2).sum() / n
        var = var.clamp_min(1e-12)
        k = mu * (1 - mu) / var - 1
        one = torch.ones((), dtype=rt.dtype, device=rt.device)
        a_t = torch.maximum(one, 1 + k * mu / 3)
        b_t = torch.maximum(one, 1 + k * (1 - mu) / 3)
    else:
        a_t = torch.tensor(float(alpha), dtype=rt.dtype, device=rt.device)
        b_t = torch.tensor(float(beta), dtype=rt.dtype, device=rt.device)
    p = mean_g[gid].clamp(p_clamp, 1 - p_clamp)
    inv_pdf = torch.exp(-_beta_log_pdf(p, a_t, b_t)).clamp(0.0, inv_pdf_max)
    return dev * inv_pdf


# ----------------------------------------------------------------------------------------------------
# DAPO dynamic sampling (loop hook)
# ----------------------------------------------------------------------------------------------------


def dynamic_sampling_keep(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    tol: float = 0.0,
    *,
    keep_singletons: bool = False,
    num_groups: Optional[int] = None,
    check: bool = True,
) -> torch.Tensor:
    """DAPO dynamic-sampling keep mask (Yu et al. 2025, arXiv 2503.14476). **[code]**

    Returns a ``(B,)`` bool mask that is True for every completion whose group has reward
    **population** std ``> tol`` (for binary rewards and tol = 0 this is 0 < #correct < G), so
    all-correct and all-wrong groups are dropped. The library gives the mask; over-generating until the
    batch is full is the trainer's loop.

    Args:
        tol: std threshold, >= 0 (default 0.0: drop exactly-constant groups).
        keep_singletons: keep groups of size 1 (verl's DAPO recipe does; the card's rule drops them).
    NaN rewards raise ValueError.
    """
    if not (tol >= 0):
        raise ValueError(f"tol must be >= 0, got {tol}")
    rewards, gid, G = _check_inputs(rewards, group_ids, num_groups, check, allow_nan=False)
    valid = torch.ones_like(rewards, dtype=torch.bool)
    _, ss_g, cnt, _ = _group_stats(rewards, gid, G, valid)
    std_g = torch.sqrt(ss_g / cnt.clamp_min(1))
    keep_g = std_g > tol
    if keep_singletons:
        keep_g = keep_g | (cnt == 1)
    return keep_g[gid]
