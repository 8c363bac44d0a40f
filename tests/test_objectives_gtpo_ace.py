"""GTPO / ACE / COPO stages and presets (rl_objectives.md §3, §6 #10, #11), pinned to hand-built numbers."""
import math

import pytest
import torch
import torch.nn.functional as F

from torchstep.objectives import (ace_advantages, ace_confidence_shift, copo_entropy_gate, copo_global_advantages,
                                  copo_loss, global_normalizer, grpo_advantages, gtpo_aggregate,
                                  gtpo_conflict_token_weights, gtpo_conflict_tokens, gtpo_entropy_advantages,
                                  gtpo_entropy_filter, gtpo_entropy_shaping, gtpo_num_conflict_tokens,
                                  gtpo_sequence_entropy, gtpo_surrogate, preset)
from torchstep.objectives.aggregate import aggregate
from torchstep.objectives.surrogates import ppo_clip_loss

D = torch.float64
CARD_IDS = torch.tensor([[1, 2, 3, 9], [1, 2, 4, 9], [1, 5, 3, 9]])
CARD_ADV = torch.tensor([1.0, -1.0, -1.0])


# ---------------------------------------------------------------- GTPO conflict tokens (§6 #10)
def test_gtpo_card_example_leading_run_weights_and_counts():
    ones = torch.ones(3, 4)
    w = gtpo_conflict_token_weights(CARD_IDS, ones, CARD_ADV, torch.zeros(3))
    assert w.tolist() == [[2, 2, 2, 2], [0, 0, 1, 1], [0, 1, 1, 1]]
    assert gtpo_num_conflict_tokens(CARD_IDS, ones, CARD_ADV, torch.zeros(3)).tolist() == [4, 2, 1]


def test_gtpo_trailing_run_is_multiplicative_like_author_code():
    ones = torch.ones(3, 4)
    lead, trail = gtpo_conflict_tokens(CARD_IDS, ones, CARD_ADV, torch.zeros(3), trailing=True)
    assert trail.tolist() == [[True] * 4, [False, False, False, True], [False, False, True, True]]
    w = gtpo_conflict_token_weights(CARD_IDS, ones, CARD_ADV, torch.zeros(3), trailing=True)
    assert w.tolist() == [[4, 4, 4, 4], [0, 0, 1, 0], [0, 1, 0, 0]]
    assert gtpo_num_conflict_tokens(CARD_IDS, ones, CARD_ADV, torch.zeros(3), trailing=True).tolist() == [4, 3, 3]


def test_gtpo_trailing_run_aligns_from_each_completion_end():
    ids = torch.tensor([[4, 7, 8, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    adv = torch.tensor([0.5, -0.5])
    assert gtpo_conflict_token_weights(ids, mask, adv, torch.tensor([3, 3])).tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    w = gtpo_conflict_token_weights(ids, mask, adv, torch.tensor([3, 3]), trailing=True)
    assert w.tolist() == [[1, 2, 2, 0], [1, 1, 0, 0]]
    assert gtpo_num_conflict_tokens(ids, mask, adv, torch.tensor([3, 3]), trailing=True).tolist() == [2, 2]
    with pytest.raises(ValueError, match="left-aligned"):
        gtpo_conflict_tokens(ids, torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]]), adv, torch.tensor([3, 3]),
                             trailing=True)


