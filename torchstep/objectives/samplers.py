"""Rollout allocators and prompt samplers for GRPO-style loops (pure torch, CPU-cheap).

* :func:`knapsack_allocate` — Knapsack RL (Li et al. 2025, arXiv 2509.25849), exact dynamic programming.
* :func:`gvm_allocate` — GVM-RAFT (Yao et al. 2025, arXiv 2505.02391) **[code]**.
* :func:`cures_allocate`, :func:`cures_prompt_probs`, :class:`CurESPromptSampler` — CurES (Zeng et al. 2025,
  arXiv 2510.01037) **[code]**.
* :class:`VADEThompsonSampler` — VADE (Hu et al. 2025, arXiv 2511.18902) — **partly unverified — check the paper**.

Every allocator returns an int64 tensor ``(P,)`` whose entries sum to ``budget`` exactly and lie in
``[n_min, n_max]``; infeasible budgets, negative budgets and mismatched shapes raise ``ValueError``.
Randomness is only drawn from an explicit ``torch.Generator``.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch

__all__ = ["knapsack_value", "knapsack_allocate", "gvm_allocate", "cures_sigma", "cures_allocate",
           "cures_prompt_probs", "CurESPromptSampler", "VADEThompsonSampler", "sample_beta",
           "proportional_allocate"]


# ----------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------


def _as_1d(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64)
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite")
    return t


def _check_budget(budget: int, P: int, n_min: int, n_max: Optional[int]) -> int:
    if isinstance(budget, bool) or int(budget) != budget:
        raise ValueError(f"budget must be an integer, got {budget!r}")
    budget = int(budget)
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if n_min < 0:
        raise ValueError(f"n_min must be >= 0, got {n_min}")
    if n_max is not None and n_max < n_min:
        raise ValueError(f"n_max ({n_max}) must be >= n_min ({n_min})")
    if budget < P * n_min:
        raise ValueError(f"budget {budget} is below the per-prompt minimum {P} * {n_min} = {P * n_min}")
    if n_max is not None and budget > P * n_max:
        raise ValueError(f"budget {budget} exceeds the per-prompt maximum {P} * {n_max} = {P * n_max}")
    return budget


def _check_probs(p: torch.Tensor, name: str) -> None:
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError(f"{name} must lie in [0, 1]")


# ----------------------------------------------------------------------------------------------------
# proportional integer allocation (shared by GVM-RAFT and CurES)
# ----------------------------------------------------------------------------------------------------


def proportional_allocate(weights: Any, budget: int, n_min: int = 0, n_max: Optional[int] = None) -> torch.Tensor:
    """Integer allocation ``n_i ≈ clip(c·w_i, n_min, n_max)`` with ``Σ n_i = budget`` exactly.

    ``c`` is found by bisection so the clipped continuous targets sum to the budget, then the targets are
    floored and the remainder is handed out by largest fractional part (ties: larger weight first, then lower
    index), never exceeding ``n_max``; prompts with zero weight only receive more than ``n_min`` when every
    positive-weight prompt is at ``n_max``. All-zero weights split the budget uniformly.

    Args:
        weights: ``(P,)`` non-negative finite weights.
        budget: total rollouts (int >= P·n_min, <= P·n_max).
        n_min: per-prompt minimum (default 0). n_max: per-prompt maximum (default None: unbounded).
    """
    w = _as_1d(weights, "weights")
    if bool((w < 0).any()):
        raise ValueError("weights must be >= 0")
    P = w.numel()
    budget = _check_budget(budget, P, n_min, n_max)
    hi_cap = float(budget if n_max is None else n_max)
    if float(w.sum()) == 0.0:
        w = torch.ones_like(w)
    pos = w > 0
    lo_c, hi_c = 0.0, (hi_cap + 1.0) / float(w[pos].min())

    def total(c: float) -> float:
        return float(torch.clamp(c * w, n_min, hi_cap).sum())

    for _ in range(200):
        mid = 0.5 * (lo_c + hi_c)
        if total(mid) < budget:
            lo_c = mid
        else:
            hi_c = mid
    t = torch.clamp(hi_c * w, n_min, hi_cap)
    n = torch.clamp(torch.floor(t), n_min, hi_cap).long()
    rem = t - n.double()
    deficit = budget - int(n.sum())
    # order for +1: largest remainder, then larger weight, then lower index (stable sort)
    while deficit != 0:
        if deficit > 0:
            room = n.double() < hi_cap
            key = torch.where(room, rem + 2.0 * pos.double(), torch.full_like(rem, -math.inf))
            order = torch.sort(key, descending=True, stable=True).indices
            k = min(deficit, int(room.sum()))
            idx = order[:k]
            n[idx] += 1
            rem[idx] -= 1.0
            deficit -= k
        else:
            room = n > n_min
            key = torch.where(room, rem, torch.full_like(rem, math.inf))
            order = torch.sort(key, stable=True).indices
            k = min(-deficit, int(room.sum()))
            idx = order[:k]
            n[idx] -= 1
            rem[idx] += 1.0
            deficit += k
    return n


# ----------------------------------------------------------------------------------------------------
# Knapsack RL
# ----------------------------------------------------------------------------------------------------


def knapsack_value(n: Any, p: Any) -> torch.Tensor:
    """Knapsack RL per-prompt value (Li et al. 2025, arXiv 2509.25849; value confirmed from a paper summary,
    no public code): ``Value(N, p) = (1 − p^N − (1−p)^N) · InfoGain(p)``, ``InfoGain(p) ≈ p(1−p)²``.

    ``1 − p^N − (1−p)^N`` is the probability that ``N`` rollouts contain both a success and a failure (a
    non-zero GRPO gradient). ``N = 0`` is defined as value 0 (the formula would give ``−InfoGain``).
    Broadcasts ``n`` against ``p``; returns float64.
    """
    n = torch.as_tensor(n, dtype=torch.float64)
    p = torch.as_tensor(p, dtype=torch.float64)
    v = (1.0 - p ** n - (1.0 - p) ** n) * p * (1.0 - p) ** 2
    return torch.where(n <= 0, torch.zeros_like(v), v)


def knapsack_allocate(pass_rates: Any, budget: int, n_min: int = 1, n_max: Optional[int] = None,
                      value_fn=knapsack_value) -> torch.Tensor:
    """Knapsack RL rollout allocation (Li et al. 2025, arXiv 2509.25849) by exact dynamic programming.

    Solves ``max Σ_i Value(N_i, p_i)`` s.t. ``Σ_i N_i ≤ budget``, ``n_min ≤ N_i ≤ n_max`` exactly
    (O(P · budget · (n_max − n_min)) work, vectorised over the budget axis). Among optimal allocations the DP
    prefers fewer rollouts (so p ∈ {0, 1} prompts, whose value is 0, get ``n_min``); budget left unused by the
    optimum (extra rollouts add no value, since Value is non-decreasing in N) is then handed out one at a time
    to prompts with room, highest ``InfoGain`` first, so the result sums to ``budget`` and is still optimal for
    the ``Σ = budget`` problem.

    Args:
        pass_rates: ``(P,)`` success-rate estimates p_i in [0, 1] (from recent rollouts).
        budget: total rollouts N_total (int, P·n_min ≤ budget ≤ P·n_max).
        n_min: N_low (default 1). n_max: N_up (default None → budget − (P−1)·n_min).
        value_fn: ``value_fn(n, p)`` broadcasting, non-decreasing in n (default :func:`knapsack_value`).
    """
    p = _as_1d(pass_rates, "pass_rates")
    _check_probs(p, "pass_rates")
    P = p.numel()
    budget = _check_budget(budget, P, n_min, n_max)
    if n_max is None:
        n_max = budget - (P - 1) * n_min
    B = budget - P * n_min                      # extra rollouts above the minimum
    K = min(n_max - n_min, B)                   # max extra for one prompt
    ks = torch.arange(K + 1, dtype=torch.float64)
    vals = value_fn((ks + n_min).unsqueeze(0), p.unsqueeze(1))        # (P, K+1)
    NEG = -math.inf
    dp = torch.full((B + 1,), NEG, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros((P, B + 1), dtype=torch.long)
    b = torch.arange(B + 1)
    src = b.unsqueeze(1) - torch.arange(K + 1).unsqueeze(0)            # (B+1, K+1)
    valid = src >= 0
    srcc = src.clamp_min(0)
    for i in range(P):
        cand = torch.where(valid, dp[srcc] + vals[i].unsqueeze(0), torch.full(src.shape, NEG, dtype=torch.float64))
        best, arg = cand.max(dim=1)             # first maximal index → fewest rollouts on ties
        dp = best
        choice[i] = arg
    used = int(torch.argmax(dp))                # first maximum → least budget among optima
    extra = torch.zeros(P, dtype=torch.long)
    for i in range(P - 1, -1, -1):
        k = int(choice[i, used])
        extra[i] = k
        used -= k
    n = extra + n_min
    left = budget - int(n.sum())
    if left > 0:
        gain = p * (1.0 - p) ** 2
        order = torch.sort(gain, descending=True, stable=True).indices
        while left > 0:
            for i in order.tolist():
                if left == 0:
                    break
                if n[i] < n_max:
                    n[i] += 1
                    left -= 1
    return n


# ----------------------------------------------------------------------------------------------------
# GVM-RAFT
# ----------------------------------------------------------------------------------------------------


def gvm_allocate(grad_norms: Any, accept_rates: Any, budget: int, alpha: float = 1e-3, beta: float = 2.0,
                 n_min: int = 0, n_max: Optional[int] = None) -> torch.Tensor:
    """GVM-RAFT rollout allocation (Yao et al. 2025, arXiv 2505.02391; author repo RLHFlow/GVM) **[code]**.

    ``n_i ∝ G_i / √(p_i + α / p_i^{β−1})``, rounded to integers with the total preserved
    (:func:`proportional_allocate`). With β > 1, ``p_i = 0`` gives weight 0; zero ``G_i`` gives 0 rollouts
    (with the default ``n_min = 0``) unless every other prompt is at ``n_max``.

    Args:
        grad_norms: ``(P,)`` G_i >= 0, mean gradient norm of log π over accepted samples (e.g. on ``lm_head``).
        accept_rates: ``(P,)`` p_i in [0, 1], acceptance rate from a small first stage.
        budget: total rollouts. alpha: α (default 1e-3). beta: β (default 2).
        n_min / n_max: per-prompt bounds (default 0 / unbounded).
    """
    G = _as_1d(grad_norms, "grad_norms")
    p = _as_1d(accept_rates, "accept_rates")
    if G.shape != p.shape:
        raise ValueError(f"grad_norms shape {tuple(G.shape)} does not match accept_rates shape {tuple(p.shape)}")
    if bool((G < 0).any()):
        raise ValueError("grad_norms must be >= 0")
    _check_probs(p, "accept_rates")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    denom = torch.sqrt(p + alpha / p ** (beta - 1.0))
    w = torch.where(G == 0, torch.zeros_like(G), G / denom)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("GVM weights are not finite (p_i = 0 with beta < 1?)")
    return proportional_allocate(w, budget, n_min, n_max)


# ----------------------------------------------------------------------------------------------------
# CurES
# ----------------------------------------------------------------------------------------------------


def cures_sigma(pass_rates: Any, sq_norm_correct: Any, sq_norm_wrong: Any, norm_correct: Any,
                norm_wrong: Any) -> torch.Tensor:
    """CurES per-prompt gradient std (Zeng et al. 2025, arXiv 2510.01037; author repo ZexuSun/CurES) **[code]**.

    ``σ² = p q²·E‖g_c‖² + p² q·E‖g_w‖² − p² q²·(E‖g_c‖ − E‖g_w‖)²``, ``q = 1 − p``; g_c / g_w are per-response
    gradients of log π for correct / wrong responses. With ``E‖g‖² ≥ (E‖g‖)²`` this is ≥ ``p q (q a + p b)²``
    ≥ 0; round-off negatives are clamped to 0. Returns σ (float64, shape ``(P,)``).
    """
    p = _as_1d(pass_rates, "pass_rates")
    _check_probs(p, "pass_rates")
    parts = [_as_1d(x, n) for x, n in ((sq_norm_correct, "sq_norm_correct"), (sq_norm_wrong, "sq_norm_wrong"),
                                      (norm_correct, "norm_correct"), (norm_wrong, "norm_wrong"))]
    for t in parts:
        if t.shape != p.shape:
            raise ValueError(f"gradient statistics shape {tuple(t.shape)} does not match pass_rates {tuple(p.shape)}")
        if bool((t < 0).any()):
            raise ValueError("gradient norm statistics must be >= 0")
    A, Bw, a, b = parts
    q = 1.0 - p
    var = p * q ** 2 * A + p ** 2 * q * Bw - p ** 2 * q ** 2 * (a - b) ** 2
    return torch.sqrt(var.clamp_min(0.0))


def cures_allocate(pass_rates: Any, sq_norm_correct: Any, sq_norm_wrong: Any, norm_correct: Any, norm_wrong: Any,
                   budget: int, n_min: int = 0, n_max: Optional[int] = None) -> torch.Tensor:
    """CurES rollout allocation ``n_i ∝ σ_i`` (:func:`cures_sigma`), integer with the total preserved. **[code]**

    Args: as :func:`cures_sigma`, plus budget (int) and per-prompt bounds n_min (default 0) / n_max (default
    unbounded).
    """
    sigma = cures_sigma(pass_rates, sq_norm_correct, sq_norm_wrong, norm_correct, norm_wrong)
    return proportional_allocate(sigma, budget, n_min, n_max)


def cures_prompt_probs(successes: Any, failures: Any) -> torch.Tensor:
    """CurES prompt-sampling distribution **[code]**: ``P(x) ∝ exp(√(p̂(1−p̂)) / t_x)``, ``p̂`` the mean of
    ``Beta(s+1, f+1)`` = (s+1)/(s+f+2), ``t_x = (s+1)/0.01``. Returns float64 probabilities ``(P,)``."""
    s = _as_1d(successes, "successes")
    f = _as_1d(failures, "failures")
    if s.shape != f.shape:
        raise ValueError(f"successes shape {tuple(s.shape)} does not match failures shape {tuple(f.shape)}")
    if bool(((s < 0) | (f < 0)).any()):
        raise ValueError("successes and failures must be >= 0")
    ph = (s + 1.0) / (s + f + 2.0)
    t = (s + 1.0) / 0.01
    return torch.softmax(torch.sqrt(ph * (1.0 - ph)) / t, dim=0)


class _BetaCounts:
    """Shared state: per-prompt Beta(α, β) pseudo-counts with a prior."""

    def __init__(self, num_prompts: int, prior_alpha: float = 1.0, prior_beta: float = 1.0):
        if int(num_prompts) != num_prompts or num_prompts <= 0:
            raise ValueError(f"num_prompts must be a positive integer, got {num_prompts!r}")
        if not (prior_alpha > 0 and prior_beta > 0):
            raise ValueError("prior_alpha and prior_beta must be > 0")
        self.num_prompts = int(num_prompts)
        self.prior_alpha = float(prior_alpha)
        self.prior_beta = float(prior_beta)
        self.alpha = torch.full((self.num_prompts,), self.prior_alpha, dtype=torch.float64)
        self.beta = torch.full((self.num_prompts,), self.prior_beta, dtype=torch.float64)

    def _parse_update(self, prompt_ids: Any, successes: Any, failures: Any):
        ids = torch.as_tensor(prompt_ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError("prompt_ids must be a 1-D integer tensor")
        ids = ids.long()
        s = torch.as_tensor(successes, dtype=torch.float64)
        f = torch.as_tensor(failures, dtype=torch.float64)
        if s.shape != ids.shape or f.shape != ids.shape:
            raise ValueError(f"successes {tuple(s.shape)} / failures {tuple(f.shape)} must match prompt_ids "
                             f"{tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_prompts):
            raise ValueError(f"prompt_ids must lie in [0, {self.num_prompts})")
        if bool(((s < 0) | (f < 0)).any()) or not bool(torch.isfinite(s + f).all()):
            raise ValueError("successes and failures must be finite and >= 0")
        return ids, s, f

    def _base_state(self) -> Dict[str, Any]:
        return {"num_prompts": self.num_prompts, "prior_alpha": self.prior_alpha, "prior_beta": self.prior_beta,
                "alpha": self.alpha.clone(), "beta": self.beta.clone()}

    def _load_base(self, sd: Dict[str, Any]) -> None:
        a = torch.as_tensor(sd["alpha"], dtype=torch.float64).clone()
        b = torch.as_tensor(sd["beta"], dtype=torch.float64).clone()
        n = int(sd["num_prompts"])
        if a.shape != (n,) or b.shape != (n,):
            raise ValueError("state_dict alpha/beta shapes do not match num_prompts")
        self.num_prompts, self.prior_alpha, self.prior_beta = n, float(sd["prior_alpha"]), float(sd["prior_beta"])
        self.alpha, self.beta = a, b


class CurESPromptSampler(_BetaCounts):
    """CurES prompt sampler **[code]** (Zeng et al. 2025, arXiv 2510.01037): tracks per-prompt successes s and
    failures f and samples prompts from :func:`cures_prompt_probs`.

    Args: num_prompts. ``update(prompt_ids, successes, failures)`` adds counts (ids may repeat);
    ``probs()``; ``sample(k, generator, replacement=False)`` → int64 prompt ids via ``torch.multinomial``.
    """

    def __init__(self, num_prompts: int):
        super().__init__(num_prompts, 1.0, 1.0)   # alpha = s + 1, beta = f + 1

    def update(self, prompt_ids: Any, successes: Any, failures: Any) -> None:
        ids, s, f = self._parse_update(prompt_ids, successes, failures)
        self.alpha.index_add_(0, ids, s)
        self.beta.index_add_(0, ids, f)

    def probs(self) -> torch.Tensor:
        return cures_prompt_probs(self.alpha - 1.0, self.beta - 1.0)

    def sample(self, k: int, generator: torch.Generator, replacement: bool = False) -> torch.Tensor:
        if k < 0 or (not replacement and k > self.num_prompts):
            raise ValueError(f"cannot sample k={k} of {self.num_prompts} prompts (replacement={replacement})")
        return torch.multinomial(self.probs(), k, replacement=replacement, generator=generator)

    def state_dict(self) -> Dict[str, Any]:
        return self._base_state()

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self._load_base(sd)


# ----------------------------------------------------------------------------------------------------
# VADE
# ----------------------------------------------------------------------------------------------------


def _sample_gamma(shape_k: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gamma(k, 1) draws (Marsaglia–Tsang, with the k < 1 boost), every random number from ``generator``."""
    k = shape_k.to(torch.float64)
    small = k < 1
    kk = torch.where(small, k + 1.0, k)
    d = kk - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(kk)
    todo = torch.ones_like(kk, dtype=torch.bool)
    while bool(todo.any()):
        x = torch.randn(kk.shape, dtype=torch.float64, generator=generator)
        u = torch.rand(kk.shape, dtype=torch.float64, generator=generator)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u.clamp_min(1e-300)) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        acc = todo & ok
        out = torch.where(acc, d * v, out)
        todo = todo & ~ok
    if bool(small.any()):
        u = torch.rand(kk.shape, dtype=torch.float64, generator=generator)
        out = torch.where(small, out * u.clamp_min(1e-300) ** (1.0 / k), out)
    return out


