"""Tests for torchstep.objectives.presets (composition, micro-batch invariance, card-specific choices)."""
import pytest
import torch

from helpers import length_mask

from torchstep.objectives.advantages import (bnpo_advantages, drgrpo_advantages, grpo_advantages,
                                             reinforce_pp_baseline_advantages, rloo_advantages)
from torchstep.objectives.aggregate import aggregate
from torchstep.objectives.presets import PRESETS, global_normalizer, preset
from torchstep.objectives.surrogates import cispo_loss, gspo_loss, ppo_clip_loss

LENGTHS = [2, 6, 3, 5, 1, 4, 4]
GROUPS = [0, 0, 1, 1, 1, 2, 2]
SPLITS = [(0, 2), (2, 5), (5, 7)]     # whole groups, unequal token counts
T = max(LENGTHS)
NEW_INPUTS = {"gtpo", "ace", "copo"}   # need token ids / entropies / ref logps: tests/test_objectives_gtpo_ace.py
NAMES = sorted(set(PRESETS) - NEW_INPUTS)
KW = {"cispo": {"eps_max": 1.1}}


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(LENGTHS)
    mask = length_mask(LENGTHS, T)
    rewards = torch.tensor([1., 0., 1., 0., 0., 1., 0.], dtype=torch.float64)
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5
    logp = (old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    return rewards, torch.tensor(GROUPS), logp, old, mask


def _hand(name, rewards, gid, logp, old, mask):
    B = len(LENGTHS)
    if name == "grpo" or name in ("dapo", "gspo", "cispo"):
        A = grpo_advantages(rewards, gid, scale="group", std_eps=1e-4)
    elif name == "dr_grpo":
        A = drgrpo_advantages(rewards, gid)
    elif name == "rloo":
        A = rloo_advantages(rewards, gid)
    elif name in ("dler", "reinforce_pp"):
        A = reinforce_pp_baseline_advantages(rewards, gid, eps=1e-8)
    elif name == "bnpo":
        A = bnpo_advantages(rewards, gid)
    if name == "gspo":
        out = gspo_loss(logp, old, A, mask, 3e-4, 4e-4)
    elif name == "cispo":
        out = cispo_loss(logp, old, A, 1.1)
    else:
        out = ppo_clip_loss(logp, old, A, 0.2, 0.28 if name in ("dapo", "dler") else 0.2)
    mode = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
            "dler": "token-mean", "rloo": "seq-mean-token-mean", "reinforce_pp": "token-mean",
            "bnpo": "seq-mean-token-mean", "gspo": "seq-mean-token-mean", "cispo": "token-mean"}[name]
    Z = {"token-mean": float(mask.sum()), "seq-mean-token-sum-norm": float(B * T)}.get(mode, float(B))
    return aggregate(out.loss, mask, mode, Z)


@pytest.mark.parametrize("name", NAMES)
def test_preset_equals_hand_composition(name):
    r, gid, logp, old, mask = _batch()
    obj = preset(name, **KW.get(name, {}))
    loss, diag = obj(r, gid, logp, old, mask, normalizer=global_normalizer(obj, mask, gid))
    ref = _hand(name, r, gid, logp, old, mask)
    assert torch.equal(loss, ref)
    assert set(diag) >= {"clip_frac_low", "clip_frac_high", "zero_var_group_frac", "adv_abs_mean"}


# the per-group token-mean scope exists only for token-mean presets
SCOPES = [(n, "batch") for n in NAMES] + [(n, "group") for n in NAMES
                                          if PRESETS[n]["stage_args"]["aggregation"] == "token-mean"]