# ---------------------------------------------------------------- GTPO entropy stages
def test_gtpo_entropy_filter_and_shaping_hand_numbers():
    ent = torch.tensor([[0.4, 0.6, 9.0], [0.8, 0.8, 0.8], [0.1, 0.3, 0.0], [0.7, 0.0, 0.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 0, 0]])
    H = gtpo_sequence_entropy(ent, mask)
    assert torch.allclose(H, torch.tensor([0.5, 0.8, 0.2, 0.7], dtype=D), atol=1e-15, rtol=0)
    A = torch.tensor([1.0, -1.0, 0.0, 0.5], dtype=D)
    assert gtpo_entropy_filter(A, H).tolist() == [1.0, 0.0, 0.0, 0.5]                 # H = tau is kept
    shaped = gtpo_entropy_shaping(A, H)
    assert torch.allclose(shaped, torch.tensor([0.95, -1.0, -0.02, 0.43], dtype=D), atol=1e-15, rtol=0)
    both = gtpo_entropy_advantages(A, H)
    assert torch.allclose(both, torch.tensor([0.95, 0.0, -0.02, 0.43], dtype=D), atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="tau"):
        gtpo_entropy_filter(A, H, tau=-0.1)
    with pytest.raises(ValueError, match="gamma"):
        gtpo_entropy_shaping(A, H, gamma=float("nan"))


