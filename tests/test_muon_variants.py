"""MuonPP (μP spectral control) and Lanton (noise-adaptive layerwise lrs): equations, bounds, reductions."""
import math

import pytest
import torch

from torchstep.diagnostics.width_sweep import sweep
from torchstep.ops.newton_schulz import PRESETS, newton_schulz, singular_value_bound
from torchstep.optim import Lanton, Muon, MuonPP
from torchstep.optim.lanton import dual_norm, layer_factors

QUINTIC_BOUND = singular_value_bound(5, "quintic")


def _with_singular_values(s, m, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.as_tensor(s, dtype=torch.float64)) @ V.T


def _assert_same_trajectory(opt_a, opt_b, a, b, g, steps, atol):
    """Feed both optimizers the same random gradients and compare the parameters."""
    for _ in range(steps):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=g)
            y.grad = x.grad.clone()
        opt_a.step(), opt_b.step()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize("preset,expected", [("quintic", 1.2024), ("polar_express5", 1.1411), ("convergent", 1.0018)])
def test_singular_value_bound_is_attained_and_never_exceeded(preset, expected):
    bound = singular_value_bound(5, preset)
    assert bound == pytest.approx(expected, abs=1e-4)
    # the maximiser a of the composed polynomial, placed as the top σ of a unit-Frobenius matrix
    # (so the pre-normalisation leaves it there): the NS output attains the bound
    p = PRESETS[preset]
    x = grid = torch.linspace(0, 1 / p.scale, 100_001, dtype=torch.float64)
    for i in range(5):
        a, b, c = p.coefficients[min(i, len(p.coefficients) - 1)]
        x = a * x + b * x ** 3 + c * x ** 5
    top = float(grid[x.argmax()]) * p.scale
    G = _with_singular_values([top, math.sqrt(1 - top ** 2)], 40, 24)
    out = torch.linalg.svdvals(newton_schulz(G, 5, preset, compute_dtype=None))
    assert float(out.max()) == pytest.approx(bound, rel=1e-4)
    for seed in range(5):
        G = torch.randn(48, 80, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float(torch.linalg.svdvals(newton_schulz(G, 5, preset, compute_dtype=None)).max()) <= bound + 1e-9
        # bf16 iteration: rounding adds at most 1 %
        bf16 = newton_schulz(G.float(), 5, preset).float()
        assert float(torch.linalg.svdvals(bf16).max()) <= bound * 1.01


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (16, 8, 3, 3)])
def test_muonpp_update_spectral_norm_is_certified_by_lr_sqrt_dout_over_din(shape):
    g = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=g).requires_grad_()
    lr, wd = 0.05, 0.2
    opt = MuonPP([p], lr=lr, weight_decay=wd)
    m, n = shape[0], math.prod(shape[1:])
    s = math.sqrt(m / n)
    for _ in range(5):
        before = p.detach().clone()
        p.grad = torch.randn(shape, generator=g)
        opt.step()
        delta = (p.detach() - before).reshape(m, n)
        spectral = float(torch.linalg.matrix_norm(delta, ord=2))
        decay = lr * wd * float(torch.linalg.matrix_norm(before.reshape(m, n), ord=2))
        assert spectral <= (lr * s) * 1.01 + decay       # certified (bf16 NS: ≤ 1 % over ν)
        assert spectral >= 0.5 * lr * s - decay          # and of the same order (NS σ ≥ ~0.68/ν)


def test_muonpp_weights_never_exceed_the_decay_bound_and_reach_it_under_a_constant_gradient():
    torch.manual_seed(0)
    m, n = 48, 24
    p = (0.01 * torch.randn(m, n)).requires_grad_()
    lr, wd = 0.05, 0.5
    opt = MuonPP([p], lr=lr, weight_decay=wd, ns_dtype="float64", nesterov=False)
    G = torch.randn(m, n)
    bound = MuonPP.weight_bound(float(torch.linalg.matrix_norm(p.detach(), ord=2)), (m, n), wd)
    assert bound == pytest.approx(math.sqrt(m / n) / wd)
    for t in range(1500):
        p.grad = G          # worst case: every update in the same direction
        opt.step()
        if t % 100 == 0:
            assert float(torch.linalg.matrix_norm(p.detach(), ord=2)) <= bound * (1 + 1e-6)
    # fixed point W* = -(s/λ)·NS(G)/ν: its spectral norm is (s/λ)·σ_max(NS(G))/ν
    O = newton_schulz(G.double(), 5, "quintic", compute_dtype=None)
    limit = math.sqrt(m / n) / wd * float(torch.linalg.svdvals(O).max()) / QUINTIC_BOUND
    assert float(torch.linalg.matrix_norm(p.detach(), ord=2)) == pytest.approx(limit, rel=1e-3)


