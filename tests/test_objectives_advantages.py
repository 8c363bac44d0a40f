"""Property tests (rl_objectives.md §6 #1-4, #6 (advantage side), #8, #12) for stage-0/1 objectives."""

import math

import pytest
import torch

from torchstep.objectives.advantages import (
    bnpo_advantages,
    drgrpo_advantages,
    dynamic_sampling_keep,
    grpo_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
)
from torchstep.objectives.rewards import (
    ensemble_mean,
    ensemble_rewards,
    ensemble_uwo,
    ensemble_wco,
    overlong_penalty,
    truncation_penalty,
)

D = torch.float64
# unequal, non-contiguous group sizes 3, 2, 2
R = torch.tensor([1.0, 0.3, -0.5, 2.0, 0.1, 0.7, -1.2], dtype=D)
GID = torch.tensor([0, 1, 0, 2, 1, 2, 0])


def _groups(gid):
    return [torch.nonzero(gid == g).flatten() for g in torch.unique(gid)]


def _ref_grpo(r, gid, eps):
    out = torch.empty_like(r)
    for idx in _groups(gid):
        x = r[idx]
        out[idx] = (x - x.mean()) / (x.std(unbiased=True) + eps)
    return out


# ---- #1 group sums zero, unit sample std, unequal sizes -------------------------------------------
@pytest.mark.parametrize("fn", [
    lambda r, g: grpo_advantages(r, g),
    lambda r, g: grpo_advantages(r, g, scale="batch"),
    drgrpo_advantages,
    rloo_advantages,
    lambda r, g: bnpo_advantages(torch.sigmoid(r), g),
])
def test_group_sums_zero_unequal_sizes(fn):
    a = fn(R, GID)
    for idx in _groups(GID):
        assert abs(a[idx].sum().item()) < 1e-6


def test_grpo_eps0_unit_std_and_equals_per_group():
    a = grpo_advantages(R, GID, std_eps=0.0)
    for idx in _groups(GID):
        assert abs(a[idx].std(unbiased=True).item() - 1.0) < 1e-5
        # per-group computation on each group alone gives the same numbers
        sub = grpo_advantages(R[idx], torch.zeros(len(idx), dtype=torch.long), std_eps=0.0)
        torch.testing.assert_close(a[idx], sub, atol=1e-6, rtol=0)


def test_all_estimators_unequal_sizes_equal_per_group():
    for fn in (drgrpo_advantages, rloo_advantages, lambda r, g: grpo_advantages(r, g)):
        a = fn(R, GID)
        for idx in _groups(GID):
            sub = fn(R[idx], torch.zeros(len(idx), dtype=torch.long))
            torch.testing.assert_close(a[idx], sub, atol=1e-6, rtol=0)


# ---- #2 TRL / verl conventions -------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-4, 1e-6])
def test_grpo_trl_verl_convention(eps):
    a = grpo_advantages(R, GID, std_eps=eps)
    torch.testing.assert_close(a, _ref_grpo(R, GID, eps), atol=1e-6, rtol=0)


def test_grpo_default_eps_is_trl():
    torch.testing.assert_close(grpo_advantages(R, GID), _ref_grpo(R, GID, 1e-4), atol=1e-6, rtol=0)


def test_grpo_batch_scale():
    a = grpo_advantages(R, GID, scale="batch", std_eps=1e-4)
    ref = torch.empty_like(R)
    for idx in _groups(GID):
        ref[idx] = R[idx] - R[idx].mean()
    ref = ref / (R.std(unbiased=True) + 1e-4)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)


def test_grpo_nan_reward_gets_zero_and_is_excluded():
    r = R.clone()
    r[1] = float("nan")
    a = grpo_advantages(r, GID)
    assert a[1].item() == 0.0 and torch.isfinite(a).all()
    # group 1 now has one scorable member -> its advantage is 0 too; other groups unaffected
    assert a[4].item() == 0.0
    keep = torch.tensor([0, 2, 6, 3, 5])
    torch.testing.assert_close(a[keep], grpo_advantages(R, GID)[keep])


def test_grpo_constant_group_zero():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0], dtype=D)
    g = torch.tensor([0, 0, 1, 1])
    assert (grpo_advantages(r, g, std_eps=0.0)[:2] == 0).all()