def test_gtpo_aggregate_hand_numbers_and_mask_count_denominator():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=D)
    lam = torch.tensor([[2.0, 2.0, 1.0], [0.0, 1.0, 1.0]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=D)
    n = torch.tensor([2.0, 0.0])
    # seq 0: (2 + 4) / 2 tokens / 2 conflicts = 1.5 ; seq 1: (0 + 5 + 6) / 3 / max(0, 1) = 11/3
    out = gtpo_aggregate(loss, lam, mask, n, 2.0)
    assert float(out) == pytest.approx((1.5 + 11 / 3) / 2, abs=1e-15)
    with pytest.raises(ValueError, match="normalizer"):
        gtpo_aggregate(loss, lam, mask, n, 0.0)
    with pytest.raises(ValueError, match="num_conflict"):
        gtpo_aggregate(loss, lam, mask, n[:1], 1.0)


def test_gtpo_surrogate_value_and_gradient():
    logp = torch.tensor([[-1.0, -2.0]], dtype=D, requires_grad=True)
    ell = gtpo_surrogate(logp, torch.tensor([0.25], dtype=D))
    assert ell.tolist() == [[-0.25, -0.25]]
    (g,) = torch.autograd.grad(ell.sum(), logp)
    assert g.tolist() == [[-0.25, -0.25]]


# ---------------------------------------------------------------- GTPO preset
def _gtpo_batch():
    ids = CARD_IDS
    mask = torch.ones(3, 4, dtype=D)
    rewards = torch.tensor([1.0, 0.0, 0.0], dtype=D)
    ent = torch.tensor([[0.5] * 4, [0.9] * 4, [0.2] * 4], dtype=D)
    g = torch.Generator().manual_seed(0)
    logp = (-torch.rand(3, 4, generator=g, dtype=D) - 0.1).requires_grad_(True)
    return rewards, torch.zeros(3, dtype=torch.long), logp, mask, ids, ent


def test_gtpo_preset_hand_numbers():
    r, gid, logp, mask, ids, ent = _gtpo_batch()
    obj = preset("gtpo")
    Z = global_normalizer(obj, mask, gid)
    assert Z == 1.0
    loss, diag = obj(r, gid, logp, logp.detach(), mask, normalizer=Z, token_ids=ids, entropy=ent)
    # A = r - mean = (2/3, -1/3, -1/3); H = (0.5, 0.9, 0.2) -> A' = (2/3 - 0.05, 0 (filtered), -1/3 - 0.02)
    a0, a2 = 2 / 3 - 0.05, -1 / 3 - 0.02
    # weights [[2,2,2,2],[0,0,1,1],[0,1,1,1]], n = (4, 2, 1), |o_i| = 4
    hand = (-a0 * 8 / 4) / 4 + 0.0 + (-a2 * 3 / 4) / 1
    assert float(loss.detach()) == pytest.approx(hand, abs=1e-12)
    (g,) = torch.autograd.grad(loss, logp)
    assert torch.allclose(g[0], torch.full((4,), -a0 * 2 / 4 / 4, dtype=D), atol=1e-12, rtol=0)
    assert torch.equal(g[1], torch.zeros(4, dtype=D))
    assert torch.allclose(g[2], torch.tensor([0.0, 1.0, 1.0, 1.0], dtype=D) * (-a2 / 4), atol=1e-12, rtol=0)
    assert float(diag["gtpo_filtered_frac"]) == pytest.approx(1 / 3)
    assert float(diag["gtpo_conflict_token_frac"]) == pytest.approx(7 / 12)
    assert float(diag["adv_abs_mean"]) == pytest.approx((abs(a0) + abs(a2)) / 3)


def test_gtpo_preset_ppo_clip_ratio_on_policy_equals_detached():
    r, gid, logp, mask, ids, ent = _gtpo_batch()
    l1, _ = preset("gtpo")(r, gid, logp, logp.detach(), mask, normalizer=1.0, token_ids=ids, entropy=ent)
    l2, _ = preset("gtpo", gtpo_ratio="ppo_clip")(r, gid, logp, logp.detach(), mask, normalizer=1.0,
                                                  token_ids=ids, entropy=ent)
    (g1,) = torch.autograd.grad(l1, logp)
    (g2,) = torch.autograd.grad(l2, logp)
    assert float(l1.detach()) == pytest.approx(float(l2.detach()), abs=1e-14)
    assert torch.allclose(g1, g2, atol=1e-14, rtol=0)


def test_gtpo_shaping_moves_zero_advantage_groups():
    # a group with equal rewards has A = 0 and no conflicts, but shaping gives A' = -gamma*H (author code)
    obj = preset("gtpo")
    logp = torch.zeros(2, 2, dtype=D, requires_grad=True)
    mask = torch.ones(2, 2, dtype=D)
    ent = torch.full((2, 2), 0.3, dtype=D)
    loss, _ = obj(torch.ones(2, dtype=D), torch.tensor([5, 5]), logp, logp.detach(), mask, normalizer=1.0,
                  token_ids=torch.tensor([[1, 2], [1, 2]]), entropy=ent)
    assert float(loss.detach()) == pytest.approx(2 * 0.03, abs=1e-15)       # -(−0.03)·2/2 per completion, summed


def test_gtpo_preset_microbatch_invariance_whole_groups():
    g = torch.Generator().manual_seed(3)
    lengths, groups = [3, 5, 2, 4, 4, 1], [0, 0, 0, 1, 1, 1]
    B, T = len(lengths), 5
    mask = torch.zeros(B, T, dtype=D)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = torch.randint(0, 3, (B, T), generator=g)
    ent = torch.rand(B, T, generator=g, dtype=D)
    logp = (-torch.rand(B, T, generator=g, dtype=D)).requires_grad_(True)
    r, gid = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=D), torch.tensor(groups)
    obj = preset("gtpo")
    A = obj.advantages(r, gid)
    Z = float(B)
    full, _ = obj(r, gid, logp, logp.detach(), mask, normalizer=Z, token_ids=ids, entropy=ent, advantages=A)
    (gf,) = torch.autograd.grad(full, logp)
    tot = sum(obj(r[a:b], gid[a:b], logp[a:b], logp.detach()[a:b], mask[a:b], normalizer=Z, token_ids=ids[a:b],
                  entropy=ent[a:b], advantages=A[a:b])[0] for a, b in ((0, 3), (3, 6)))
    (gm,) = torch.autograd.grad(tot, logp)
    assert abs(float((tot - full).detach())) < 1e-12
    assert torch.allclose(gm, gf, atol=1e-12, rtol=0)


