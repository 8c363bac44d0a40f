"""GaLore, Fira, FRUGAL, GradNormLoRP and their projector ops: the card tests (algorithms.md §7–10),
parity with the official packages, and exact state memory."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import fira                      # official packages: the parity extra installs them (a missing one fails)
import galore_torch
import torchstep
from torchstep.ops import projectors as P
from torchstep.optim import GaLore, Fira, Frugal, GradNormLoRP
from torchstep.optim.fira import fira_residual
from torchstep.optim.frugal import active_blocks
from torchstep.optim.gradnormlorp import weight_norm_grads

from helpers import roundtrip


def _matrix(m, n, seed=0, dtype=torch.float32):
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6))


def _train(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 12, generator=g), torch.randn(64, 6, generator=g)
    for i in range(steps):
        opt.zero_grad()
        ((model(x + 0.01 * i) - y) ** 2).mean().backward()
        opt.step()


def _galore_groups(model, rank=3, gap=7, alpha=0.25, key="scale"):
    mats = [model[0].weight, model[2].weight]
    rest = [model[0].bias, model[2].bias]
    return [{"params": rest}, {"params": mats, "rank": rank, "update_proj_gap": gap, key: alpha, "proj_type": "std"}]


def _max_diff(a, b):
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------- projector ops
@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
def test_svd_basis_is_orthonormal_on_the_short_side_and_captures_the_top_energy(shape):
    G = _matrix(*shape)
    side = P.projection_side(shape, "std")
    basis = P.svd_basis(G, 4, side)
    assert side == ("right" if shape[0] >= shape[1] else "left")
    (key, q), = basis.items()
    assert q.shape == ((4, 12) if key == "v" else (12, 4))       # the short side (12) × r
    assert P.orthonormality_error(basis) <= 1e-5
    R = P.project(G, basis)
    s = torch.linalg.svdvals(G.double())
    energy = (R.double().square().sum() / G.double().square().sum()).item()
    assert energy == pytest.approx((s[:4].square().sum() / s.square().sum()).item(), abs=1e-6)


def test_project_back_of_project_is_scaled_orthogonal_projection():
    G = _matrix(12, 20)
    basis = P.svd_basis(G, 5, "left")
    u = basis["u"]
    torch.testing.assert_close(P.project_back(P.project(G, basis), basis, (12, 20), 0.25), 0.25 * (u @ (u.t() @ G)),
                               rtol=0, atol=0)
    two = P.svd_basis(G, 5, "full")
    expected = two["u"] @ (two["u"].t() @ G @ two["v"].t()) @ two["v"]
    torch.testing.assert_close(P.project_back(P.project(G, two), two, (12, 20)), expected, rtol=1e-6, atol=1e-6)


def test_a_float_rank_is_a_fraction_of_the_short_side():
    assert [P.effective_rank((64, 256), r) for r in (0.25, 1.0, 0.001, 16, 1000)] == [16, 64, 1, 16, 64]
    w = nn.Parameter(_matrix(24, 40))
    opt = GaLore([w], rank=0.25)
    w.grad = _matrix(24, 40, seed=1)
    opt.step()
    assert opt.state[w]["proj_u"].shape == (24, 6)
    with pytest.raises(ValueError, match="rank"):
        GaLore([w], rank=1.5)


@pytest.mark.parametrize("grad", [torch.zeros(8, 6), torch.outer(torch.arange(8.0), torch.ones(6))],
                         ids=["zero", "rank-1"])
def test_rank_deficient_gradient_still_gives_an_orthonormal_basis(grad):
    basis = P.svd_basis(grad, 4, "right")
    assert basis["v"].shape == (4, 6) and P.orthonormality_error(basis) <= 1e-5


def test_non_finite_gradient_raises_and_svd_failure_falls_back_with_a_warning(monkeypatch):
    G = _matrix(8, 6)
    with pytest.raises(FloatingPointError, match="non-finite"):
        P.svd_basis(G.masked_fill(G > 1, float("nan")), 2, "right")

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("no convergence")
    previous = P.svd_basis(G, 2, "right")
    monkeypatch.setattr(torch.linalg, "svd", fail)
    with pytest.warns(RuntimeWarning, match="previous subspace"):
        assert P.refresh_basis(G, 2, "right", previous, seed=1) is previous
    with pytest.warns(RuntimeWarning, match="random orthonormal"):
        fallback = P.refresh_basis(G, 2, "right", None, seed=1)
    assert fallback["v"].shape == (2, 6) and P.orthonormality_error(fallback) <= 1e-6


def test_galore_under_nonfinite_ignore_raises_at_the_refresh():
    w = nn.Parameter(_matrix(6, 4))
    opt = GaLore([w], rank=2, update_proj_gap=5, nonfinite="ignore")
    w.grad = torch.full_like(w, float("inf"))
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        opt.step()


def test_random_and_coordinate_bases_are_deterministic_and_complements_exact():
    a, b = P.random_basis((10, 7), 3, "full", seed=5), P.random_basis((10, 7), 3, "full", seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a) and P.orthonormality_error(a) <= 1e-6
    G = _matrix(10, 7)
    for axis in P.COORDINATE_AXES:
        basis = P.coordinate_basis((10, 7), 4, axis, seed=3)
        low = P.project(G, basis)
        back = P.project_back(low, basis, (10, 7))
        assert int((back != 0).sum()) == {"rows": 4 * 7, "cols": 4 * 10, "entries": 4}[axis]
        assert torch.equal(back[back != 0], G[back != 0])                     # the kept coordinates, exactly
        assert ((G - back)[back != 0] == 0).all()                              # the complement is zero there


def test_reprojection_is_exact_for_a_permuted_and_sign_flipped_basis():
    G = _matrix(12, 20, dtype=torch.float64)
    old = P.svd_basis(G, 4, "left")
    perm = torch.tensor([2, 0, 3, 1])
    new = {"u": old["u"][:, perm] * torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)}
    m, v = P.project(G, old), P.project(G, old).square()
    maps = P.change_of_basis(old, new)
    torch.testing.assert_close(P.reproject(m, maps), P.project(G, new), rtol=0, atol=1e-12)
    torch.testing.assert_close(P.reproject(v, maps, squared=True), P.project(G, new).square(), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------- GaLore
def test_galore_official_parity_with_galore_torch_across_refreshes():
    a, b = _mlp(), _mlp()
    ref = galore_torch.GaLoreAdamW(_galore_groups(a), lr=1e-2, weight_decay=0.1, no_deprecation_warning=True)
    ours = GaLore(_galore_groups(b), lr=1e-2, weight_decay=0.1, compat="official")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(a, ref, 30)
    _train(b, ours, 30)                          # 30 steps, refreshes at steps 1, 8, 15, 22, 29
    print(f"GaLore vs galore-torch: max |Δθ| = {_max_diff(a, b):.2g}")      # shown with pytest -s
    assert _max_diff(a, b) < 1e-6                # measured 1.8e-7 (float32 rounding of the step size)


def test_svd_is_called_exactly_at_steps_1_T_plus_1_2T_plus_1(monkeypatch):
    calls, real = [], torch.linalg.svd
    model = _mlp()
    opt = GaLore(_galore_groups(model, gap=4), lr=1e-2)
    step = {"n": 0}

    def counting(*a, **k):
        calls.append(step["n"])
        return real(*a, **k)
    monkeypatch.setattr(torch.linalg, "svd", counting)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 12, generator=g), torch.randn(16, 6, generator=g)
    for step["n"] in range(1, 11):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert calls == [1, 1, 5, 5, 9, 9]          # two projected matrices, refreshed at 1, 5, 9


def test_full_rank_galore_with_sgd_base_is_sgd():
    torch.manual_seed(0)
    a = nn.Linear(6, 9).double()
    b = copy.deepcopy(a)
    ours = GaLore([{"params": [a.weight], "rank": 6}, {"params": [a.bias]}], lr=0.05, scale=1.0, base="sgd",
                  update_proj_gap=3)
    ref = torch.optim.SGD(b.parameters(), lr=0.05)
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 9, dtype=torch.float64)
    for model, opt in ((a, ours), (b, ref)):
        for _ in range(20):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()
    assert _max_diff(a, b) < 1e-12


def test_galore_state_shapes_scale_linearity_and_memory_formula():
    w = nn.Parameter(_matrix(12, 20))        # m = 12 ≤ n = 20: projector m×r, moments r×n
    bias = nn.Parameter(torch.zeros(12))
    opt = GaLore([w, bias], rank=4, lr=1e-2)
    w.grad, bias.grad = _matrix(12, 20, seed=1), torch.ones(12)
    before = w.detach().clone()
    opt.step()
    state = opt.state[w]
    assert state["exp_avg"].shape == (4, 20) and state["proj_u"].shape == (12, 4)
    m, n, r = 12, 20, 4
    assert torchstep.state_bytes(opt, by="kind") == {"step": 8, "exp_avg": 4 * (r * n + 12),
                                                     "exp_avg_sq": 4 * (r * n + 12), "proj_u": 4 * m * r}
    projected = torchstep.state_bytes(opt, by="param")["group0.0"] - 4      # minus the step counter
    assert projected == 4 * (m * r + 2 * n * r)                           # the paper's m·r + 2·n·r
    step_025 = w.detach() - before
    w2 = nn.Parameter(before.clone())
    opt2 = GaLore([w2], rank=4, lr=1e-2, scale=1.0)
    w2.grad = w.grad.clone()
    opt2.step()
    torch.testing.assert_close(step_025 * 4, w2.detach() - before, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moments", ["keep", "reproject", "reset"])
def test_moment_policies_at_a_subspace_change(moments):
    w = nn.Parameter(_matrix(10, 16))
    opt = GaLore([w], rank=3, update_proj_gap=2, moments=moments, lr=1e-2)
    for k in range(3):                                 # refreshes at steps 1 and 3
        w.grad = _matrix(10, 16, seed=10 + k)
        if k == 2:
            old_basis = {"u": opt.state[w]["proj_u"].clone()}
            m_before = opt.state[w]["exp_avg"].clone()
        opt.step()
    state = opt.state[w]
    R = P.project(_matrix(10, 16, seed=12), {"u": state["proj_u"]})
    if moments == "keep":
        expected = 0.9 * m_before + 0.1 * R
    elif moments == "reproject":
        expected = 0.9 * P.reproject(m_before, P.change_of_basis(old_basis, {"u": state["proj_u"]})) + 0.1 * R
    else:
        expected = 0.1 * R
        assert state["reset_step"] == 2                # bias correction restarts: the next step is t = 1
    torch.testing.assert_close(state["exp_avg"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("base", ["lion", "adafactor", "sgd", "adamw-torch"])
def test_every_base_trains_a_low_rank_least_squares_problem(base):
    torch.manual_seed(0)
    target = 0.3 * _matrix(16, 2) @ _matrix(2, 24, seed=1)           # rank 2: a rank-4 subspace holds it
    x = torch.randn(256, 24)
    w = nn.Parameter(torch.zeros(16, 24))
    lr = {"lion": 5e-2, "adafactor": 1e-1, "sgd": 0.5, "adamw-torch": 3e-2}[base]   # measured: 4e-5, 5e-6, 7e-8, 1e-4
    opt = GaLore([w], rank=4, update_proj_gap=20, scale=1.0, lr=lr, base=base)
    loss = lambda: ((x @ w.t() - x @ target.t()) ** 2).mean()  # noqa: E731
    start = loss().item()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 400)
    for _ in range(400):
        opt.zero_grad()
        loss().backward()
        opt.step()
        sched.step()
    assert loss().item() < 1e-3 * start


def test_galore_routing_explicit_ranks_partitioner_and_plain_lists():
    model = _mlp()
    # galore-torch convention: a group without rank is unprojected when any group has one
    opt = GaLore(_galore_groups(model), lr=1e-2)
    assert [g["rank"] for g in opt.param_groups] == [None, 3]
    # a plain list: matrices projected at the default rank, vectors not
    opt = GaLore(model.parameters(), rank=5)
    assert [(g["rank"], len(g["params"])) for g in opt.param_groups] == [(5, 2), (None, 2)]
    # the partitioner: hidden matrices projected, head/embedding/no_decay not
    net = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8))
    net.head = nn.Linear(8, 10)
    opt = torchstep.create("galore", net, rank=2)
    assert {g["name"]: g["rank"] for g in opt.param_groups} == {"matrix": 2, "embedding": None, "head": None,
                                                               "no_decay": None}


def test_galore_checkpoint_is_plain_tensors_and_resumes_bit_exactly_across_a_refresh():
    a = _mlp()
    opt = GaLore(_galore_groups(a, gap=3), lr=1e-2)
    _train(a, opt, 4)
    saved = roundtrip(copy.deepcopy(opt.state_dict()))       # weights_only=True
    b = copy.deepcopy(a)
    opt_b = GaLore(_galore_groups(b, gap=3), lr=1e-2)
    opt_b.load_state_dict(saved)
    for model, o in ((a, opt), (b, opt_b)):
        _train(model, o, 5, seed=1)                          # crosses the refresh at step 7
    assert _max_diff(a, b) == 0.0


# ----------------------------------------------------------------------------------- Fira
@pytest.mark.parametrize("alpha", [1.0, 0.25])
def test_fira_official_parity_with_the_fira_package(alpha):
    a, b = _mlp(), _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = fira.FiraAdamW(_galore_groups(a, alpha=alpha, key="alpha"), lr=1e-2, weight_decay=0.1)
    ours = Fira(_galore_groups(b, alpha=alpha), lr=1e-2, weight_decay=0.1, compat="official")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(a, ref, 30)
    _train(b, ours, 30)
    print(f"Fira vs fira (α = {alpha}): max |Δθ| = {_max_diff(a, b):.2g}")  # shown with pytest -s
    assert _max_diff(a, b) < 1e-6                            # measured 2.4e-7 (α = 1), 1.0e-7 (α = 0.25)


def _fira_inputs(shape=(8, 14), rank=3, seed=0):
    G = _matrix(*shape, seed=seed)
    basis = P.svd_basis(G, rank, P.projection_side(shape, "std"))
    low = P.project(G, basis)
    direction = low * 0.5 + 0.1                              # any N with R's shape
    return G, basis, low, direction


def test_fira_residual_is_the_orthogonal_complement_scaled_per_column():
    G, basis, low, D = _fira_inputs()
    group = {"compat": "paper", "scale": 1.0, "gamma": 1.01, "scaling": "column"}
    S = fira_residual(G, low, D, 1.0, basis, {}, group)
    u = basis["u"]                                           # 8 × 14: left projector, R is r × n
    complement = G - u @ (u.t() @ G)
    phi = D.norm(dim=0) / (low.norm(dim=0) + 1e-8)           # one factor per column
    torch.testing.assert_close(S, complement * phi, rtol=1e-6, atol=1e-7)
    # official with α = 0.25 keeps 75 % of the in-subspace gradient: G − 0.25·PPᵀG
    S_off = fira_residual(G, low, D, 1.0, basis, {}, {**group, "compat": "official", "scale": 0.25})
    torch.testing.assert_close(S_off, (G - 0.25 * u @ (u.t() @ G)) * phi, rtol=1e-6, atol=1e-7)


def test_fira_limiter_caps_norm_growth_at_gamma_and_stores_the_limited_norm():
    G, basis, low, D = _fira_inputs()
    group = {"compat": "official", "scale": 1.0, "gamma": 1.01, "scaling": "matrix"}
    state: dict = {}
    first = fira_residual(G, low, D, 1.0, basis, state, group)
    first_norm = first.norm()
    assert state["fira_prev"].item() == pytest.approx(first_norm.item(), rel=1e-6)   # first step: stored as is
    second = fira_residual(10 * G, low * 10, D * 10, 1.0, basis, state, group)      # 10× the norm
    assert second.norm().item() == pytest.approx(1.01 * first_norm.item(), rel=1e-6)
    assert state["fira_prev"].item() == pytest.approx(second.norm().item(), rel=1e-6)
    third = fira_residual(G, low, D, 1.0, basis, state, group)                      # decreasing: unchanged
    torch.testing.assert_close(third, first, rtol=1e-6, atol=1e-7)


def test_full_rank_residual_is_round_off_and_a_square_left_projection_works():
    G = _matrix(20, 6)                                        # tall; left projection at rank 6 = n: R is 6×6
    basis = P.svd_basis(G, 20, "left")
    low = P.project(G, basis)
    full = {"u": P.svd_basis(G, 20, "left")["u"]}
    group = {"compat": "official", "scale": 1.0, "gamma": 1.01, "scaling": "column"}
    S = fira_residual(G, low, low, 1.0, full, {}, group)     # the computed residual (official: no shortcut)
    assert S.shape == G.shape and S.abs().max() < 1e-5 * G.abs().max()
    w = nn.Parameter(_matrix(20, 6))
    opt = Fira([w], rank=6, proj_type="left")                 # square R: the official code's φ fails here
    w.grad = G
    opt.step()
    assert torch.isfinite(w).all()


def test_full_rank_fira_is_galore_bit_exactly():
    a, b = _mlp(), _mlp()
    _train(a, Fira(_galore_groups(a, rank=20), lr=1e-2), 12)
    _train(b, GaLore(_galore_groups(b, rank=20), lr=1e-2), 12)
    assert _max_diff(a, b) == 0.0


def test_paper_and_official_fira_agree_at_alpha_one_up_to_the_limiter_bias_correction():
    a, b = _mlp(), _mlp()
    _train(a, Fira(_galore_groups(a, alpha=1.0), lr=1e-3, gamma=1e9), 10)          # limiter off
    _train(b, Fira(_galore_groups(b, alpha=1.0), lr=1e-3, gamma=1e9, compat="official"), 10)
    assert _max_diff(a, b) < 1e-6
    c = _mlp()
    _train(c, Fira(_galore_groups(c, alpha=0.25), lr=1e-3, compat="official"), 10)
    d = _mlp()
    _train(d, Fira(_galore_groups(d, alpha=0.25), lr=1e-3), 10)
    assert _max_diff(c, d) > 1e-4                              # α ≠ 1: the residuals differ


# ----------------------------------------------------------------------------------- FRUGAL
def _frugal_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 6)).double()


def _train64(model, opt, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(64, 12, generator=g, dtype=torch.float64), torch.randn(64, 6, generator=g, dtype=torch.float64)
    for i in range(steps):
        opt.zero_grad()
        ((model(x + 0.01 * i) - y) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("projection", ["block", "coordinate"])
def test_frugal_density_one_without_refresh_is_adamw(projection):
    a, b = _frugal_model(), _frugal_model()
    _train64(a, Frugal(a.parameters(), lr=1e-2, density=1.0, update_gap=1000, projection=projection,
                       weight_decay=0.1), 30)
    _train64(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1), 30)
    assert _max_diff(a, b) < 1e-12


def test_frugal_block_density_one_restarts_adam_every_gap():
    a = _frugal_model()
    opt = Frugal(a.parameters(), lr=1e-2, density=1.0, update_gap=10)
    _train64(a, opt, 10)
    b = _frugal_model()
    _train64(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0), 10)
    assert _max_diff(a, b) < 1e-12                           # identical up to the refresh
    a[0].weight.grad = torch.ones_like(a[0].weight)
    opt.step()                                               # step 11: a refresh, Adam restarts from zero
    state = opt.state[a[0].weight]
    assert state["reset_step"] == 10
    torch.testing.assert_close(state["exp_avg"], 0.1 * torch.ones_like(state["exp_avg"]), rtol=0, atol=1e-15)


def test_frugal_density_zero_first_step_is_sign_descent_and_the_rest_adamw():
    a = _frugal_model()
    before = [p.detach().clone() for p in a.parameters()]
    opt = Frugal(a.parameters(), lr=1e-2, density=0.0)
    _train64(a, opt, 1)
    b = _frugal_model()
    _train64(b, torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.0), 1)
    for p, q, p0 in zip(a.parameters(), b.parameters(), before):
        if p.dim() >= 2:
            torch.testing.assert_close(p.detach(), p0 - 1e-2 * p.grad.sign(), rtol=0, atol=1e-15)
            assert set(opt.state[p]) == {"step", "reset_step", "active", "refresh"}   # no Adam state at ρ = 0
        else:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("order,expected", [
    ("ascending", [{0, 1}, {2, 3}, {4, 0}]),
    ("descending", [{4, 3}, {2, 1}, {0, 4}]),
    ("mirror", [{0, 4}, {1, 3}, {0, 4}]),
])
def test_frugal_block_orders_follow_the_author_code(order, expected):
    # N = 5 tensors, ρ = 0.4 → 2 active; mirror pairs from both ends move inward (H = 2)
    assert [active_blocks(k, 5, 0.4, order, seed=0) for k in range(3)] == expected
    assert active_blocks(0, 4, 0.625, "ascending", 0) == {0, 1}      # Python round: 2.5 → 2


def test_frugal_complement_is_orthogonal_to_the_subspace():
    G = _matrix(12, 20, dtype=torch.float64)
    basis = P.svd_basis(G, 5, "left")
    residual = G - P.project_back(P.project(G, basis), basis, (12, 20))
    assert P.project(residual, basis).abs().max() < 1e-12                      # uᵀ(G − uuᵀG) = 0
    torch.testing.assert_close(residual.square().sum(),                        # the energy outside the top 5
                               torch.linalg.svdvals(G)[5:].square().sum(), rtol=1e-10, atol=0)


def test_frugal_svd_step_by_hand():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10, dtype=torch.float64))
    G = torch.randn(6, 10, dtype=torch.float64)
    before = w.detach().clone()
    lr, sp, si = 1e-2, 0.5, 0.1
    opt = Frugal([{"params": [w], "density": 0.5}], lr=lr, projection="svd", proj_lr_scale=sp,
                 inactive_lr_scale=si, weight_decay=0.1)
    w.grad = G
    opt.step()
    u = torch.linalg.svd(G, full_matrices=False)[0][:, :3]                    # m = 6 < n: left, r = round(0.5·6)
    low = u.t() @ G
    adam = (0.1 * low) / ((0.001 * low.square()).sqrt() / (0.001 ** 0.5) + 1e-8) / 0.1   # first Adam step
    expected = before * (1 - lr * 0.1) - lr * sp * (u @ adam) - lr * sp * si * torch.sign(G - u @ low)
    torch.testing.assert_close(w.detach(), expected, rtol=0, atol=1e-12)


def test_frugal_schedule_survives_a_skipped_tensor():
    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(8, 8)) for _ in range(4)]
    opt = Frugal([{"params": mats, "density": 0.5}], lr=1e-3, update_gap=3)
    for step in range(1, 10):
        for i, p in enumerate(mats):
            p.grad = torch.randn_like(p)
            if step == 2 and i == 0:
                p.grad[0, 0] = float("nan")                                    # skipped this step
        opt.step()
        active = sum(bool(opt.state[p].get("active")) for p in mats)
        assert active == 2, step                                               # round(ρ·4) at every step
    assert opt.state[mats[0]]["refresh"] == opt.state[mats[1]]["refresh"] == 2


def test_frugal_state_memory_is_the_active_share():
    torch.manual_seed(0)
    mats = [nn.Parameter(torch.randn(8, 8)) for _ in range(4)]
    opt = Frugal([{"params": mats, "density": 0.5}], lr=1e-3, update_gap=5)
    for p in mats:
        p.grad = torch.randn_like(p)
    opt.step()
    moments = sum(v for k, v in torchstep.state_bytes(opt, by="kind").items() if k.startswith("exp_avg"))
    assert moments == 2 * 2 * 64 * 4                          # two active 8×8 blocks, m and v, fp32


# ----------------------------------------------------------------------------------- GradNormLoRP
def test_weight_norm_gradients_match_autograd():
    torch.manual_seed(0)
    v = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(7, dtype=torch.float64, requires_grad=True)
    target = torch.randn(7, 5, dtype=torch.float64)
    W = g.unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    W.retain_grad()
    ((W - target) ** 2).sum().backward()
    grad_v, grad_g = weight_norm_grads(W.grad, v.detach(), g.detach())
    torch.testing.assert_close(grad_v, v.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_g, g.grad, rtol=1e-10, atol=1e-12)


def test_gradnormlorp_reparametrisation_round_trip_and_persistent_magnitude():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10, dtype=torch.float64))   # fp64: Adam would amplify fp32 round-off in ∂L/∂v
    opt = GradNormLoRP([{"params": [w], "rank": 3}], lr=1e-2, update_proj_gap=5)
    w.grad = torch.zeros_like(w)
    opt.step()
    state = opt.state[w]
    torch.testing.assert_close(state["g"].unsqueeze(1) * state["v"] / state["v"].norm(dim=1, keepdim=True),
                               w.detach(), rtol=1e-7, atol=1e-7)
    # a loss of the row norms only: ‖W_i‖ → 6 (from ≈ 3.2): ∂L/∂v = 0, so v stays and g carries the change,
    # increasing monotonically (paper mode keeps the learned magnitude)
    v0 = state["v"].clone()
    history = []
    for _ in range(20):
        opt.zero_grad()
        ((w.norm(dim=1) - 6.0) ** 2).sum().backward()
        opt.step()
        history.append(opt.state[w]["g"].clone())
    deltas = torch.stack([b - a for a, b in zip(history, history[1:])])
    assert (deltas > 0).all()
    torch.testing.assert_close(state["v"], v0, rtol=0, atol=1e-9)
    torch.testing.assert_close(w.norm(dim=1), history[-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_gradnormlorp_magnitude_persists_in_paper_mode_and_is_reset_to_the_direction_norm_in_official(compat):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, 10))
    lr = 1e-1
    opt = GradNormLoRP([{"params": [w], "rank": 3}], lr=lr, compat=compat)
    for _ in range(2):
        opt.zero_grad()
        ((w.norm(dim=1) - 3.0) ** 2).sum().backward()
        opt.step()
    state = opt.state[w]
    torch.testing.assert_close(w.norm(dim=1), state["g"].abs(), rtol=1e-5, atol=1e-6)    # W = g v/‖v‖
    g_before, v_norm_before = state["g"].clone(), state["v"].norm(dim=1)
    m, v = state["g_exp_avg"] * 0.9, state["g_exp_avg_sq"] * 0.999      # a zero gradient: moments only decay
    c = (1 - 0.999 ** 3) ** 0.5 / (1 - 0.9 ** 3)
    w.grad = torch.zeros_like(w)
    opt.step()
    start = v_norm_before if compat == "official" else g_before        # official: g := ‖v‖ first
    torch.testing.assert_close(state["g"], start - lr * c * m / (v.sqrt() + 1e-6), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(g_before, v_norm_before, atol=1e-3)      # so the two modes really differ


def test_gradnormlorp_routing_paper_vs_official():
    model = _mlp()
    paper = GradNormLoRP(model.parameters(), rank=3)
    official = GradNormLoRP(model.parameters(), rank=3, compat="official")
    _train(model, paper, 1)
    assert [("v" in paper.state[p]) for p in model.parameters()] == [True, False, True, False]
    model2 = _mlp()
    official = GradNormLoRP(model2.parameters(), rank=3, compat="official")
    _train(model2, official, 1)
    assert all("v" in official.state[p] for p in model2.parameters())    # every tensor, vectors too


def test_gradnormlorp_zero_row_gives_no_nan():
    # a zero row has no direction: its own weight-norm gradients are 0 (not 0/0); the projected update of v
    # mixes rows, so the row may come back to life later — but nothing becomes NaN
    w = nn.Parameter(torch.randn(4, 6))
    with torch.no_grad():
        w[1] = 0
    opt = GradNormLoRP([{"params": [w], "rank": 2}], lr=1e-2)
    w.grad = torch.randn_like(w)
    opt.step()
    assert torch.isfinite(w).all() and (w[1] == 0).all()
    for _ in range(3):
        w.grad = torch.randn_like(w)
        opt.step()
    assert torch.isfinite(w).all() and all(torch.isfinite(t).all() for t in opt.state[w].values()
                                           if torch.is_tensor(t))


# ----------------------------------------------------------------------------------- state_bytes
def test_state_bytes_is_exact_for_torch_adamw_and_breaks_down():
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters())
    _train(model, opt, 1)
    n = sum(p.numel() for p in model.parameters())
    assert torchstep.state_bytes(opt) == 2 * 4 * n + 4 * 4        # m, v in fp32 + four fp32 step scalars
    kinds = torchstep.state_bytes(opt, by="kind")
    assert kinds["exp_avg"] == kinds["exp_avg_sq"] == 4 * n
    per_param = torchstep.state_bytes(opt, by="param")
    assert per_param["group0.0"] == 2 * 4 * 12 * 20 + 4
    with pytest.raises(ValueError, match="by"):
        torchstep.state_bytes(opt, by="tensor")


def test_fira_and_gradnormlorp_state_memory_formulas():
    m, n, r = 12, 20, 4
    w = nn.Parameter(_matrix(m, n))
    fira_opt = Fira([w], rank=r)
    w.grad = _matrix(m, n, seed=1)
    fira_opt.step()
    assert torchstep.state_bytes(fira_opt) == 4 * (m * r + 2 * n * r + 1) + 4          # GaLore's + φ-limiter scalar
    w2 = nn.Parameter(_matrix(m, n))
    gn = GradNormLoRP([w2], rank=r)
    w2.grad = _matrix(m, n, seed=1)
    gn.step()
    # v (m·n) + GaLore's state on v (m·r + 2·n·r) + the magnitude g and its two moments (3·m) + step
    assert torchstep.state_bytes(gn) == 4 * (m * n + m * r + 2 * n * r + 3 * m) + 4


def test_a_group_may_choose_its_own_base_and_reproject_needs_a_re_projectable_state():
    model = _mlp()
    opt = GaLore([{"params": [model[0].weight], "base": "lion", "rank": 3},
                  {"params": [model[2].weight], "base": "sgd", "momentum": 0.9, "rank": 3},
                  {"params": [model[0].bias, model[2].bias]}])
    assert opt.param_groups[0]["betas"] == (0.9, 0.99) and opt.param_groups[1]["momentum"] == 0.9
    _train(model, opt, 3)
    assert set(opt.state[model[0].weight]) >= {"exp_avg", "proj_v"}          # 20×12: the right side
    assert "momentum_buffer" in opt.state[model[2].weight]
    with pytest.raises(ValueError, match="moments"):
        GaLore(model.parameters(), base="adafactor", moments="reproject")
    with pytest.raises(ValueError, match="base"):
        GaLore([{"params": [model[0].weight], "base": "x"}])


def test_per_tensor_rules_hold_one_fp32_working_copy_at_a_time():
    sizes = []

    class Spy(GaLore):
        def _apply_rule(self, group, params, works, grads, states):
            sizes.append(len(works))
            super()._apply_rule(group, params, works, grads, states)
    model = _mlp().to(torch.bfloat16)
    opt = Spy(model.parameters(), rank=3)
    x = torch.randn(8, 12, dtype=torch.bfloat16)
    model(x).float().square().mean().backward()
    opt.step()
    assert sizes == [1, 1, 1, 1]



def test_gradnormlorp_official_leaves_a_zero_tensor_at_zero_without_nan():
    x = nn.Parameter(torch.zeros(8, dtype=torch.float64))      # the conformance problems' start, x = 0
    opt = GradNormLoRP([x], compat="official")
    for _ in range(3):
        x.grad = torch.randn(8, dtype=torch.float64)
        opt.step()
    assert (x == 0).all() and all(torch.isfinite(t).all() for t in opt.state[x].values() if torch.is_tensor(t))