@pytest.mark.parametrize("name, scope", SCOPES)
def test_microbatch_invariance(name, scope):
    r, gid, logp, old, mask = _batch(1)
    kw = dict(KW.get(name, {}))
    if scope == "group":
        kw["token_mean_scope"] = "group"
    obj = preset(name, **kw)
    Z = global_normalizer(obj, mask, gid)
    A = obj.advantages(r, gid)
    full, _ = obj(r, gid, logp, old, mask, normalizer=Z, advantages=A)
    (g_full,) = torch.autograd.grad(full, logp)
    tot = 0.0
    for a, b in SPLITS:
        part, _ = obj(r[a:b], gid[a:b], logp[a:b], old[a:b], mask[a:b], normalizer=Z, advantages=A[a:b])
        tot = tot + part
    (g_mb,) = torch.autograd.grad(tot, logp)
    assert abs(float((tot - full).detach())) < 1e-6
    assert torch.allclose(g_mb, g_full, atol=1e-6, rtol=0)
    # naive per-micro-batch normaliser / K differs (card §4) for token-mean
    if obj.aggregation_mode == "token-mean":
        naive = sum(obj(r[a:b], gid[a:b], logp[a:b], old[a:b], mask[a:b], normalizer=float(mask[a:b].sum()),
                        advantages=A[a:b])[0] for a, b in SPLITS) / len(SPLITS)
        assert abs(float((naive - full).detach())) > 1e-5


def test_drgrpo_vs_grpo_per_card():
    r, gid, logp, old, mask = _batch()
    g_obj, d_obj = preset("grpo"), preset("dr_grpo")
    assert g_obj.advantage == "grpo" and d_obj.advantage == "drgrpo"
    assert g_obj.aggregation_mode == "seq-mean-token-mean" and d_obj.aggregation_mode == "seq-mean-token-sum-norm"
    # Dr.GRPO: no std division
    assert torch.allclose(d_obj.advantages(r, gid), r - torch.tensor([.5, .5, 1 / 3, 1 / 3, 1 / 3, .5, .5],
                                                                       dtype=torch.float64))
    # on-policy (ratio 1): Dr.GRPO per-token grad magnitude is the same for every valid token; GRPO's is not
    lp = old.clone().requires_grad_(True)
    grads = {}
    for o in (g_obj, d_obj):
        loss, _ = o(r, gid, lp, old, mask, normalizer=global_normalizer(o, mask))
        (grads[o.name],) = torch.autograd.grad(loss, lp)
    m = mask.bool()
    Ad = d_obj.advantages(r, gid).abs().unsqueeze(-1).expand_as(mask)
    gd = grads["dr_grpo"][m].abs() / Ad[m]        # per-token weight, |A| factored out
    assert torch.allclose(gd, gd[0].expand_as(gd))
    gg = grads["grpo"]
    assert gg[0, 0].abs() > gg[1, 0].abs()   # length 2 vs length 6, same |A|
    # max_len override: TRL C = B * max_completion_length
    d2 = preset("dr_grpo", max_len=T)
    l2, _ = d2(r, gid, lp, old, mask, normalizer=global_normalizer(d2, mask))
    l1, _ = d_obj(r, gid, lp, old, mask, normalizer=global_normalizer(d_obj, mask))
    assert torch.allclose(l1, l2)


def test_dapo_card_choices():
    obj = preset("dapo")
    a = obj.stage_args
    assert (a["eps_low"], a["eps_high"], a["kl_beta"]) == (0.2, 0.28, 0.0)
    assert obj.aggregation_mode == "token-mean"
    assert preset("dapo", token_mean_scope="group").aggregation_mode == "group-mean-token-mean"
    r, gid, logp, old, mask = _batch()
    # ratio 1.25, A > 0: gradient non-zero under clip-higher 0.28, zero under GRPO's 0.2
    lp = (old + torch.log(torch.tensor(1.25, dtype=torch.float64))).requires_grad_(True)
    for o, nonzero in ((obj, True), (preset("dapo", eps_high=0.2), False)):
        loss, _ = o(r, gid, lp, old, mask, normalizer=global_normalizer(o, mask))
        (g,) = torch.autograd.grad(loss, lp)
        A = o.advantages(r, gid)
        assert bool((g[A > 0][mask[A > 0].bool()] != 0).all()) == nonzero
    # group scope normaliser = number of groups; value = mean over groups of group token means
    og = preset("dapo", token_mean_scope="group")
    assert global_normalizer(og, mask, gid) == 3.0
    # soft overlong reward when configured: L_max 5, L_c 2 -> lengths (2,6,3,5,1,4,4) penalties
    ol = preset("dapo", overlong_max_length=5, overlong_cache_length=2)
    rt = ol.transform_rewards(r, mask.sum(-1))
    assert torch.allclose(rt - r, torch.tensor([0, -1, 0, -1, 0, -0.5, -0.5], dtype=torch.float64))


