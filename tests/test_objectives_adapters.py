"""Ecosystem-adapter parity (card rl_objectives.md §6 #2 and #13): torchstep vs verl 0.9.1 and TRL 1.16.0.

verl is compared through its own ``core_algos`` functions (loop and vectorised estimators, policy losses,
``agg_loss`` with ``global_batch_info``) and its registry; TRL through ``GRPOTrainer._compute_loss`` called
on a ``types.SimpleNamespace`` fake trainer whose ``_get_per_token_logps_and_entropies`` returns given
log-probs.  TRL's advantage computation is inline in the ~450-line ``_generate_and_score_completions`` (it
needs reward functions, generation and an accelerator), so its few lines are transcribed in
:func:`_trl_advantages_transcribed` with the file/lines cited, using TRL's own ``nanstd``.

verl and TRL are imported plainly: a missing package fails this module (install: README test command /
docs/rl-objectives.md).  Tolerance 1e-6 on float32 inputs throughout.
"""
from __future__ import annotations

import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd
from verl.trainer.ppo import core_algos as ca
from verl.workers.config import ActorConfig

from torchstep.integrations.trl import (torchstep_grpo_trainer, trl_advantages, trl_loss, trl_normalizer,
                                        trl_objective)
from torchstep.integrations.verl import index_to_group_ids, register_with_verl
from torchstep.objectives import grpo_advantages, reinforce_pp_baseline_advantages, rloo_advantages

TOL = 1e-6
VERL_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]

register_with_verl()


# ------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------


def _verl_batch(seed=0, sizes=(2, 3, 4, 6), T=9):
    """Unequal group sizes, shuffled (non-contiguous) uid strings, unequal response lengths (>= 1)."""
    g = torch.Generator().manual_seed(seed)
    B = sum(sizes)
    uids = np.array([f"uid-{k}" for k, s in enumerate(sizes) for _ in range(s)], dtype=object)
    uids = uids[np.random.default_rng(seed).permutation(B)]
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T) < lens[:, None]).float()
    r = torch.rand(B, generator=g) * 2 - 0.5
    tlr = torch.zeros(B, T)
    tlr[torch.arange(B), lens - 1] = r          # outcome reward on the last valid token
    return tlr, mask, uids, r, lens


def _actor_cfg(**kw):
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, **kw)


def _logps(mask, seed=1, spread=0.8):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(mask.shape, generator=g) * 2 - 0.05
    lp = (old + torch.randn(mask.shape, generator=g) * spread).clamp(max=-1e-3)
    return old, lp


# ------------------------------------------------------------------------------------------------------
# (a) advantage estimators vs verl core_algos
# ------------------------------------------------------------------------------------------------------


def test_index_to_group_ids():
    gid = index_to_group_ids(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert gid.tolist() == [0, 1, 0, 2, 1]


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_grpo_matches_verl_loop_and_vectorized(norm_by_std):
    tlr, mask, uids, r, _ = _verl_batch()
    loop, ret = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids, norm_adv_by_std_in_grpo=norm_by_std)
    vec, _ = ca.compute_grpo_vectorized_outcome_advantage(tlr.clone(), mask, uids,
                                                          norm_adv_by_std_in_grpo=norm_by_std)
    assert (loop - vec).abs().max() <= TOL                       # card §6 #13: verl vectorised == loop
    # torchstep directly: verl's convention is Bessel std + 1e-6 (card §6 #2)
    gid = index_to_group_ids(uids)
    a = grpo_advantages(r, gid, scale="group" if norm_by_std else "none", std_eps=1e-6)
    assert (a.unsqueeze(-1) * mask - loop).abs().max() <= TOL
    # through verl's registry, reading norm_adv_by_std_in_grpo from verl's AlgoConfig
    from verl.trainer.config import AlgoConfig
    fn = ca.get_adv_estimator_fn("torchstep_grpo")
    adv, ret2 = fn(token_level_rewards=tlr.clone(), response_mask=mask, index=uids,
                   config=AlgoConfig(norm_adv_by_std_in_grpo=norm_by_std))
    assert adv.shape == loop.shape and (adv - loop).abs().max() <= TOL and torch.equal(adv, ret2)
    assert loop.abs().max() > 0.5                                 # non-trivial numbers
    if not norm_by_std:
        d, _ = ca.get_adv_estimator_fn("torchstep_drgrpo")(tlr.clone(), mask, index=uids)
        assert (d - loop).abs().max() <= TOL