# ---- #3 RLOO -------------------------------------------------------------------------------------
def test_rloo_identity_and_leave_one_out():
    a = rloo_advantages(R, GID)
    for idx in _groups(GID):
        x = R[idx]
        G = len(idx)
        torch.testing.assert_close(a[idx], G / (G - 1) * (x - x.mean()), atol=1e-6, rtol=0)
        loo = torch.stack([x[i] - torch.cat([x[:i], x[i + 1:]]).mean() for i in range(G)])
        torch.testing.assert_close(a[idx], loo, atol=1e-6, rtol=0)


def test_rloo_group_of_one_raises():
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0, 0, 1]))


# ---- Dr.GRPO = mean centring only; REINFORCE++-baseline -------------------------------------------
def test_drgrpo_is_mean_centring():
    a = drgrpo_advantages(R, GID)
    for idx in _groups(GID):
        torch.testing.assert_close(a[idx], R[idx] - R[idx].mean(), atol=1e-12, rtol=0)
    torch.testing.assert_close(a, grpo_advantages(R, GID, scale="none"))


def test_reinforce_pp_baseline_whitened():
    a = reinforce_pp_baseline_advantages(R, GID)
    s = drgrpo_advantages(R, GID)
    ref = (s - s.mean()) / torch.sqrt(s.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=0)
    assert abs(a.mean().item()) < 1e-6 and abs(a.std().item() - 1) < 1e-5
    # token-weighted whitening == whitening of the scores broadcast over tokens
    L = torch.tensor([2, 3, 1, 4, 2, 1, 3])
    aw = reinforce_pp_baseline_advantages(R, GID, lengths=L)
    tok = torch.repeat_interleave(s, L)
    ref_w = (s - tok.mean()) / torch.sqrt(tok.var(unbiased=True) + 1e-8)
    torch.testing.assert_close(aw, ref_w, atol=1e-6, rtol=0)


# ---- #4 BNPO special cases -----------------------------------------------------------------------
RB = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 1, 0], dtype=D)  # binary, every group 0 < p < 1
GB = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 1])           # sizes 3, 3, 4


def test_bnpo_alpha_beta_one_is_reinforce_group_mean():
    a = bnpo_advantages(RB, GB, alpha=1.0, beta=1.0)
    torch.testing.assert_close(a, drgrpo_advantages(RB, GB), atol=1e-6, rtol=0)


def test_bnpo_alpha_beta_three_halves_is_scaled_grpo_population_std():
    a = bnpo_advantages(RB, GB, alpha=1.5, beta=1.5)
    ref = torch.empty_like(RB)
    for idx in _groups(GB):
        x = RB[idx]
        ref[idx] = (x - x.mean()) / x.std(unbiased=False)
    torch.testing.assert_close(a, math.pi / 8 * ref, atol=1e-4, rtol=0)


def test_bnpo_data_derived_params():
    # p^ = (1/3, 2/3, 1/2): mu = 1/2, var = 1/54, k = 12.5, a = b = 6.25, alpha = beta = 1 + 6.25/3
    a = bnpo_advantages(RB, GB)
    al = 1 + 6.25 / 3
    ref = bnpo_advantages(RB, GB, alpha=al, beta=al)
    torch.testing.assert_close(a, ref, atol=1e-9, rtol=0)


def test_bnpo_affine_map_and_range_check():
    a01 = bnpo_advantages(RB, GB)
    a = bnpo_advantages(2 * RB - 1, GB, reward_range=(-1.0, 1.0))
    torch.testing.assert_close(a, a01)
    with pytest.raises(ValueError):
        bnpo_advantages(RB + 1, GB)



# ---- #8 dynamic sampling and DAPO overlong -------------------------------------------------------
def test_dynamic_sampling_keep():
    r = torch.tensor([1.0, 1, 1, 0, 0, 1, 0, 0, 1])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3])  # all-correct, all-wrong, mixed, mixed
    keep = dynamic_sampling_keep(r, g, 0.0)
    assert keep.tolist() == [False] * 5 + [True] * 4
    single = dynamic_sampling_keep(torch.tensor([1.0, 0, 1]), torch.tensor([0, 0, 1]))
    assert single.tolist() == [True, True, False]
    assert dynamic_sampling_keep(torch.tensor([1.0, 0, 1]), torch.tensor([0, 0, 1]),
                                 keep_singletons=True).tolist() == [True] * 3
    # tol: population std 0.5 for a 1/0 pair
    assert not dynamic_sampling_keep(torch.tensor([1.0, 0]), torch.tensor([0, 0]), tol=0.5).any()


