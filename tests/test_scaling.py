"""Scaling rules: the card's worked numbers (schedules_scaling.md §5, §7, §8)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from torchstep import scaling


@pytest.mark.parametrize("n,d,lr,batch,lr_repo", [(1e8, 1e10, 4.158e-3, 2.975e5, 4.23e-3),
                                                   (1e9, 1e11, 1.6325e-3, 1.1077e6, 1.6624e-3),
                                                   (7e9, 1.4e12, 9.166e-4, 4.999e6, 9.347e-4)])
def test_step_law_matches_the_card(n, d, lr, batch, lr_repo):
    law = scaling.step_law(n, d)
    assert law.lr == pytest.approx(lr, rel=5e-4) and law.batch_size == pytest.approx(batch, rel=5e-4)
    assert scaling.step_law(n, d, "repo_mean").lr == pytest.approx(lr_repo, rel=2e-3)
    lr2, batch2 = scaling.step_law(n + 5e7, d, embedding_params=5e7)          # a tuple; embeddings subtracted
    assert (lr2, batch2) == pytest.approx((law.lr, law.batch_size), rel=1e-12)


def test_step_law_batch_in_sequences_and_errors():
    assert scaling.step_law(1e9, 1e11).batch_sequences(2048) == pytest.approx(540.9, abs=0.05)
    with pytest.raises(ValueError, match="n_params"):
        scaling.step_law(1e6, 1e9, embedding_params=2e6)
    with pytest.raises(ValueError, match="constants"):
        scaling.step_law(1e9, 1e11, "x")


def test_batch_rules_worked_numbers():
    assert scaling.granziol_sgd_linear(0.1, 4096, 256) == pytest.approx(1.6)
    assert scaling.granziol_adam_sqrt(1e-3, 4096, 256) == pytest.approx(4e-3)
    assert scaling.hoffer_sqrt(0.1, 4096, 256) == pytest.approx(0.4)
    assert scaling.regime_adaptation([30, 60, 90], 1024, 256) == [120, 240, 360]
    assert scaling.regime_adaptation([10], 4096, 256) == [160]
    with pytest.raises(ValueError, match="batch_size"):
        scaling.granziol_adam_sqrt(1e-3, 0, 256)


def test_ghost_batch_norm_equals_batch_norm_per_chunk():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 3)
    whole = scaling.GhostBatchNorm(5, 12)
    bn = nn.BatchNorm1d(5)
    torch.testing.assert_close(whole(x), bn(x))
    torch.testing.assert_close(whole.bn.running_mean, bn.running_mean)
    torch.testing.assert_close(whole.bn.running_var, bn.running_var)
    ghost = scaling.GhostBatchNorm(5, 4)
    ref = nn.BatchNorm1d(5)
    expected = torch.cat([ref(c) for c in x.split(4)])                  # BN on each ghost batch in turn
    torch.testing.assert_close(ghost(x), expected)
    torch.testing.assert_close(ghost.bn.running_mean, ref.running_mean)
    torch.testing.assert_close(ghost.bn.running_var, ref.running_var)
    avg = scaling.GhostBatchNorm(5, 4, running_stats="average")
    torch.testing.assert_close(avg(x), expected)
    chunks = x.split(4)
    mean = torch.stack([c.mean((0, 2)) for c in chunks]).mean(0)
    var = torch.stack([c.var((0, 2)) for c in chunks]).mean(0)
    torch.testing.assert_close(avg.bn.running_mean, 0.1 * mean)
    torch.testing.assert_close(avg.bn.running_var, 0.9 + 0.1 * var)
    ghost.eval()
    torch.testing.assert_close(ghost(x), ref.eval()(x))


def test_weight_decay_width_rule_table_and_diagnostic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.LayerNorm(32), nn.Linear(32, 32))
    groups = {g["name"]: g for g in scaling.width_scaled_groups(model, lr=1e-2, weight_decay=0.1, width=32,
                                                               base_width=8)}
    m = groups["matrix"]
    assert m["lr"] == pytest.approx(1e-2 / 4) and m["weight_decay"] == pytest.approx(0.2)   # κ = ½: η×¼, λ×2
    assert m["lr"] * m["weight_decay"] == pytest.approx(0.5 * 1e-2 * 0.1)                  # ηλ per step ×½
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["no_decay"]["lr"] == 1e-2
    k1 = {g["name"]: g for g in scaling.width_scaled_groups(model, 1e-2, 0.1, 32, 8, wd_width_exponent=1.0)}
    assert k1["matrix"]["lr"] * k1["matrix"]["weight_decay"] == pytest.approx(1e-2 * 0.1)  # κ = 1: ηλ ×1
    sv = scaling.top_singular_values(model)
    assert set(sv) == {"0.weight", "2.weight"}
    assert sv["2.weight"] == pytest.approx(float(torch.linalg.svdvals(model[2].weight)[0]), rel=1e-6)


def test_steplaw_cli(capsys):
    from torchstep.cli import main
    main(["steplaw", "--params", "1e9", "--tokens", "1e11"])
    out = capsys.readouterr().out
    assert "0.001632" in out and "1.108e+06 tokens = 540.9 sequences of 2048" in out


def test_width_scaled_groups_with_mup_shapes_make_the_input_layer_vector_like():
    from torchstep.scaling import infinite_shapes
    from torchstep.diagnostics.wd_sweep import _NormedMLP
    model = _NormedMLP(8, 128, 4)
    shapes = infinite_shapes(model, _NormedMLP(8, 32, 4))
    groups = {g["name"]: g for g in scaling.width_scaled_groups(model, 1e-2, 0.1, 128, 32, 0.5, shapes=shapes)}
    assert groups["matrix/hidden"]["param_names"] == ["h1.weight", "h2.weight"]
    assert groups["matrix/hidden"]["lr"] == pytest.approx(2.5e-3) and groups["matrix/hidden"]["weight_decay"] == 0.2
    assert groups["matrix/vector"]["param_names"] == ["inp.weight"] and groups["matrix/vector"]["weight_decay"] == 0
    assert all(g["lr"] == 1e-2 for n, g in groups.items() if n != "matrix/hidden")


def test_wd_sweep_runs_each_exponent_with_its_decay_and_reports_spreads():
    from torchstep.diagnostics import wd_sweep
    res = wd_sweep.sweep((0.0, 1.0), (32, 64), steps=30, base_width=32, batch=16)
    assert [(r.exponent, r.width) for r in res] == [(0.0, 32), (0.0, 64), (1.0, 32), (1.0, 64)]
    assert set(res[0].sigma_max) == {"h1.weight", "h2.weight"}
    assert res[0].sigma_max == res[2].sigma_max               # base width: κ does not matter
    assert res[3].sigma_max["h1.weight"] < res[1].sigma_max["h1.weight"]   # more decay at κ = 1
    grow = res[1].sigma_max["h1.weight"] / res[0].sigma_max["h1.weight"]
    assert wd_sweep.spread(res, 0.0, "h1.weight") == pytest.approx(max(grow, 1 / grow))
