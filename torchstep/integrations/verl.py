"""verl adapter: register torchstep's advantage estimators and policy losses in verl's registries.

verl (``verl.trainer.ppo.core_algos``) looks estimators up by ``algorithm.adv_estimator`` and policy losses
by ``actor_rollout_ref.actor.policy_loss.loss_mode``.  :func:`register_with_verl` adds, under a prefix
(default ``"torchstep_"``), thin wrappers that translate verl's call convention to torchstep's stage
functions (no verl code is copied; verl is imported only inside :func:`register_with_verl`).

Install verl without its GPU stack: ``pip install --no-deps verl==0.9.1`` plus torchstep's ``rl`` extra
(verl's import-time dependencies); see docs/rl-objectives.md.  Parity with verl's own ``core_algos`` is
tested in ``tests/test_objectives_adapters.py``.

Mapping
-------
Advantage estimators ``(token_level_rewards, response_mask, index, config, **kw) -> (adv, returns)``:

* outcome score ``r_i = token_level_rewards[i].sum()`` (as verl's outcome estimators);
* verl's ``index`` (numpy array of uid strings) -> integer ``group_ids`` in first-appearance order;
* the ``(B,)`` torchstep advantage is broadcast over tokens and multiplied by ``response_mask``; returns =
  advantages (as verl's outcome estimators).

Policy losses ``(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights) -> (loss, metrics)``:

* ``ppo_clip``: verl's ``vanilla`` loss always applies the dual clip (Ye et al. 2019) with
  ``clip_ratio_c`` (default 3) to negative-advantage tokens; that is exactly torchstep's two-sided δ clip
  (:func:`~torchstep.objectives.two_sided_clip_loss`) with ``δ = clip_ratio_c``, which is what is used;
  ``eps_low = clip_ratio_low or clip_ratio``, ``eps_high = clip_ratio_high or clip_ratio``;
* ``gspo``: :func:`~torchstep.objectives.gspo_loss` with the same eps (verl's token-level stop-gradient
  form has the same values and gradients);
* ``cispo``: :func:`~torchstep.objectives.cispo_loss` with ``eps_max = 1 + clip_ratio_high``;
* ``loss_agg_mode`` and ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
  ``global_batch_size``, ``loss_scale_factor``) map onto :func:`~torchstep.objectives.aggregate` with an
  explicit normaliser: ``token-mean`` Z = batch_num_tokens / dp_size (local Σ mask if None);
  ``token-sum`` Z = 1 / dp_size; ``seq-mean-token-mean`` / ``seq-mean-token-sum`` Z = global_batch_size /
  dp_size (local count of non-empty sequences if None); ``seq-mean-token-sum-norm`` additionally
  ``max_len = loss_scale_factor`` (padded length if None);
* ``rollout_is_weights`` multiply the per-token loss (not the aggregation weights), as in verl.

Deviations from verl (documented, tested where they bind):

* singleton groups: torchstep gives advantage 0 (GRPO, REINFORCE++-baseline mean-centring) or raises
  (RLOO); verl's loop GRPO gives ``r/(1+eps)``, loop RLOO gives ``r``, vectorised RLOO gives 0;
* CISPO: torchstep caps the IS weight from above only (card §2, TRL); verl also clamps it from below at
  ``1 - clip_ratio_low``;
* verl clamps the log-ratio to [-20, 20] (vanilla, cispo) and the GSPO log-ratio at 10; torchstep does not;
* verl's masked means add 1e-8 to denominators (relative differences ~1e-8).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch

from ..objectives import (aggregate, bnpo_advantages, cispo_loss, drgrpo_advantages, grpo_advantages, gspo_loss,
                          reinforce_pp_baseline_advantages, rloo_advantages, two_sided_clip_loss)

__all__ = ["register_with_verl", "index_to_group_ids", "ADV_ESTIMATORS", "POLICY_LOSSES", "verl_normalizer"]

#: torchstep estimator names registered (with the prefix) as verl advantage estimators
ADV_ESTIMATORS = ("grpo", "drgrpo", "rloo", "reinforce_pp_baseline", "bnpo")
#: torchstep surrogate names registered (with the prefix) as verl policy losses
POLICY_LOSSES = ("ppo_clip", "gspo", "cispo")

_VERL_AGG = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
_EXTRA_AGG = ("luspo", "trl-bnpo")
_MARK = "_torchstep_verl_adapter"


def _cfg_get(config: Any, key: str, default: Any) -> Any:
    if config is None:
        return default
    if isinstance(config, dict):
        return config.get(key, default)
    getter = getattr(config, "get", None)
    if callable(getter):
        try:
            return getter(key, default)
        except Exception:  # pragma: no cover - exotic config objects
            pass
    return getattr(config, key, default)


def index_to_group_ids(index: Any, device: Optional[torch.device] = None) -> torch.Tensor:
    """Map verl's ``index`` (uid per sample: numpy array of strings, list, or tensor) to ``(B,)`` int64
    ``group_ids`` numbered in order of first appearance (equal uid -> equal id)."""
    if isinstance(index, torch.Tensor):
        index = index.reshape(-1).tolist()
    ids: Dict[Any, int] = {}
    out = [ids.setdefault(u, len(ids)) for u in list(index)]
    return torch.tensor(out, dtype=torch.long, device=device)


def verl_normalizer(mode: str, response_mask: torch.Tensor, global_batch_info: Optional[dict] = None):
    """torchstep ``(aggregation mode, normalizer, max_len)`` reproducing verl's ``agg_loss`` for ``mode``.

    Args:
        mode: verl ``loss_agg_mode`` (``token-mean``, ``token-sum``, ``seq-mean-token-sum``,
            ``seq-mean-token-mean``, ``seq-mean-token-sum-norm``) or the torchstep extras ``luspo`` (sequence
            normaliser, like the seq modes) and ``trl-bnpo`` (local, normaliser None).
        response_mask: the micro-batch's ``(bs, T)`` mask (used only for verl's local fallbacks).
        global_batch_info: verl's ``config.global_batch_info`` (``dp_size``, ``batch_num_tokens``,
            ``global_batch_size``, ``loss_scale_factor``); missing/None entries fall back as verl does.
    """
    info = dict(global_batch_info or {})
    dp = info.get("dp_size") or 1
    m = response_mask.bool()
    if mode == "token-mean":
        n_tok = info.get("batch_num_tokens")
        if n_tok is None:
            if dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
            n_tok = m.sum().to(torch.float64)
        return "token-mean", n_tok / dp, None
    if mode == "token-sum":
        return "token-mean", 1.0 / dp, None
    if mode in ("seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm", "luspo"):
        gbs = info.get("global_batch_size")
        if gbs is None:
            if dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            gbs = m.any(-1).sum().to(torch.float64)
        if mode == "seq-mean-token-sum-norm":
            lsf = info.get("loss_scale_factor")
            return mode, gbs / dp, int(lsf) if lsf is not None else int(response_mask.shape[-1])
        return mode, gbs / dp, None
    if mode == "trl-bnpo":
        return mode, None, None
    raise ValueError(f"unsupported loss_agg_mode {mode!r}; expected one of {_VERL_AGG + _EXTRA_AGG}")


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> float:
    m = m.to(torch.float64)
    return float((x.to(torch.float64) * m).sum() / m.sum().clamp(min=1.0))


def _make_adv_fn(name: str, std_eps: float, bnpo_kwargs: dict) -> Callable:
    def adv_fn(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: Any = None,
               config: Any = None, **kwargs) -> tuple:
        if index is None:
            raise ValueError(f"torchstep {name} estimator needs verl's 'index' (uid per sample)")
        with torch.no_grad():
            scores = token_level_rewards.sum(dim=-1)
            gid = index_to_group_ids(index, device=scores.device)
            if name == "grpo":
                by_std = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
                a = grpo_advantages(scores, gid, scale="group" if by_std else "none", std_eps=std_eps)
            elif name == "drgrpo":
                a = drgrpo_advantages(scores, gid)
            elif name == "rloo":
                a = rloo_advantages(scores, gid)
            elif name == "reinforce_pp_baseline":
                a = reinforce_pp_baseline_advantages(scores, gid, lengths=response_mask.sum(-1), eps=1e-8)
            else:
                a = bnpo_advantages(scores, gid, **bnpo_kwargs)
            adv = a.unsqueeze(-1) * response_mask
        return adv, adv

    adv_fn.__name__ = f"torchstep_{name}_advantage"
    adv_fn.__doc__ = f"torchstep ``{name}`` advantages in verl's estimator signature (see torchstep.integrations.verl)."
    setattr(adv_fn, _MARK, True)
    return adv_fn


def _make_loss_fn(name: str, aggregation: Optional[str]) -> Callable:
    def loss_fn(old_log_prob: torch.Tensor, log_prob: torch.Tensor, advantages: torch.Tensor,
                response_mask: torch.Tensor, loss_agg_mode: str = "token-mean", config: Any = None,
                rollout_is_weights: Optional[torch.Tensor] = None) -> tuple:
        if config is None:
            raise ValueError("verl passes the actor config; torchstep policy losses need it for the clip widths")
        clip = _cfg_get(config, "clip_ratio", 0.2)
        lo = _cfg_get(config, "clip_ratio_low", None)
        hi = _cfg_get(config, "clip_ratio_high", None)
        eps_low = float(clip if lo is None else lo)
        eps_high = float(clip if hi is None else hi)
        if name == "ppo_clip":
            delta = float(_cfg_get(config, "clip_ratio_c", 3.0))
            out = two_sided_clip_loss(log_prob, old_log_prob, advantages, delta, eps_low, eps_high)
        elif name == "gspo":
            out = gspo_loss(log_prob, old_log_prob, advantages, response_mask, eps_low, eps_high)
        else:
            out = cispo_loss(log_prob, old_log_prob, advantages, 1.0 + eps_high)
        per_tok = out.loss if rollout_is_weights is None else out.loss * rollout_is_weights
        mode, z, max_len = verl_normalizer(aggregation or loss_agg_mode, response_mask,
                                           _cfg_get(config, "global_batch_info", None))
        kw = {"max_len": max_len} if max_len is not None else {}
        loss = aggregate(per_tok, response_mask, mode, z, **kw)
        with torch.no_grad():
            m = response_mask.bool()
            adv = advantages.detach()
            if name == "ppo_clip":
                lower = out.clipped_high & (adv < 0)          # dual clip (ratio > clip_ratio_c, A < 0)
                region = out.clipped_low | (out.clipped_high & (adv > 0))
            else:
                lower = torch.zeros_like(m)
                region = out.clipped_low | out.clipped_high
            metrics = {"actor/pg_clipfrac": _masked_mean(region, m),
                       "actor/ppo_kl": _masked_mean(old_log_prob.detach() - log_prob.detach(), m),
                       "actor/pg_clipfrac_lower": _masked_mean(lower, m)}
        return loss, metrics

    loss_fn.__name__ = f"torchstep_{name}_policy_loss"
    loss_fn.__doc__ = f"torchstep ``{name}`` surrogate in verl's policy-loss signature (see torchstep.integrations.verl)."
    setattr(loss_fn, _MARK, True)
    return loss_fn


def register_with_verl(prefix: str = "torchstep_", *, std_eps: float = 1e-6, aggregation: Optional[str] = None,
                       bnpo_reward_range=(0.0, 1.0), estimators=ADV_ESTIMATORS,
                       losses=POLICY_LOSSES) -> Dict[str, Callable]:
    """Register torchstep estimators and policy losses with verl under ``prefix + name``.

    Select them in a verl config with ``algorithm.adv_estimator=torchstep_grpo`` and
    ``actor_rollout_ref.actor.policy_loss.loss_mode=torchstep_ppo_clip``.  Idempotent: re-registering
    replaces earlier torchstep registrations (e.g. with other arguments); a name already taken by a
    non-torchstep function raises ``ValueError``.  verl is imported here, not at torchstep import.

    Args:
        prefix: name prefix (``"torchstep_"``).
        std_eps: GRPO std epsilon; default ``1e-6`` = verl's convention (torchstep/TRL default is 1e-4).
            GRPO reads verl's ``algorithm.norm_adv_by_std_in_grpo`` (False -> Dr.GRPO mean-centring).
        aggregation: ``None`` (default) uses verl's ``loss_agg_mode``; otherwise a fixed mode overriding it,
            one of verl's five or the torchstep extras ``"luspo"`` / ``"trl-bnpo"`` (verl's config only
            accepts its own five ``loss_agg_mode`` values, so the extras can only be chosen here).
        bnpo_reward_range: ``reward_range`` passed to :func:`~torchstep.objectives.bnpo_advantages`.
        estimators: subset of :data:`ADV_ESTIMATORS` to register.
        losses: subset of :data:`POLICY_LOSSES` to register.

    Returns: ``{registered name: function}``.  See the module docstring for the exact mapping and the
    deviations from verl's built-ins.
    """
    from verl.trainer.ppo import core_algos  # lazy: torchstep imports without verl

    if aggregation is not None and aggregation not in _VERL_AGG + _EXTRA_AGG:
        raise ValueError(f"aggregation must be None or one of {_VERL_AGG + _EXTRA_AGG}, got {aggregation!r}")
    bad = sorted(set(estimators) - set(ADV_ESTIMATORS)) + sorted(set(losses) - set(POLICY_LOSSES))
    if bad:
        raise ValueError(f"unknown torchstep estimator/loss name(s) {bad}; valid: {ADV_ESTIMATORS}, {POLICY_LOSSES}")
    if not (std_eps >= 0):
        raise ValueError(f"std_eps must be >= 0, got {std_eps}")

    plan = []
    for est in estimators:
        plan.append((core_algos.ADV_ESTIMATOR_REGISTRY, prefix + est,
                     _make_adv_fn(est, float(std_eps), {"reward_range": tuple(bnpo_reward_range)})))
    for ls in losses:
        plan.append((core_algos.POLICY_LOSS_REGISTRY, prefix + ls, _make_loss_fn(ls, aggregation)))
    for reg, key, _ in plan:  # check every name before registering any
        if key in reg and not getattr(reg[key], _MARK, False):
            raise ValueError(f"verl name {key!r} is already registered by a non-torchstep function {reg[key]!r}")
    done = {}
    for reg, key, fn in plan:
        reg.pop(key, None)  # replace an earlier torchstep registration (verl's register_adv_est would raise)
        if reg is core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(key)(fn)
        else:
            core_algos.register_policy_loss(key)(fn)
        done[key] = fn
    return done