def test_grpo_std_eps_conventions_differ_measurably():
    """TRL's 1e-4 vs verl's 1e-6 must not be interchangeable: verl's output differs from ε = 1e-4."""
    tlr, mask, uids, r, _ = _verl_batch(seed=3)
    loop, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    a4 = grpo_advantages(r, index_to_group_ids(uids), std_eps=1e-4).unsqueeze(-1) * mask
    assert (a4 - loop).abs().max() > 1e-5


@pytest.mark.parametrize("verl_fn", [ca.compute_rloo_outcome_advantage, ca.compute_rloo_vectorized_outcome_advantage])
def test_rloo_matches_verl(verl_fn):
    tlr, mask, uids, r, _ = _verl_batch(seed=4)
    ref, _ = verl_fn(tlr.clone(), mask, uids)
    a = rloo_advantages(r, index_to_group_ids(uids)).unsqueeze(-1) * mask
    assert (a - ref).abs().max() <= TOL and ref.abs().max() > 0.3
    reg, _ = ca.get_adv_estimator_fn("torchstep_rloo")(tlr.clone(), mask, index=uids)
    assert (reg - ref).abs().max() <= TOL


def test_reinforce_pp_baseline_matches_verl_token_weighted_whitening():
    tlr, mask, uids, r, lens = _verl_batch(seed=5)
    ref, _ = ca.compute_reinforce_plus_plus_baseline_outcome_advantage(tlr.clone(), mask, uids)
    a = reinforce_pp_baseline_advantages(r, index_to_group_ids(uids), lengths=lens, eps=1e-8)
    assert (a.unsqueeze(-1) * mask - ref).abs().max() <= TOL
    reg, _ = ca.get_adv_estimator_fn("torchstep_reinforce_pp_baseline")(tlr.clone(), mask, index=uids)
    assert (reg - ref).abs().max() <= TOL
    # the per-sequence (lengths=None) whitening is a different estimator: it must not match
    a1 = reinforce_pp_baseline_advantages(r, index_to_group_ids(uids)).unsqueeze(-1) * mask
    assert (a1 - ref).abs().max() > 1e-3


def test_singleton_group_deviation_from_verl_is_as_documented():
    """verl loop GRPO: r/(1+1e-6); verl loop RLOO: r; verl vectorised RLOO: 0; torchstep GRPO: 0."""
    tlr, mask, uids, r, _ = _verl_batch(seed=6, sizes=(1, 3, 4))
    solo = int(np.nonzero(uids == "uid-0")[0][0])
    g, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    assert abs(float(g[solo].sum() / mask[solo].sum()) - float(r[solo]) / (1 + 1e-6)) <= TOL
    ts, _ = ca.get_adv_estimator_fn("torchstep_grpo")(tlr.clone(), mask, index=uids)
    assert float(ts[solo].abs().max()) == 0.0
    others = [i for i in range(len(uids)) if i != solo]
    assert (ts[others] - g[others]).abs().max() <= TOL
    rl, _ = ca.compute_rloo_outcome_advantage(tlr.clone(), mask, uids)
    rv, _ = ca.compute_rloo_vectorized_outcome_advantage(tlr.clone(), mask, uids)
    assert abs(float(rl[solo].sum() / mask[solo].sum()) - float(r[solo])) <= TOL
    assert float(rv[solo].abs().max()) == 0.0
    with pytest.raises(ValueError, match="RLOO"):
        ca.get_adv_estimator_fn("torchstep_rloo")(tlr.clone(), mask, index=uids)