def test_dapo_overlong_worked_numbers():
    pen = overlong_penalty(torch.tensor([90, 50, 120]), 100, 20)
    assert pen.tolist() == [-0.5, 0.0, -1.0]
    out = overlong_penalty(torch.tensor([90, 50, 120]), 100, 20, rewards=torch.tensor([1.0, 1.0, 1.0]))
    assert out.tolist() == [0.5, 1.0, 0.0]
    assert overlong_penalty(torch.tensor([80, 100, 101]), 100, 20).tolist() == [0.0, -1.0, -1.0]


def test_dler_truncation():
    r = torch.tensor([1.0, 0.5, 1.0])
    out = truncation_penalty(r, torch.tensor([10, 4000, 4001]), 4000)
    assert out.tolist() == [1.0, 0.5, 0.0]
    out = truncation_penalty(r, torch.tensor([10, 20, 30]), 4000, truncated=torch.tensor([True, False, False]))
    assert out.tolist() == [0.0, 0.5, 1.0]


# ---- #12 ensembles -------------------------------------------------------------------------------
def test_ensembles_worked_numbers():
    s = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert ensemble_wco(s).tolist() == [1.0, 0.0]
    assert ensemble_uwo(s, 0.5).tolist() == [1.0, 0.0]
    assert ensemble_mean(s).tolist() == [2.0, 0.0]
    assert ensemble_rewards(s, "uwo", 0.5).tolist() == [1.0, 0.0]
    assert ensemble_rewards(s, "wco").tolist() == [1.0, 0.0]


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("call", [
    lambda: grpo_advantages(torch.zeros(3), torch.zeros(2, dtype=torch.long)),
    lambda: grpo_advantages(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long)),
    lambda: grpo_advantages(torch.zeros(3), torch.zeros(3)),
    lambda: grpo_advantages(torch.zeros(3), torch.tensor([0, -1, 0])),
    lambda: grpo_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), scale="tok"),
    lambda: grpo_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), std_eps=-1.0),
    lambda: rloo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])),
    lambda: drgrpo_advantages(torch.zeros(3), torch.zeros(4, dtype=torch.long)),
    lambda: bnpo_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])),
    lambda: bnpo_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), alpha=1.0),
    lambda: reinforce_pp_baseline_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])),
    lambda: dynamic_sampling_keep(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0])),
    lambda: dynamic_sampling_keep(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), tol=-0.1),
    lambda: overlong_penalty(torch.tensor([1, 2]), -100, 20),
    lambda: overlong_penalty(torch.tensor([1, 2]), 100, 0),
    lambda: overlong_penalty(torch.tensor([1, 2]), 100, 200),
    lambda: overlong_penalty(torch.tensor([-1, 2]), 100, 20),
    lambda: overlong_penalty(torch.tensor([1, 2]), 100, 20, rewards=torch.zeros(3)),
    lambda: truncation_penalty(torch.zeros(2), torch.tensor([1, 2]), -1),
    lambda: truncation_penalty(torch.zeros(3), torch.tensor([1, 2]), 10),
    lambda: ensemble_uwo(torch.zeros(1, 3)),
    lambda: ensemble_uwo(torch.zeros(2, 3), lam=-1.0),
    lambda: ensemble_wco(torch.zeros(3)),
    lambda: ensemble_mean(torch.tensor([[float("nan")]])),
    lambda: ensemble_rewards(torch.zeros(2, 3), "max"),
])
def test_bad_input_raises(call):
    with pytest.raises(ValueError):
        call()


def test_no_reshape_large_ids_and_num_groups():
    # sparse labels, explicit num_groups, float32
    r = torch.tensor([1.0, 0.0, 0.5, 0.25])
    g = torch.tensor([7, 7, 2, 2])
    a = grpo_advantages(r, g, num_groups=8, check=False)
    torch.testing.assert_close(a, grpo_advantages(r, torch.tensor([1, 1, 0, 0])))


def test_bnpo_beta_params_worked_numbers():
    from torchstep.objectives.advantages import bnpo_beta_params
    al, be = bnpo_beta_params(torch.tensor([1 / 3, 2 / 3, 1 / 2], dtype=D))
    assert abs(al.item() - (1 + 6.25 / 3)) < 1e-9 and abs(be.item() - (1 + 6.25 / 3)) < 1e-9
    # skewed: mu = 0.2 -> alpha floored at 1 only when a/3 < 0; here a, b > 0 so both > 1
    al, be = bnpo_beta_params(torch.tensor([0.1, 0.3], dtype=D))
    k = 0.2 * 0.8 / 0.01 - 1
    assert abs(al.item() - (1 + k * 0.2 / 3)) < 1e-9 and abs(be.item() - (1 + k * 0.8 / 3)) < 1e-9