def test_gtpo_preset_bad_input():
    r, gid, logp, mask, ids, ent = _gtpo_batch()
    obj = preset("gtpo")
    with pytest.raises(ValueError, match="token_ids"):
        obj(r, gid, logp, logp.detach(), mask, normalizer=1.0, entropy=ent)
    with pytest.raises(ValueError, match="entropy"):
        obj(r, gid, logp, logp.detach(), mask, normalizer=1.0, token_ids=ids)
    with pytest.raises(ValueError, match="entropy"):
        obj(r, gid, logp, logp.detach(), mask, normalizer=1.0, token_ids=ids, entropy=ent[:, :2])
    for kw in ({"aggregation": "token-mean"}, {"gtpo_ratio": "clip"}, {"tau": -1.0}, {"gamma": float("inf")},
               {"token_mean_scope": "group"}):
        with pytest.raises(ValueError):
            preset("gtpo", **kw)
    with pytest.raises(ValueError, match="gtpo-conflict-mean"):
        preset("grpo", aggregation="gtpo-conflict-mean")


# ---------------------------------------------------------------- ACE (§6 #11)
def test_ace_confidence_shift_hand_numbers_and_detached():
    logp = torch.tensor([[-1.0, -2.0, -7.0], [-0.5, -0.5, -0.5]], dtype=D, requires_grad=True)
    ref = torch.tensor([[-1.5, -2.5, 0.0], [-0.5, -1.5, -0.5]], dtype=D)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    c = ace_confidence_shift(logp, ref, mask)
    assert c.tolist() == [1.0, 1.0]
    assert not c.requires_grad


def test_ace_hand_numbers():
    A = torch.tensor([-0.5, -0.5, 0.7, -0.2], dtype=D)
    correct = torch.tensor([False, False, True, True])
    c = torch.tensor([0.0, 1.0, 5.0, 5.0], dtype=D)
    out = ace_advantages(A, correct, None, None, None, alpha=0.5, confidence=c)
    want = [-0.5 * (1 + 0.5 * math.log(2.0)), -0.5 * (1 + 0.5 * math.log1p(math.e)), 0.7, -0.2]
    assert out.tolist() == pytest.approx(want, abs=1e-15)
    with pytest.raises(ValueError, match="alpha"):
        ace_advantages(A, correct, None, None, None, alpha=-1.0, confidence=c)
    with pytest.raises(ValueError, match="correct"):
        ace_advantages(A, correct[:2], None, None, None, confidence=c)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ace_changes_only_incorrect_negative_and_never_shrinks(seed):
    """§6 #11 (exact): only incorrect rollouts with A < 0 change; |A| never decreases; signs kept."""
    g = torch.Generator().manual_seed(seed)
    B, T = 64, 6
    A = torch.randn(B, generator=g, dtype=D)
    A[:4] = 0.0
    correct = torch.rand(B, generator=g) < 0.5
    logp = -torch.rand(B, T, generator=g, dtype=D) * 3
    ref = -torch.rand(B, T, generator=g, dtype=D) * 3
    mask = (torch.rand(B, T, generator=g) < 0.8).to(D)
    out = ace_advantages(A, correct, logp, ref, mask, alpha=1.0)
    hit = (~correct) & (A < 0)
    assert bool(hit.any()) and bool((~hit).any())
    assert torch.equal(out[~hit], A[~hit])                     # untouched exactly
    assert bool((out[hit] != A[hit]).all())                    # every hit changes
    assert bool((out.abs() >= A.abs()).all())
    assert torch.equal(torch.sign(out), torch.sign(A))
    # the factor is 1 + softplus(c) exactly
    c = ((logp - ref) * mask).sum(-1)
    assert torch.equal(out[hit], A[hit] * (1 + F.softplus(c[hit])))


def _ace_batch():
    g = torch.Generator().manual_seed(7)
    B, T = 6, 4
    mask = torch.ones(B, T, dtype=D)
    mask[1, 2:] = 0
    mask[4, 1:] = 0
    old = -torch.rand(B, T, generator=g, dtype=D) - 0.2
    ref = old - 0.3 * torch.rand(B, T, generator=g, dtype=D)
    logp = (old + 0.1 * torch.randn(B, T, generator=g, dtype=D)).requires_grad_(True)
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 1.0], dtype=D)
    return r, torch.tensor([0, 0, 0, 1, 1, 1]), logp, old, ref, mask