# ------------------------------------------------------------------------------------------------------
# (b) policy losses vs verl core_algos (values, gradients, metrics)
# ------------------------------------------------------------------------------------------------------


def _loss_and_grad(fn, old, lp, adv, mask, mode, cfg, w=None):
    x = lp.clone().requires_grad_(True)
    loss, metrics = fn(old, x, adv, mask, mode, cfg, w)
    (g,) = torch.autograd.grad(loss, x)
    return loss.detach(), g, metrics


_GBI = [None, {"dp_size": 2, "batch_num_tokens": 123, "global_batch_size": 37, "loss_scale_factor": 50}]


@pytest.mark.parametrize("mode", VERL_MODES)
@pytest.mark.parametrize("gbi", _GBI, ids=["local", "global"])
def test_ppo_clip_matches_verl_vanilla(mode, gbi):
    tlr, mask, uids, r, _ = _verl_batch(seed=7)
    adv, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    old, lp = _logps(mask)
    cfg = _actor_cfg(clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28)
    if gbi is not None:
        cfg.global_batch_info.update(gbi)
    w = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) + 0.5 if gbi else None
    l1, g1, m1 = _loss_and_grad(ca.compute_policy_loss_vanilla, old, lp, adv, mask, mode, cfg, w)
    l2, g2, m2 = _loss_and_grad(ca.get_policy_loss_fn("torchstep_ppo_clip"), old, lp, adv, mask, mode, cfg, w)
    assert abs(float(l1 - l2)) <= TOL and (g1 - g2).abs().max() <= TOL
    assert float(g1.abs().max()) > 1e-3
    for k in ("actor/pg_clipfrac", "actor/pg_clipfrac_lower", "actor/ppo_kl"):
        assert abs(m1[k] - m2[k]) <= TOL, k
    assert m1["actor/pg_clipfrac"] > 0.05 and m1["actor/pg_clipfrac_lower"] > 0.0   # both clips bind


@pytest.mark.parametrize("mode", VERL_MODES)
def test_gspo_matches_verl(mode):
    tlr, mask, uids, _, _ = _verl_batch(seed=8)
    adv, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    old, lp = _logps(mask, seed=3, spread=0.05)
    cfg = _actor_cfg(clip_ratio_low=0.01, clip_ratio_high=0.012)
    l1, g1, m1 = _loss_and_grad(ca.compute_policy_loss_gspo, old, lp, adv, mask, mode, cfg)
    l2, g2, m2 = _loss_and_grad(ca.get_policy_loss_fn("torchstep_gspo"), old, lp, adv, mask, mode, cfg)
    assert abs(float(l1 - l2)) <= TOL and (g1 - g2).abs().max() <= TOL
    assert abs(m1["actor/pg_clipfrac"] - m2["actor/pg_clipfrac"]) <= TOL and 0 < m1["actor/pg_clipfrac"] < 1


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_cispo_matches_verl_when_lower_clamp_inactive_and_differs_otherwise(mode):
    tlr, mask, uids, _, _ = _verl_batch(seed=9)
    adv, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    old, lp = _logps(mask, seed=4)
    fn = ca.get_policy_loss_fn("torchstep_cispo")
    cfg = _actor_cfg(clip_ratio_low=1.0, clip_ratio_high=1.0)       # verl lower bound 0: never binds
    l1, g1, _ = _loss_and_grad(ca.compute_policy_loss_cispo, old, lp, adv, mask, mode, cfg)
    l2, g2, _ = _loss_and_grad(fn, old, lp, adv, mask, mode, cfg)
    assert abs(float(l1 - l2)) <= TOL and (g1 - g2).abs().max() <= TOL
    assert float(((lp - old).exp() > 2.0)[mask.bool()].float().mean()) > 0.05   # the upper cap binds
    cfg = _actor_cfg(clip_ratio_low=0.2, clip_ratio_high=1.0)       # verl also clamps rho >= 0.8
    l1, g1, _ = _loss_and_grad(ca.compute_policy_loss_cispo, old, lp, adv, mask, mode, cfg)
    l2, g2, _ = _loss_and_grad(fn, old, lp, adv, mask, mode, cfg)
    assert (g1 - g2).abs().max() > 1e-3                             # documented deviation


