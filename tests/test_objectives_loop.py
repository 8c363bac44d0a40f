"""Loop-level objects: DAPO buffer, Knapsack / GVM-RAFT / CurES allocators, VADE Thompson sampler (card §6 #9)."""
import io
import itertools

import pytest
import torch

from torchstep.objectives.loop import (CurESPromptSampler, DynamicSamplingBuffer, VADEThompsonSampler,
                                       cures_allocate, cures_prompt_probs, cures_sigma, gvm_allocate,
                                       knapsack_allocate, knapsack_value, proportional_allocate, sample_beta)


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ---------------------------------------------------------------- DynamicSamplingBuffer

def _round(rewards_per_group, offset):
    r = torch.tensor([x for g in rewards_per_group for x in g], dtype=torch.float32)
    gid = torch.repeat_interleave(torch.arange(len(rewards_per_group)),
                                  torch.tensor([len(g) for g in rewards_per_group]))
    idx = torch.arange(offset, offset + r.numel())
    return r, gid, idx


def test_buffer_exactly_full_batches_and_surplus_across_calls_and_state_dict():
    buf = DynamicSamplingBuffer(target_groups=3)
    r, g, i = _round([[1, 0, 1], [1, 1, 1], [0, 0, 0], [0, 1, 0]], 0)     # keeps groups 0 and 3
    assert buf.add(r, g, i) == 2 and not buf.ready and buf.pop() is None
    r, g, i = _round([[1, 0], [0, 1, 1, 0], [1, 1], [0.5, 0.5, 0.2]], 100)  # keeps 0, 1, 3
    assert buf.add(r, g, i) == 3 and buf.ready
    b = buf.pop()
    assert b["group_sizes"].tolist() == [3, 3, 2]
    assert b["indices"].tolist() == [0, 1, 2, 9, 10, 11, 100, 101]
    assert b["group_ids"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    assert b["rewards"].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert len(buf) == 2 and buf.pop() is None                             # surplus kept
    assert (buf.groups_seen, buf.groups_dropped, buf.batches_emitted) == (8, 3, 1)
    buf2 = DynamicSamplingBuffer(target_groups=99)
    buf2.load_state_dict(_roundtrip(buf.state_dict()))
    assert buf2.target_groups == 3 and len(buf2) == 2
    r, g, i = _round([[0, 1]], 200)
    buf2.add(r, g, i)
    b2 = buf2.pop()
    assert b2["indices"].tolist() == [102, 103, 104, 105, 108, 109, 110, 200, 201]
    assert b2["group_sizes"].tolist() == [4, 3, 2] and len(buf2) == 0


def test_buffer_random_rounds_always_exact():
    gen = torch.Generator().manual_seed(0)
    buf = DynamicSamplingBuffer(target_groups=5)
    total_kept, emitted, off = 0, 0, 0
    for _ in range(20):
        r = torch.randint(0, 2, (24,), generator=gen).float()
        gid = torch.arange(6).repeat_interleave(4)
        total_kept += buf.add(r, gid, torch.arange(off, off + 24))
        off += 24
        while (b := buf.pop()) is not None:
            assert b["group_sizes"].numel() == 5 and b["indices"].numel() == 20
            emitted += 1
    assert emitted == total_kept // 5 and len(buf) == total_kept % 5


def test_buffer_bad_input():
    with pytest.raises(ValueError):
        DynamicSamplingBuffer(0)
    buf = DynamicSamplingBuffer(2)
    with pytest.raises(ValueError):
        buf.add(torch.ones(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError):
        buf.add(torch.ones(4), torch.zeros(4, dtype=torch.long), torch.arange(3))


# ---------------------------------------------------------------- Knapsack

def _brute(p, budget, lo, hi):
    best = -1.0
    for ns in itertools.product(range(lo, hi + 1), repeat=len(p)):
        if sum(ns) <= budget:
            best = max(best, float(knapsack_value(torch.tensor(ns), p).sum()))
    return best


def test_knapsack_dp_equals_brute_force():
    gen = torch.Generator().manual_seed(1)
    for _ in range(25):
        P = int(torch.randint(1, 5, (1,), generator=gen))
        lo = int(torch.randint(0, 3, (1,), generator=gen))
        hi = lo + int(torch.randint(0, 5, (1,), generator=gen))
        budget = int(torch.randint(P * lo, P * hi + 1, (1,), generator=gen))
        p = torch.rand(P, generator=gen, dtype=torch.float64)
        p[torch.rand(P, generator=gen) < 0.2] = 0.0
        n = knapsack_allocate(p, budget, n_min=lo, n_max=hi)
        assert int(n.sum()) == budget and bool((n >= lo).all()) and bool((n <= hi).all())
        assert float(knapsack_value(n, p).sum()) == pytest.approx(_brute(p, budget, lo, hi), abs=1e-12)


def test_knapsack_card_properties():
    p = torch.tensor([0.0, 1.0, 0.05, 0.95, 0.5])
    n = knapsack_allocate(p, 40, n_min=2, n_max=16)
    assert int(n.sum()) == 40
    assert n[0] == 2 and n[1] == 2                # p in {0, 1} get N_low
    assert n[2] > n[3]                            # p = 0.05 gets more than p = 0.95
    assert int(knapsack_allocate(torch.tensor([0.3, 0.7]), 7).sum()) == 7


@pytest.mark.parametrize("kw", [dict(budget=-1), dict(budget=3), dict(budget=100, n_max=4)])
def test_allocator_budget_errors(kw):
    with pytest.raises(ValueError):
        knapsack_allocate(torch.tensor([0.2, 0.5, 0.8]), n_min=2, **kw)
    with pytest.raises(ValueError):
        gvm_allocate(torch.ones(3), torch.full((3,), 0.5), n_min=2, **kw)
    with pytest.raises(ValueError):
        proportional_allocate(torch.ones(3), n_min=2, **kw)


def test_allocator_shape_and_range_errors():
    with pytest.raises(ValueError):
        gvm_allocate(torch.ones(3), torch.full((2,), 0.5), 6)
    with pytest.raises(ValueError):
        knapsack_allocate(torch.tensor([1.5]), 4)
    with pytest.raises(ValueError):
        cures_allocate(torch.full((2,), 0.5), torch.ones(2), torch.ones(3), torch.ones(2), torch.ones(2), 4)


# ---------------------------------------------------------------- GVM-RAFT / CurES / proportional

def test_gvm_card_properties_and_formula():
    n = gvm_allocate(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.5, 0.1, 0.9]), 30)
    assert int(n.sum()) == 30 and n[0] == 0 and n[1] > n[2]
    G, p = torch.tensor([2.0, 1.0]), torch.tensor([0.5, 0.2], dtype=torch.float64)
    w = G.double() / torch.sqrt(p + 1e-3 / p)
    n = gvm_allocate(G, p, 1000)
    assert abs(int(n[0]) - 1000 * float(w[0] / w.sum())) <= 1


