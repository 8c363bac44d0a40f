"""Random-subspace training and intrinsic dimension (diagnostics.md §5)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchstep.diagnostics.subspace import (Subspace, fwht, intrinsic_dimension, subspace_train_fn,
                                            train_in_subspace)
from torchstep.optim import AdamW

DT = torch.float64
PROJECTIONS = ("dense", "sparse", "fastfood")

# the official notebook's MNIST 784-200-200-10 table (intrinsic_dim/plots/main_plots.ipynb, the first 30 rows
# that its d_int90 cells use): direct accuracy 0.9758, then (d, validation accuracy)
NOTEBOOK_DIRECT = 0.9758
NOTEBOOK_CURVE = {10: 0.1581, 50: 0.4555, 100: 0.6055, 200: 0.7713, 300: 0.8181, 350: 0.8328, 375: 0.8589,
                  400: 0.8538, 425: 0.8586, 450: 0.8593, 475: 0.8687, 500: 0.8691, 525: 0.8816, 550: 0.8851,
                  575: 0.8808, 600: 0.888, 625: 0.8899, 650: 0.8931, 675: 0.8945, 700: 0.8982, 725: 0.8967,
                  750: 0.9022, 775: 0.9003, 800: 0.908, 850: 0.9073, 900: 0.9132, 1000: 0.9182, 1250: 0.9292,
                  1500: 0.9322}


def mlp(sizes=(6, 10, 3), seed=0, bn=False):
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(sizes, sizes[1:]):
        layers += [nn.Linear(a, b)] + ([nn.BatchNorm1d(b)] if bn else []) + [nn.Tanh()]
    return nn.Sequential(*layers[:-2 if bn else -1]).to(DT)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def sylvester(length):
    h = torch.ones(1, 1, dtype=DT)
    while h.shape[0] < length:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


def column_stats(m):
    norms = m.norm(dim=0)
    cos = (m.T @ m) / torch.outer(norms, norms)
    off = cos[~torch.eye(m.shape[1], dtype=torch.bool)]
    return norms, off.pow(2).mean().sqrt().item(), off.abs().max().item()


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_columns_norms_and_orthogonality(projection):
    sub = Subspace(mlp((30, 20, 10)), 64, projection, generator=gen(1))
    P = sub.P
    norms, rms, worst = column_stats(sub.projection_matrix())
    if projection == "fastfood":            # P = 830 < L = 1024: unit only in expectation
        assert sub.signs.numel() == 1024
        assert abs(norms.pow(2).mean().item() - 1) < 0.02 and (norms - 1).abs().max() < 0.06
        assert 0.8 < rms * math.sqrt(P) < 2.2            # ≈ √2/√P: the Gaussian diagonal's spread
    else:                                    # dense and sparse: normalised columns, cos ~ N(0, 1/P)
        torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)
        assert 0.8 < rms * math.sqrt(P) < 1.2
    assert worst * math.sqrt(P) < 6


def test_sparse_density_is_one_over_root_layer_size_per_layer():
    d = 64
    sub = Subspace(mlp((40, 25, 10)), d, "sparse", generator=gen(2))
    dense = sub.projection_matrix()
    start = 0
    for numel in sub.numels:
        block = dense[start:start + numel]
        expected = numel * d / math.sqrt(numel)
        assert abs((block != 0).sum().item() - expected) < 5 * math.sqrt(expected), numel
        start += numel
    # before the global normalisation all nonzeros of a layer had one magnitude √(√D_l / d): the ratio
    # of magnitudes between two layers in a column is therefore (D_1 / D_2)^(1/4)
    first, second = dense[:sub.numels[0]], dense[sub.numels[0]:sub.numels[0] + sub.numels[1]]
    col = ((first != 0).any(0) & (second != 0).any(0)).nonzero()[0, 0]
    ratio = first[:, col].abs().max() / second[:, col].abs().max()
    assert ratio.item() == pytest.approx((sub.numels[0] / sub.numels[1]) ** 0.25, rel=1e-12)


def test_fastfood_is_exactly_unit_when_P_is_a_power_of_two_and_equals_its_explicit_matrix():
    sub = Subspace(mlp((7, 4)), 32, "fastfood", generator=gen(3))         # P = 28 + 4 = 32 = L
    assert sub.P == 32 and sub.signs.numel() == 32
    norms, _, _ = column_stats(sub.projection_matrix())
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-12)

    small = Subspace(mlp((2, 2)), 4, "fastfood", generator=gen(4))        # P = 6, L = 8, d = 4
    length = small.signs.numel()
    assert length == 8
    H = sylvester(length)
    Pi = torch.zeros(length, length, dtype=DT)
    Pi[torch.arange(length), small.permutation] = 1                       # (Πv)_i = v_π(i)
    explicit = H @ torch.diag(small.gaussian) @ Pi @ H @ torch.diag(small.signs)
    explicit = explicit[:small.P, :small.d] / (small.gaussian.norm() * math.sqrt(small.P))
    torch.testing.assert_close(small.projection_matrix(), explicit, rtol=0, atol=1e-10)
    z = torch.randn(small.d, generator=gen(5), dtype=DT)
    torch.testing.assert_close(small.project(z), explicit @ z, rtol=0, atol=1e-10)
    x = torch.randn(3, 16, generator=gen(6), dtype=DT)
    torch.testing.assert_close(fwht(x), x @ sylvester(16).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(fwht(fwht(x)), 16 * x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_z_zero_reproduces_the_model_bitwise_and_projection_is_linear(projection):
    model = mlp((6, 10, 3), bn=True)
    model.train()
    model(torch.randn(16, 6, generator=gen(7), dtype=DT))                 # non-trivial running statistics
    model.eval()
    x = torch.randn(9, 6, generator=gen(8), dtype=DT)
    sub = Subspace(model, 7, projection, generator=gen(9)).eval()
    assert [n for n, _ in sub.named_parameters()] == ["z"] and torch.equal(sub.z, torch.zeros(7, dtype=DT))
    assert torch.equal(sub(x), model(x))
    assert torch.equal(sub.to_module()(x), model(x))
    z1, z2 = torch.randn(2, 7, generator=gen(10), dtype=DT)
    torch.testing.assert_close(sub.project(2.5 * z1 - 0.5 * z2), 2.5 * sub.project(z1) - 0.5 * sub.project(z2),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(sub.project(torch.stack((z1, z2))), torch.stack((sub.project(z1), sub.project(z2))),
                               rtol=0, atol=1e-12)
    assert all(p.requires_grad for p in model.parameters())                # the original is untouched


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_gradient_wrt_z_is_M_transpose_gradient_wrt_theta(projection):
    model = mlp((5, 8, 3))
    x, y = torch.randn(12, 5, generator=gen(11), dtype=DT), torch.randint(0, 3, (12,), generator=gen(12))
    sub = Subspace(model, 6, projection, generator=gen(13))
    with torch.no_grad():
        sub.z.copy_(torch.randn(6, generator=gen(14), dtype=DT))
    F.cross_entropy(sub(x), y).backward()
    at_theta = sub.to_module()
    F.cross_entropy(at_theta(x), y).backward()
    grad_theta = torch.cat([at_theta.get_parameter(n).grad.flatten() for n in sub.names])
    torch.testing.assert_close(sub.z.grad, sub.projection_matrix().T @ grad_theta, rtol=1e-10, atol=1e-12)


def test_identity_projection_reproduces_direct_training_step_for_step():
    model = mlp((4, 6, 2))
    x, y = torch.randn(10, 4, generator=gen(15), dtype=DT), torch.randint(0, 2, (10,), generator=gen(16))
    direct = mlp((4, 6, 2))
    P = sum(p.numel() for p in model.parameters())
    sub = Subspace(model, P, torch.eye(P, dtype=DT))
    opt_sub = torch.optim.SGD(sub.parameters(), lr=0.3, momentum=0.9)
    opt_direct = torch.optim.SGD(direct.parameters(), lr=0.3, momentum=0.9)
    for _ in range(5):
        for net, opt in ((sub, opt_sub), (direct, opt_direct)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        flat = torch.cat([p.detach().flatten() for p in direct.parameters()])
        theta = torch.cat([v.flatten() for v in sub.parameters_at().values()])
        torch.testing.assert_close(theta, flat, rtol=0, atol=1e-12)


@pytest.mark.parametrize("projection", PROJECTIONS)
def test_training_in_the_subspace_reduces_the_loss(projection):
    g = gen(17)
    x = torch.randn(64, 6, generator=g, dtype=DT)
    y = (x[:, 0] + x[:, 1] > 0).long()
    sub = Subspace(mlp((6, 16, 2)), 24, projection, generator=gen(18))
    loss0 = F.cross_entropy(sub(x), y).item()
    opt = AdamW(sub.parameters(), lr=0.05, weight_decay=0.0)            # a torchstep optimizer on z
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(sub(x), y).backward()
        opt.step()
    assert F.cross_entropy(sub(x), y).item() < 0.5 * loss0


def test_threshold_convention_on_the_notebook_curve():
    calls = []

    def train_fn(d):
        calls.append(d)
        return NOTEBOOK_DIRECT if d is None else NOTEBOOK_CURVE[d]

    dims = list(NOTEBOOK_CURVE)
    absolute = intrinsic_dimension(train_fn, dims, 0.9, relative=False)
    assert (absolute.d_int, absolute.performance, absolute.target) == (750, 0.9022, 0.9)
    assert calls == dims[:dims.index(750) + 1]                          # stops at the first d that passes
    relative = intrinsic_dimension(train_fn, dims, 0.9, relative=True, baseline=NOTEBOOK_DIRECT)
    assert (relative.d_int, relative.performance) == (525, 0.8816)
    assert relative.target == pytest.approx(0.87822)
    calls.clear()
    measured = intrinsic_dimension(train_fn, dims, exhaustive=True)     # relative, baseline = train_fn(None)
    assert measured.d_int == 525 and measured.baseline == NOTEBOOK_DIRECT
    assert calls[0] is None and list(measured.curve) == dims
    never = intrinsic_dimension(train_fn, dims[:10], 0.9, relative=False)
    assert never.d_int is None and not never.reached and never.performance is None
    seeds = intrinsic_dimension(lambda d: [0.8, 1.0] if d == 2 else [0.1, 0.2], [1, 2, 3], 0.9, relative=False)
    assert seeds.d_int == 2 and seeds.curve == {1: pytest.approx(0.15), 2: pytest.approx(0.9)}


def test_helper_runs_the_sweep_on_a_small_task():
    g = gen(19)
    x = torch.randn(96, 4, generator=g, dtype=DT)
    y = (x[:, 0] - x[:, 2] > 0).long()
    train, val = (x[:64], y[:64]), (x[64:], y[64:])
    train_fn = subspace_train_fn(lambda s: mlp((4, 8, 2), seed=s), F.cross_entropy, train, val, seeds=(0, 1),
                                 projection="fastfood", steps=30, lr=0.1)
    result = intrinsic_dimension(train_fn, [1, 4, 16], 0.9, exhaustive=True)
    assert result.baseline > 0.85 and result.reached
    assert result.curve[16] >= result.target and result.curve[16] > result.curve[1]
    assert sum(train_fn(4)) / 2 == result.curve[4]                       # seeded: reproducible
    assert 0 <= train_in_subspace(mlp((4, 8, 2)), 3, F.cross_entropy, train, val, generator=gen(0), steps=5,
                                  batch_size=16) <= 1


@pytest.mark.parametrize("call, match", [
    (lambda m: Subspace(m, 0), "d"),
    (lambda m: Subspace(m, 10_000), "d"),
    (lambda m: Subspace(m, 2.5), "d"),
    (lambda m: Subspace(m, 3, "gaussian"), "projection"),
    (lambda m: Subspace(m, 3, torch.eye(3, dtype=DT)), "projection"),
    (lambda m: Subspace(m, 3, generator=0), "generator"),
    (lambda m: Subspace(nn.ReLU(), 1), "model"),
    (lambda m: Subspace(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).double()), 1), "model"),
    (lambda m: Subspace(m, 3).project(torch.zeros(4, dtype=DT)), "z"),
    (lambda m: fwht(torch.zeros(6)), "x"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, []), "dims"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [2, 1]), "dims"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [0, 1]), "dims"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [1], threshold=0), "threshold"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [1], relative=False, baseline=0.9), "baseline"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [1], baseline=-1.0), "baseline"),
    (lambda m: intrinsic_dimension(lambda d: float("nan"), [1], baseline=1.0), "train_fn"),
    (lambda m: intrinsic_dimension(lambda d: [], [1], baseline=1.0), "train_fn"),
    (lambda m: intrinsic_dimension(lambda d: 1.0, [1], relative=1), "relative"),
    (lambda m: subspace_train_fn(mlp, F.cross_entropy, None, None, seeds=()), "seeds"),
    (lambda m: subspace_train_fn(mlp, F.cross_entropy, None, None, generator=gen()), "generator"),
    (lambda m: train_in_subspace(m, 2, F.cross_entropy, None, None, steps=0), "steps"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(mlp())