def test_muonpp_is_muon_with_the_spectral_scale_divided_by_nu():
    shapes = [(32, 16), (16, 48)]
    g = torch.Generator().manual_seed(3)
    a = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    b = [x.detach().clone().requires_grad_() for x in a]
    lr, wd = 0.02, 0.1
    opt_a = MuonPP(a, lr=lr, weight_decay=wd)
    # Muon decays with its own lr, so lr/ν with ν·wd gives the same decay factor
    opt_b = Muon(b, lr=lr / QUINTIC_BOUND, weight_decay=wd * QUINTIC_BOUND, adjust_lr="spectral_norm")
    _assert_same_trajectory(opt_a, opt_b, a, b, g, steps=10, atol=1e-6)


def test_width_sweep_muonpp_keeps_the_spectral_ratios_width_independent():
    make = lambda ps: MuonPP(ps, lr=0.02, weight_decay=0.1, ns_dtype="float32")  # noqa: E731
    rows = sweep(make, widths=(32, 128), steps=25, batch=64)
    updates = [r.max_update_ratio for r in rows]
    weights = [r.max_weight_ratio for r in rows]
    for r in rows:   # certified: ‖ΔW‖₂ ≤ η·s + ηλ‖W‖₂, ‖W‖₂ ≤ max(‖W₀‖₂, s/λ)
        assert r.max_update_ratio <= 0.02 * 1.01 + 0.02 * 0.1 * r.max_weight_ratio
        assert r.max_weight_ratio <= 10.0
    assert max(updates) / min(updates) < 1.1 and max(weights) / min(weights) < 1.2
    assert all(0.3 < r.feature_change < 3 for r in rows)
    # Muon's "original" scale ignores the output layer's √(d_out/d_in) < 1: its ratio grows ~√width
    muon = sweep(lambda ps: Muon(ps, lr=0.02, ns_dtype="float32"), widths=(32, 128), steps=25, batch=64)
    assert muon[1].max_update_ratio / muon[0].max_update_ratio > 1.7


# ---------------------------------------------------------------------------------------------- Lanton
def test_lanton_with_one_tensor_per_group_is_muon_without_nesterov_at_the_spectral_scale():
    g = torch.Generator().manual_seed(4)
    a = [torch.randn(s, generator=g).requires_grad_() for s in [(24, 12), (12, 36)]]
    b = [x.detach().clone().requires_grad_() for x in a]
    lan = Lanton([{"params": [a[0]]}, {"params": [a[1]]}], lr=0.03)
    muon = Muon(b, lr=0.03 / QUINTIC_BOUND, nesterov=False, adjust_lr="spectral_norm")
    _assert_same_trajectory(lan, muon, a, b, g, steps=8, atol=1e-7)


@pytest.mark.parametrize("estimator", ["previous_gradient", "innovation"])
def test_lanton_noise_state_is_the_ema_of_the_squared_dual_norm_of_the_noise_sample(estimator):
    g = torch.Generator().manual_seed(5)
    p = torch.randn(6, 10, generator=g, dtype=torch.float64).requires_grad_()
    q = torch.randn(6, 10, generator=g, dtype=torch.float64).requires_grad_()
    opt = Lanton([p, q], lr=0.0, momentum=0.9, beta2=0.8, noise_estimator=estimator)
    g1, g2 = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(6, 10, generator=g, dtype=torch.float64)
    p.grad, q.grad = g1, g1.clone()
    opt.step()
    assert float(opt.state[p]["noise_sq"]) == 0.0           # no estimate at t = 1
    p.grad, q.grad = g2, g2.clone()
    opt.step()
    if estimator == "innovation":
        sample = g2 - (0.1 * g1) / (1 - 0.9)                # momentum after step 1, bias-corrected
    else:
        sample = g2 - g1                                    # H ← β2 H + (1−β2)‖G_t − G_{t−1}‖²_*
    dual = math.sqrt(6 / 10) * float(torch.linalg.svdvals(sample).sum())
    assert float(opt.state[p]["noise_sq"]) == pytest.approx(0.2 * dual ** 2, rel=1e-12)
    d = torch.randn(6, 10, dtype=torch.float64)
    fro = dual_norm(d, {**opt.param_groups[0], "noise_norm": "frobenius"})
    assert float(fro) >= float(dual_norm(d, opt.param_groups[0]))     # an upper bound on the nuclear norm