def test_fixed_aggregation_override_luspo_equals_seq_mean_token_sum():
    tlr, mask, uids, _, _ = _verl_batch(seed=10)
    adv, _ = ca.compute_grpo_outcome_advantage(tlr.clone(), mask, uids)
    old, lp = _logps(mask)
    cfg = _actor_cfg(clip_ratio_high=0.28)
    try:
        luspo = register_with_verl("torchstep_luspo_", aggregation="luspo", estimators=(),
                                   losses=("ppo_clip",))["torchstep_luspo_ppo_clip"]
        l1, g1, _ = _loss_and_grad(ca.compute_policy_loss_vanilla, old, lp, adv, mask, "seq-mean-token-sum", cfg)
        l2, g2, _ = _loss_and_grad(luspo, old, lp, adv, mask, "token-mean", cfg)   # verl's mode is ignored
        assert abs(float(l1 - l2)) <= TOL and (g1 - g2).abs().max() <= TOL
    finally:
        ca.POLICY_LOSS_REGISTRY.pop("torchstep_luspo_ppo_clip", None)


# ------------------------------------------------------------------------------------------------------
# (c) registration
# ------------------------------------------------------------------------------------------------------


def test_registration_is_idempotent_and_refuses_to_clobber_verl():
    before = set(ca.ADV_ESTIMATOR_REGISTRY) | set(ca.POLICY_LOSS_REGISTRY)
    a = register_with_verl()
    b = register_with_verl(std_eps=1e-4)            # re-registering replaces (verl's decorator would raise)
    assert set(a) == set(b) and ca.get_adv_estimator_fn("torchstep_grpo") is b["torchstep_grpo"]
    assert {"torchstep_grpo", "torchstep_rloo", "torchstep_reinforce_pp_baseline", "torchstep_bnpo",
            "torchstep_ppo_clip", "torchstep_gspo", "torchstep_cispo"} <= set(ca.ADV_ESTIMATOR_REGISTRY) | set(
        ca.POLICY_LOSS_REGISTRY)
    with pytest.raises(ValueError, match="non-torchstep"):
        register_with_verl(prefix="")                # 'grpo' is verl's own
    assert set(ca.ADV_ESTIMATOR_REGISTRY) | set(ca.POLICY_LOSS_REGISTRY) == before
    assert ca.get_policy_loss_fn("vanilla") is ca.compute_policy_loss_vanilla
    register_with_verl()                              # restore the module-level defaults


# ------------------------------------------------------------------------------------------------------
# (d) TRL 1.16.0
# ------------------------------------------------------------------------------------------------------