def sample_beta(alpha: torch.Tensor, beta: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Beta(α, β) draws via two Gamma draws, deterministic under ``generator`` (float64)."""
    ga = _sample_gamma(alpha, generator)
    gb = _sample_gamma(beta, generator)
    return ga / (ga + gb).clamp_min(1e-300)


class VADEThompsonSampler(_BetaCounts):
    """VADE Beta-posterior Thompson sampler over prompts (Hu et al. 2025, arXiv 2511.18902) —
    **partly unverified — check the paper**.

    Per-prompt ``Beta(α_i, β_i)`` posterior over correctness, updated online from group outcomes by the
    Beta–Bernoulli conjugate rule ``α_i ← α_i + s_i``, ``β_i ← β_i + f_i`` (s / f = correct / wrong rollouts).
    ``select(k, generator)`` draws ``p̃_i ~ Beta(α_i, β_i)`` and returns the ``k`` prompts with the largest
    information-gain score ``score_fn(p̃)``. **Unverified:** the exact score (default ``p̃(1−p̃)`` is the card's
    placeholder) and the "two-scale prior decay" for policy drift; here ``decay`` is a placeholder
    single-scale forgetting ``α ← prior + decay·(α − prior)`` (same for β) applied before each update
    (default 1.0 = none). No extra rollouts are needed.

    Args:
        num_prompts: number of prompts P.
        prior_alpha / prior_beta: Beta prior (default 1, 1 = uniform).
        decay: forgetting factor in (0, 1] (default 1.0; unverified placeholder).
        score_fn: score of the sampled p̃ (default ``p̃(1−p̃)``; unverified placeholder).
    """

    def __init__(self, num_prompts: int, prior_alpha: float = 1.0, prior_beta: float = 1.0, decay: float = 1.0,
                 score_fn=None):
        super().__init__(num_prompts, prior_alpha, prior_beta)
        if not (0 < decay <= 1):
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = float(decay)
        self.score_fn = score_fn if score_fn is not None else (lambda pt: pt * (1.0 - pt))

    def update(self, prompt_ids: Any, successes: Any, failures: Any) -> None:
        """Conjugate update for the given prompts (ids may repeat; counts add)."""
        ids, s, f = self._parse_update(prompt_ids, successes, failures)
        if self.decay != 1.0:
            self.alpha = self.prior_alpha + self.decay * (self.alpha - self.prior_alpha)
            self.beta = self.prior_beta + self.decay * (self.beta - self.prior_beta)
        self.alpha.index_add_(0, ids, s)
        self.beta.index_add_(0, ids, f)

    def posterior_mean(self) -> torch.Tensor:
        return self.alpha / (self.alpha + self.beta)

    def sample_p(self, generator: torch.Generator) -> torch.Tensor:
        """One Thompson draw ``p̃ ~ Beta(α, β)`` per prompt."""
        return sample_beta(self.alpha, self.beta, generator)

    def select(self, k: int, generator: torch.Generator) -> torch.Tensor:
        """Indices (int64, ``(k,)``) of the k prompts with the largest ``score_fn(p̃)``, best first."""
        if int(k) != k or not (0 <= k <= self.num_prompts):
            raise ValueError(f"k must be an integer in [0, {self.num_prompts}], got {k!r}")
        score = self.score_fn(self.sample_p(generator))
        return torch.topk(score, int(k)).indices

    def state_dict(self) -> Dict[str, Any]:
        sd = self._base_state()
        sd["decay"] = self.decay
        return sd

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        self._load_base(sd)
        self.decay = float(sd["decay"])
