"""Schedules: the card's worked numbers (schedules_scaling.md §1–3), the LRScheduler contract."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from torchstep import schedules as S
from torchstep.optim import Muon


def test_wsd_matches_the_cards_worked_examples():
    hagele = [S.wsd(t, 10_000, 1000, 0.2, "1-sqrt") for t in (0, 500, 1000, 5000, 7999, 8000, 9000, 9500, 9999, 10_000)]
    expected = [0.01, 0.505, 1, 1, 1, 1, 1 - math.sqrt(0.5), 1 - math.sqrt(0.75), 1 - math.sqrt(1999 / 2000), 0]
    assert hagele == pytest.approx(expected, abs=1e-12)
    hf = [S.wsd(t, 10_000, 1000, 0.2, "1-sqrt", warmup_start=0.0) for t in (0, 500, 1000, 7999, 8000, 9000, 9999)]
    assert hf == pytest.approx([0, 0.5, 1, 1, 1, 0.292893, 0.000250], abs=1e-6)


@pytest.mark.parametrize("shape", S.DECAY_SHAPES)
def test_wsd_shapes_are_one_in_the_stable_phase_non_increasing_after_and_continuous(shape):
    final = 0.1 if shape == "exp" else 0.0
    s = [S.wsd(t, 200, 20, 0.3, shape, final=final) for t in range(201)]
    assert all(x == 1.0 for x in s[20:140])
    after = s[20:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert s[140] == 1.0 and s[-1] == final                   # continuous into the decay, ends at the floor
    assert max(abs(b - a) for a, b in zip(s[:141], s[1:141])) <= 0.99 / 20 + 1e-12   # warm-up steps only


def test_power_matches_the_ibm_worked_numbers_and_its_checks():
    lr = [0.02 * S.power(t, a=4096, batch_size=None, compat="official")
          for t in (1, 1250, 2500, 5000, 10_000, 50_000, 100_000, 238_419, 500_000)]
    assert lr == pytest.approx([8.0e-6, 0.0100, 0.0200, 0.0200, 0.01566, 0.00689, 0.00484, 0.00311, 0.00213],
                               abs=1e-5)
    # paper form with a per sequence × batch equals the official one, and doubling the batch doubles η (uncapped)
    assert S.power(238_419) == pytest.approx(S.power(238_419, a=4096, batch_size=None, compat="official"), rel=1e-12)
    assert S.power(238_419, batch_size=2048) == pytest.approx(2 * S.power(238_419), rel=1e-12)
    # tokens or steps × c: the same
    assert S.power(1000, tokens_per_step=2.0, warmup_steps=0) == pytest.approx(
        S.power(2000, tokens_per_step=1.0, warmup_steps=0), rel=1e-12)
    with pytest.raises(ValueError, match="batch_size"):
        S.power(10, compat="official")
    decayed = [S.power(t, decay_steps=100, total_steps=10_000) for t in (9900, 9950, 10_000)]
    assert decayed[0] == S.power(9900) and decayed[2] == pytest.approx(1e-3 * S.power(9900))


def test_refined_schedule_card_checks():
    flat = S.refined_schedule([3.0] * 101)
    assert flat == pytest.approx([1 - t / 100 for t in range(101)], abs=1e-12)   # linear decay exactly
    early = [10.0 / (1 + t) if t < 30 else 10.0 / 31 for t in range(200)]
    sched = S.refined_schedule(early, norm="l1")
    assert max(range(200), key=sched.__getitem__) > 0 and sched[-1] == 0.0        # a warm-up emerges
    assert S.refined_schedule([5 * g for g in early], norm="l1") == pytest.approx(sched, rel=1e-12)
    assert len(S.refined_schedule(early, steps=50)) == 50
    with pytest.raises(ValueError, match="norms"):
        S.refined_schedule([1.0, 0.0, 2.0])


def test_grad_norm_recorder_records_the_total_norm():
    w = torch.nn.Parameter(torch.zeros(3))
    rec = S.GradNormRecorder([w], norm="l1")
    for g in ([1.0, -2.0, 0.5], [0.0, 0.0, 4.0]):
        w.grad = torch.tensor(g)
        rec.record()
    assert rec.norms() == [3.5, 4.0]


def _hybrid():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    return model, Muon(model.parameters(), lr=0.02, fallback_lr=3e-4, ns_dtype="float32")


@pytest.mark.parametrize("make", [
    lambda o: S.WSD(o, 50, warmup_steps=5), lambda o: S.Cosine(o, 50, 5, final=0.1), lambda o: S.LinearDecay(o, 50),
    lambda o: S.Constant(o, 5), lambda o: S.Power(o, warmup_steps=5, tokens_per_step=1e6),
    lambda o: S.Refined(o, S.refined_schedule([1.0] * 50))], ids=["wsd", "cosine", "linear", "constant", "power",
                                                                  "refined"])
def test_schedulers_scale_each_groups_lr_and_resume_bit_exactly(make):
    model, opt = _hybrid()
    sched = make(opt)
    ratios = []
    for step in range(20):
        opt.step()
        sched.step()
        ratios.append(opt.param_groups[0]["lr"] / 0.02)
        assert opt.param_groups[1]["lr"] == pytest.approx(3e-4 * ratios[-1], rel=1e-12)   # the ratio survives
    saved = copy.deepcopy(sched.state_dict())
    fresh_model, fresh_opt = _hybrid()
    fresh = make(fresh_opt)
    fresh.load_state_dict(saved)
    for _ in range(10):
        for o, s in ((opt, sched), (fresh_opt, fresh)):
            o.step()
            s.step()
        assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in fresh_opt.param_groups]


def test_schedulers_compose_with_sequential_lr_and_reject_bad_arguments():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [S.Constant(opt), S.LinearDecay(opt, 4)], milestones=[3])
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        seq.step()
    assert lrs == pytest.approx([1, 1, 1, 1, 0.75, 0.5, 0.25, 0])
    for bad, arg in (({"total_steps": 0}, "total_steps"), ({"total_steps": 10, "decay_fraction": 1.5}, "decay_fraction"),
                     ({"total_steps": 10, "decay_shape": "x"}, "decay_shape"),
                     ({"total_steps": 10, "decay_shape": "exp"}, "final"),
                     ({"total_steps": 10, "warmup_steps": 9}, "warmup_steps")):
        with pytest.raises(ValueError, match=arg):
            S.WSD(opt, **bad)