def test_proportional_budget_bounds_random():
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        P = int(torch.randint(1, 8, (1,), generator=gen))
        lo = int(torch.randint(0, 3, (1,), generator=gen))
        hi = lo + int(torch.randint(0, 6, (1,), generator=gen))
        budget = int(torch.randint(P * lo, P * hi + 1, (1,), generator=gen))
        w = torch.rand(P, generator=gen) * (torch.rand(P, generator=gen) > 0.3)
        n = proportional_allocate(w, budget, lo, hi)
        assert int(n.sum()) == budget and bool((n >= lo).all()) and bool((n <= hi).all())
        nc = cures_allocate(torch.rand(P, generator=gen), torch.ones(P) * 2, torch.ones(P), torch.ones(P),
                            torch.ones(P) * 0.5, budget, lo, hi)
        assert int(nc.sum()) == budget and bool((nc >= lo).all()) and bool((nc <= hi).all())


def test_cures_sigma_formula_and_probs():
    p, A, B, a, b = 0.3, 4.0, 2.0, 1.5, 1.0
    q = 1 - p
    want = (p * q ** 2 * A + p ** 2 * q * B - p ** 2 * q ** 2 * (a - b) ** 2) ** 0.5
    s = cures_sigma(torch.tensor([p, 0.0], dtype=torch.float64), torch.tensor([A, A]), torch.tensor([B, B]), torch.tensor([a, a]),
                    torch.tensor([b, b]))
    assert float(s[0]) == pytest.approx(want, rel=1e-12) and float(s[1]) == 0.0
    sf = torch.tensor([3.0, 0.0]), torch.tensor([1.0, 5.0])
    ph = (sf[0] + 1) / (sf[0] + sf[1] + 2)
    logits = torch.sqrt(ph * (1 - ph)) / ((sf[0] + 1) / 0.01)
    assert torch.allclose(cures_prompt_probs(*sf).float(), torch.softmax(logits, 0), atol=1e-7)
    smp = CurESPromptSampler(2)
    smp.update(torch.tensor([0, 1]), *sf)
    assert torch.allclose(smp.probs(), cures_prompt_probs(*sf))
    smp2 = CurESPromptSampler(5)
    smp2.load_state_dict(_roundtrip(smp.state_dict()))
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(smp.sample(2, g1), smp2.sample(2, g2))


# ---------------------------------------------------------------- VADE

def test_vade_beta_bernoulli_updates_and_state_dict():
    s = VADEThompsonSampler(3, prior_alpha=1.0, prior_beta=2.0)
    s.update(torch.tensor([0, 2, 0]), torch.tensor([3, 1, 2]), torch.tensor([1, 0, 4]))
    assert s.alpha.tolist() == [6.0, 1.0, 2.0] and s.beta.tolist() == [7.0, 2.0, 2.0]
    assert torch.allclose(s.posterior_mean(), torch.tensor([6 / 13, 1 / 3, 0.5], dtype=torch.float64))
    s2 = VADEThompsonSampler(1)
    s2.load_state_dict(_roundtrip(s.state_dict()))
    assert torch.equal(s2.alpha, s.alpha) and torch.equal(s2.beta, s.beta)
    with pytest.raises(ValueError):
        s.update(torch.tensor([3]), torch.tensor([1]), torch.tensor([0]))
    with pytest.raises(ValueError):
        s.update(torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([0, 1]))


def test_vade_deterministic_and_beta_moments():
    s = VADEThompsonSampler(6)
    s.update(torch.arange(6), torch.tensor([0, 1, 5, 9, 2, 0]), torch.tensor([9, 8, 5, 1, 2, 0]))
    a = s.select(3, torch.Generator().manual_seed(7))
    b = s.select(3, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.numel() == 3 and len(set(a.tolist())) == 3
    alpha = torch.tensor([0.5, 3.0], dtype=torch.float64)
    beta = torch.tensor([2.0, 7.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = sample_beta(alpha.expand(8000, 2), beta.expand(8000, 2), g)
    assert bool(((draws >= 0) & (draws <= 1)).all())
    mean = alpha / (alpha + beta)
    var = alpha * beta / ((alpha + beta) ** 2 * (alpha + beta + 1))
    assert torch.allclose(draws.mean(0), mean, atol=0.01)
    assert torch.allclose(draws.var(0), var, atol=0.005)
    with pytest.raises(ValueError):
        s.select(7, g)