def _trl_advantages_transcribed(rewards, num_generations, scale_rewards):
    """trl/trainer/grpo_trainer.py (TRL 1.16.0) lines 2761-2787 (``sum_then_normalize``) and 2810, verbatim
    apart from ``self.`` and the error branch; ``nanstd`` is TRL's own function."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_trl_advantages_incl_nan_rewards(scale):
    G, n = 4, 5
    r = torch.rand(n * G, generator=torch.Generator().manual_seed(11))
    r[[1, 6, 7, 8]] = float("nan")                      # group 1 keeps 3 scorable, group 2 keeps 1 (std NaN)
    r[12:16] = 0.5                                      # a constant group: std 0 -> 1e-4 denominator
    ref = _trl_advantages_transcribed(r, G, scale)
    gid = torch.arange(n).repeat_interleave(G)
    a = trl_advantages(r, gid, scale)
    assert (a - ref).abs().max() <= TOL and ref.abs().max() > 0.3
    obj = trl_objective("grpo", scale_rewards=scale)
    assert (obj.advantages(r, gid) - ref).abs().max() <= TOL
    perm = torch.randperm(n * G, generator=torch.Generator().manual_seed(0))   # group order is irrelevant
    assert (trl_advantages(r[perm], gid[perm], scale) - ref[perm]).abs().max() <= TOL


def _trl_fake(loss_type, logp, *, epsilon=0.2, epsilon_high=None, beta=0.0, L=12, level="token", accum=1,
              num_processes=1, spg=None, training=True):
    acc = types.SimpleNamespace(num_processes=num_processes, gather=lambda x: x, sync_gradients=True,
                                reduce=lambda x, reduction="sum": x, gather_for_metrics=lambda x: x)
    args = types.SimpleNamespace(delta=None, use_bias_correction_kl=False,
                                 steps_per_generation=accum if spg is None else spg)
    return types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda model, ids, am, keep, **kw: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, args=args, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, use_vllm=False,
        vllm_importance_sampling_correction=False, model=types.SimpleNamespace(training=training),
        current_gradient_accumulation_steps=accum, max_completion_length=L, accelerator=acc,
        _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        scale_rewards="group", torchstep_objective=None)


def _trl_inputs(seed=12, B=6, T=10, G=3):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    cmask = (torch.arange(T) < lens[:, None]).long()
    old = -torch.rand(B, T, generator=g) * 2 - 0.05
    logp = old + torch.randn(B, T, generator=g) * 0.6
    ref = old + torch.randn(B, T, generator=g) * 0.3
    r = torch.rand(B, generator=g)
    adv = trl_advantages(r, torch.arange(B // G).repeat_interleave(G))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": cmask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": torch.tensor(float(cmask.sum() * 3))}   # generation batch spans 3 micro-batches
    return logp, inputs


_TRL_CASES = [
    dict(loss_type="grpo"), dict(loss_type="grpo", accum=2, beta=0.04),
    dict(loss_type="grpo", level="sequence", epsilon=0.02),
    dict(loss_type="dr_grpo", accum=3), dict(loss_type="dapo", epsilon_high=0.28),
    dict(loss_type="dapo", epsilon_high=0.28, accum=2, num_processes=2, spg=4),
    dict(loss_type="bnpo", accum=2), dict(loss_type="cispo", epsilon_high=1.5, accum=3, spg=3),
    dict(loss_type="luspo", level="sequence", epsilon=0.02, beta=0.04),
    dict(loss_type="dapo", training=False, accum=4),
]


@pytest.mark.parametrize("case", _TRL_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_trl_compute_loss_parity(case):
    """TRL's real ``GRPOTrainer._compute_loss`` vs trl_objective + trl_loss vs the subclass: values + grads."""
    logp0, inputs = _trl_inputs()
    lt = case["loss_type"]
    accum, training = case.get("accum", 1), case.get("training", True)

    def trl_run():
        x = logp0.clone().requires_grad_(True)
        fake = _trl_fake(lt, x, **{k: v for k, v in case.items() if k != "loss_type"})
        loss = GRPOTrainer._compute_loss(fake, None, inputs)
        return loss, torch.autograd.grad(loss, x)[0], fake

    l_trl, g_trl, fake = trl_run()
    # 1) the functional adapter
    obj = trl_objective(lt, epsilon=case.get("epsilon", 0.2), epsilon_high=case.get("epsilon_high"),
                        beta=case.get("beta", 0.0), max_completion_length=12,
                        importance_sampling_level=case.get("level", "token"))
    x = logp0.clone().requires_grad_(True)
    l_ts, _ = trl_loss(obj, lt, x, inputs["old_per_token_logps"], inputs["completion_mask"], inputs["advantages"],
                       ref_logp=inputs["ref_per_token_logps"] if case.get("beta") else None,
                       gradient_accumulation_steps=accum if training else 1,
                       num_items_in_batch=inputs["num_items_in_batch"], num_processes=case.get("num_processes", 1),
                       steps_per_generation=(case.get("spg") or accum) if training else 1)
    (g_ts,) = torch.autograd.grad(l_ts, x)
    assert abs(float((l_trl - l_ts).detach())) <= TOL and (g_trl - g_ts).abs().max() <= TOL
    assert float(g_trl.abs().max()) > 1e-4 and abs(float(l_trl.detach())) > 1e-4
    # 2) the GRPOTrainer subclass's _compute_loss (called on the same fake trainer)
    sub = torchstep_grpo_trainer()
    assert issubclass(sub, GRPOTrainer)
    x = logp0.clone().requires_grad_(True)
    fake.__dict__.update(_get_per_token_logps_and_entropies=lambda *a, **k: (x, None, None))
    fake._torchstep_objective = types.MethodType(sub._torchstep_objective, fake)
    l_sub = sub._compute_loss(fake, None, inputs)
    (g_sub,) = torch.autograd.grad(l_sub, x)
    assert abs(float((l_trl - l_sub).detach())) <= TOL and (g_trl - g_sub).abs().max() <= TOL