def test_diagnostics_hand_built():
    obj = preset("grpo")
    mask = torch.tensor([[1., 1.], [1., 0.], [1., 1.], [1., 1.]], dtype=torch.float64)
    old = torch.zeros(4, 2, dtype=torch.float64)
    # seq0 A>0 ratio 1.5 on both tokens (high clip); seq1 A<0 ratio 0.5 (low clip); group 1 constant rewards
    lr = torch.log(torch.tensor([[1.5, 1.5], [0.5, 9.0], [1.0, 1.0], [1.0, 1.0]], dtype=torch.float64))
    r = torch.tensor([1., 0., 1., 1.], dtype=torch.float64)
    gid = torch.tensor([0, 0, 1, 1])
    ent = torch.tensor([[1., 2.], [3., 100.], [0., 0.], [1., 1.]], dtype=torch.float64)
    _, d = obj(r, gid, lr.requires_grad_(True), old, mask, normalizer=4.0, entropy=ent)
    assert float(d["clip_frac_high"]) == pytest.approx(2 / 7)
    assert float(d["clip_frac_low"]) == pytest.approx(1 / 7)
    assert float(d["zero_var_group_frac"]) == 0.5
    A = grpo_advantages(r, gid)
    assert float(d["adv_abs_mean"]) == pytest.approx(float(A.abs().mean()))
    assert float(d["entropy"]) == pytest.approx(8 / 7)
    assert float(d["num_tokens"]) == 7


def test_bad_input_raises():
    with pytest.raises(ValueError, match="valid presets"):
        preset("ppo")
    for left_out in ("dagrpo", "capo"):
        with pytest.raises(ValueError):
            preset(left_out)
    with pytest.raises(ValueError, match="valid"):
        preset("grpo", epsilon=0.3)
    with pytest.raises(ValueError, match="eps_max"):
        preset("cispo")
    with pytest.raises(ValueError):
        preset("grpo", aggregation="nope")
    with pytest.raises(ValueError):
        preset("grpo", token_mean_scope="group")
    r, gid, logp, old, mask = _batch()
    obj = preset("grpo")
    with pytest.raises(TypeError):
        obj(r, gid, logp, old, mask)              # normalizer is required
    with pytest.raises(ValueError):
        obj(r[:3], gid, logp, old, mask, normalizer=7.0)
    with pytest.raises(ValueError):
        obj(r, gid, logp, old, mask[:, :2], normalizer=7.0)
    with pytest.raises(ValueError):
        obj(r, gid, logp, old, mask, normalizer=0.0)
    with pytest.raises(ValueError):
        preset("grpo", kl_beta=0.1)(r, gid, logp, old, mask, normalizer=7.0)   # KL needs ref_logp
    with pytest.raises(ValueError):
        preset("dler", truncation_max_length=3).transform_rewards(r)           # needs seq_lengths


def test_kl_override_and_overrides_isolated():
    r, gid, logp, old, mask = _batch()
    ref = old + 0.1
    o = preset("grpo", kl_beta=0.05)
    loss, _ = o(r, gid, logp, old, mask, normalizer=7.0, ref_logp=ref)
    A = grpo_advantages(r, gid)
    hand = aggregate(ppo_clip_loss(logp, old, A, 0.2, 0.2, ref_logp=ref, beta=0.05).loss, mask,
                     "seq-mean-token-mean", 7.0)
    assert torch.equal(loss, hand)
    assert PRESETS["grpo"]["stage_args"]["kl_beta"] == 0.0   # override did not leak
