"""Schedule-Free (schedules_scaling.md §4): parity with pip schedulefree, the averaging identity, train/eval."""
from __future__ import annotations

import copy

import pytest
import schedulefree       # official package: the parity extra installs it (a missing one fails)
import torch
from torch import nn

from torchstep.optim import ScheduleFreeAdamW, ScheduleFreeSGD


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _train(model, opt, steps):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=g), torch.randn(32, 3, generator=g)
    for i in range(steps):
        opt.zero_grad()
        ((model(x + 0.01 * i) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("ours,theirs,kw", [
    (ScheduleFreeAdamW, schedulefree.AdamWScheduleFree, dict(lr=1e-2, weight_decay=0.1, warmup_steps=5, r=0.5)),
    (ScheduleFreeSGD, schedulefree.SGDScheduleFree, dict(lr=0.1, momentum=0.9, weight_decay=0.01, warmup_steps=5))])
def test_parity_with_the_schedulefree_package_in_train_and_eval(ours, theirs, kw):
    a, b = _model(), _model()
    ref = theirs(a.parameters(), foreach=False, **kw)
    opt = ours(b.parameters(), **kw)
    ref.train()
    _train(a, ref, 30)
    _train(b, opt, 30)
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-6   # y
    ref.eval()
    opt.eval()
    assert max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())) < 1e-6   # x


def test_x_is_the_mean_of_z_1_to_T_with_constant_lr_and_r_zero():
    w = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = ScheduleFreeSGD([w], lr=0.1, momentum=0.9)
    zs = []
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        w.grad = torch.randn(5, generator=g, dtype=torch.float64)
        opt.step()
        zs.append(opt.state[w]["z"].clone())
    opt.eval()
    torch.testing.assert_close(w.detach(), torch.stack(zs).mean(0), rtol=0, atol=1e-12)           # z_0 excluded
    with_z0 = torch.stack([torch.zeros(5, dtype=torch.float64)] + zs).mean(0)
    assert (w.detach() - with_z0).abs().max() > 1e-3


def test_train_eval_round_trip_is_bit_exact_and_step_refuses_eval_mode():
    model = _model()
    opt = ScheduleFreeAdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 5)
    y = [p.detach().clone() for p in model.parameters()]
    opt.eval()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), y))
    saved = copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match="train"):
        opt.step()
    opt.train()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), y))
    assert "y" not in opt.state[next(model.parameters())]
    assert saved["param_groups"][0]["train_mode"] is False