def test_trl_normalizer_values_and_rejections():
    mask = torch.ones(4, 7)
    assert trl_normalizer("grpo", mask, gradient_accumulation_steps=3) == 12.0
    assert float(trl_normalizer("dapo", mask, gradient_accumulation_steps=2, num_items_in_batch=100,
                                num_processes=2, steps_per_generation=4)) == 25.0
    assert trl_normalizer("bnpo", mask) is None
    with pytest.raises(ValueError, match="num_items_in_batch"):
        trl_normalizer("cispo", mask)
    for bad in (dict(loss_type="sapo"), dict(loss_type="luspo"), dict(loss_type="dapo", importance_sampling_level="sequence")):
        with pytest.raises(ValueError):
            trl_objective(**bad)


def test_docs_grpotrainer_subclass_example_matches_trl():
    """The ``GRPOTrainer`` subclass printed in docs/rl-objectives.md reproduces TRL's ``_compute_loss``."""
    import pathlib
    import re
    src = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "rl-objectives.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", src, re.S) if "class TorchstepGRPOTrainer" in b]
    ns: dict = {}
    exec(block, ns)
    for case in (dict(loss_type="dr_grpo", accum=3), dict(loss_type="dapo", epsilon_high=0.28, accum=2, spg=4)):
        logp0, inputs = _trl_inputs(seed=13)
        x = logp0.clone().requires_grad_(True)
        fake = _trl_fake(case["loss_type"], x, **{k: v for k, v in case.items() if k != "loss_type"})
        l_trl = GRPOTrainer._compute_loss(fake, None, inputs)
        l_doc = ns["TorchstepGRPOTrainer"]._compute_loss(fake, None, inputs)
        assert abs(float((l_trl - l_doc).detach())) <= TOL and abs(float(l_trl.detach())) > 1e-4


def test_bnpo_estimator_through_verl_registry_equals_torchstep():
    """verl has no BNPO; the registered estimator must equal torchstep's, broadcast and masked."""
    from torchstep.objectives import bnpo_advantages
    tlr, mask, uids, _, lens = _verl_batch(seed=14)
    r = (torch.rand(len(uids), generator=torch.Generator().manual_seed(1)) > 0.5).float()
    tlr = torch.zeros_like(mask)
    tlr[torch.arange(len(uids)), lens - 1] = r
    adv, ret = ca.get_adv_estimator_fn("torchstep_bnpo")(tlr, mask, index=uids)
    ref = bnpo_advantages(r, index_to_group_ids(uids)).unsqueeze(-1) * mask
    assert (adv - ref).abs().max() <= TOL and torch.equal(adv, ret) and ref.abs().max() > 0.1