def test_ace_preset_equals_hand_composition_and_microbatches():
    r, gid, logp, old, ref, mask = _ace_batch()
    obj = preset("ace")
    A = obj.advantages(r, gid, old_logp=old, ref_logp=ref, mask=mask)
    A_hand = ace_advantages(grpo_advantages(r, gid, std_eps=1e-4), r >= 0.5, old, ref, mask, alpha=1.0)
    assert torch.equal(A, A_hand)
    assert not torch.equal(A, grpo_advantages(r, gid, std_eps=1e-4))
    Z = global_normalizer(obj, mask, gid)
    loss, _ = obj(r, gid, logp, old, mask, normalizer=Z, ref_logp=ref)
    hand = aggregate(ppo_clip_loss(logp, old, A_hand, 0.2, 0.2).loss, mask, "seq-mean-token-mean", Z)
    assert torch.equal(loss, hand)
    tot = sum(obj(r[a:b], gid[a:b], logp[a:b], old[a:b], mask[a:b], normalizer=Z, advantages=A[a:b])[0]
              for a, b in ((0, 3), (3, 6)))
    assert abs(float((tot - loss).detach())) < 1e-12
    with pytest.raises(ValueError, match="ref_logp"):
        obj(r, gid, logp, old, mask, normalizer=Z)
    with pytest.raises(ValueError, match="ace_alpha"):
        preset("ace", ace_alpha=-0.1)


# ---------------------------------------------------------------- COPO (reconstructed)
def test_copo_global_advantage_and_gate_hand_numbers():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0], dtype=D)
    gid = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    Ag = copo_global_advantages(r, gid, std_eps=0.0)     # R = (1, 0.5, 0): mean 0.5, pop std sqrt(1/6)
    s = math.sqrt(1.5)
    assert Ag.tolist() == pytest.approx([s, s, 0.0, 0.0, -s, -s, -s], abs=1e-12)
    w = copo_entropy_gate(r, gid)
    assert w.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], abs=1e-12)
    w3 = copo_entropy_gate(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D), torch.zeros(4, dtype=torch.long))
    hb = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert w3.tolist() == pytest.approx([hb] * 4, abs=1e-12)
    with pytest.raises(ValueError, match="reward_range"):
        copo_entropy_gate(torch.tensor([2.0, 0.0]), torch.zeros(2, dtype=torch.long))


def test_copo_loss_blend_and_preset_gradient_on_consistent_groups():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=D)
    gid = torch.tensor([0, 0, 1, 1])
    logp = torch.full((4, 2), -1.0, dtype=D, requires_grad=True)
    mask = torch.ones(4, 2, dtype=D)
    obj = preset("copo")
    A3 = obj.advantages(r, gid)
    assert A3.shape == (4, 3)
    # group 0 all correct: local GRPO advantage 0, gate 0 -> pure global term, which is > 0
    assert A3[0].tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-5)
    out = copo_loss(logp, logp.detach(), A3[:, 0], A3[:, 1], A3[:, 2])
    eff = A3[:, 2] * A3[:, 0] + (1 - A3[:, 2]) * A3[:, 1]          # at ratio 1: ℓ = −(w A_loc + (1−w) A_glob)
    assert torch.allclose(out.loss, -eff.unsqueeze(-1).expand(4, 2), atol=1e-15, rtol=0)
    loss, _ = obj(r, gid, logp, logp.detach(), mask, normalizer=4.0)
    (g,) = torch.autograd.grad(loss, logp)
    assert bool((g[:2] < 0).all())             # GRPO would give exactly zero gradient here
    assert torch.equal(grpo_advantages(r, gid)[:2], torch.zeros(2, dtype=D))
    with pytest.raises(ValueError, match="copo"):
        obj(r, gid, logp, logp.detach(), mask, normalizer=4.0, advantages=A3[:, 0])