@pytest.mark.parametrize("estimator", ["previous_gradient", "innovation"])
def test_lanton_with_zero_noise_everywhere_keeps_the_group_lr(estimator):
    # a constant gradient has zero noise under both estimators (innovation: once the momentum has converged
    # — here exactly, since the bias-corrected EMA of a constant is that constant): the layers must keep η,
    # not freeze (old code: 0/0 → factor 0 for every layer)
    p, q = torch.zeros(6, 6, requires_grad=True), torch.zeros(6, 6, requires_grad=True)
    G = torch.randn(6, 6, generator=torch.Generator().manual_seed(2))
    opt = Lanton([p, q], lr=0.1, noise_estimator=estimator, ns_dtype="float32", momentum=0.0)
    for _ in range(4):
        before = p.detach().clone()
        p.grad, q.grad = G.clone(), G.clone()
        opt.step()
        assert float(opt.state[p]["noise_sq"]) == 0.0
        moved = torch.linalg.matrix_norm(p.detach() - before, ord=2)
        assert float(moved) > 0.09                                  # ≈ η·√(d_out/d_in)·σ_max(NS)/ν
    assert [float(f) for f in layer_factors([opt.state[p], opt.state[q]], opt.param_groups[0])] == [1.0, 1.0]


def test_lanton_layer_lrs_follow_the_ratio_of_noise_levels():
    # two same-shape layers, same true gradient, Gaussian noise σ and 4σ: noise power 1 : 16, mean 8.5
    torch.manual_seed(6)
    p, q = (torch.zeros(32, 32, requires_grad=True) for _ in range(2))
    opt = Lanton([p, q], lr=0.0, beta2=0.99)
    A = torch.randn(32, 32)
    for _ in range(400):
        p.grad = A + 0.1 * torch.randn(32, 32)
        q.grad = A + 0.4 * torch.randn(32, 32)
        opt.step()
    f = [float(x) for x in layer_factors([opt.state[p], opt.state[q]], opt.param_groups[0])]
    assert f[0] == 1.0
    assert f[1] == pytest.approx(math.sqrt(8.5 / 16), rel=0.05)


def test_lanton_applies_the_layer_factor_and_the_sign_lmo():
    g = torch.Generator().manual_seed(7)
    p, q = torch.randn(8, 8, generator=g).requires_grad_(), torch.randn(8, 8, generator=g).requires_grad_()
    opt = Lanton([p, q], lr=0.1, ns_dtype="float32")
    for _ in range(3):
        p.grad, q.grad = torch.randn(8, 8, generator=g), 5 * torch.randn(8, 8, generator=g)
        opt.step()
    factors = layer_factors([opt.state[p], opt.state[q]], opt.param_groups[0])
    before = q.detach().clone()
    gq = 5 * torch.randn(8, 8, generator=g)
    p.grad, q.grad = torch.randn(8, 8, generator=g), gq
    noise_before = [opt.state[x]["noise_sq"].clone() for x in (p, q)]
    opt.step()
    assert float(factors[1]) < 1.0 and not torch.equal(noise_before[1], opt.state[q]["noise_sq"])
    f = layer_factors([opt.state[p], opt.state[q]], opt.param_groups[0])[1]
    expected = -0.1 * f * newton_schulz(opt.state[q]["momentum_buffer"], 5, compute_dtype=torch.float32) / QUINTIC_BOUND
    torch.testing.assert_close(q.detach() - before, expected, rtol=1e-5, atol=1e-7)
    # sign LMO for vectors (embeddings / head / gains): the first step is -lr·sign(g)
    v = torch.randn(10, generator=g).requires_grad_()
    start = v.detach().clone()
    sign = Lanton([{"params": [v], "algo": "lanton", "lmo": "sign"}], lr=0.01)
    v.grad = torch.randn(10, generator=g)
    sign.step()
    torch.testing.assert_close(v.detach() - start, -0.01 * v.grad.sign())
