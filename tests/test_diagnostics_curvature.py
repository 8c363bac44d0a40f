"""Hessian spectrum tools and linear-stability diagnostics against exact float64 references (dense
``torch.func`` Hessians + ``torch.linalg.eigh``), the card's worked numbers (diagnostics.md §2–3), and parity with
BackPACK 1.7.1 (HVP, GGN-vp) and curvlinops 3.0.1 (Hutchinson trace, SLQ density)."""
import itertools
import math
import warnings

import pytest
import torch
from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist
from backpack.hessianfree.hvp import hessian_vector_product as backpack_hvp
from curvlinops import HessianLinearOperator, hutchinson_trace as curvlinops_trace, lanczos_approximate_spectrum
from curvlinops.sampling import random_vector
from torch import nn
from torch.func import functional_call

from torchstep.diagnostics.hessian import (CurvatureOperator, bulk_outliers, ggn_vector_product,
                                           hessian_vector_product, hutchinson_trace, lanczos_eigenvalues,
                                           plot_spectral_density, power_eigenvalues, spectral_density,
                                           student_t_quantile)
from torchstep.diagnostics.stability import (SharpnessMonitor, adam_threshold, batch_sharpness, detect_rule,
                                             gd_threshold, heavy_ball_threshold, nesterov_threshold,
                                             optimizer_thresholds, sgd_critical_lr, sgd_linear_stability)

torch.set_num_threads(1)
D = torch.float64
CE = nn.CrossEntropyLoss()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mlp(seed=0, norm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 8)] + ([nn.BatchNorm1d(8)] if norm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(D)


def data(n=24, seed=1):
    g = gen(seed)
    return torch.randn(n, 4, generator=g, dtype=D), torch.randint(0, 3, (n,), generator=g)


X, Y = data()
BATCHES = [(X[:7], Y[:7]), (X[7:], Y[7:])]  # unequal sizes: the size weighting matters


def dense_hessian(model, loss_fn=CE, x=X, y=Y):
    op = CurvatureOperator(model, loss_fn, (x, y))
    flat = op.flatten(op.parameters())
    return torch.func.hessian(lambda f: loss_fn(functional_call(model, op.unflatten(f), (x,)), y))(flat)


class Quadratic(nn.Module):
    """``½ θᵀAθ`` for any input (its Hessian is exactly ``A``); ``loss_fn = mean of outputs``."""

    def __init__(self, A, theta=None):
        super().__init__()
        self.register_buffer("A", A)
        self.theta = nn.Parameter(torch.ones(A.shape[0], dtype=D) if theta is None else theta.clone())

    def forward(self, x):
        return 0.5 * (self.theta @ self.A @ self.theta) * torch.ones(x.shape[0], dtype=D)


def mean_loss(out, _):
    return out.mean()


def rotated(eigs, seed=3):
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen(seed), dtype=D))
    return q @ torch.diag(torch.tensor(eigs, dtype=D)) @ q.T


QBATCH = (torch.zeros(2, 1, dtype=D), torch.zeros(2, dtype=D))


# ------------------------------------------------------------------------------------------- products
def test_hvp_equals_dense_hessian_product_for_batches_modes_and_reductions():
    model = mlp()
    H = dense_hessian(model)
    v = torch.randn(H.shape[0], generator=gen(), dtype=D)
    assert (hessian_vector_product(model, CE, BATCHES, v) - H @ v).abs().max() < 1e-10  # size-weighted mean
    assert (hessian_vector_product(model, CE, [X, Y], v, hvp="forward") - H @ v).abs().max() < 1e-10
    out = hessian_vector_product(model, CE, BATCHES, list(CurvatureOperator(model, CE, BATCHES).unflatten(v).values()))
    assert [t.shape for t in out] == [p.shape for p in model.parameters()]
    summed = hessian_vector_product(model, nn.CrossEntropyLoss(reduction="sum"), BATCHES, v, reduction="sum")
    assert (summed - len(X) * (H @ v)).abs().max() < 1e-9
    # reverse-over-reverse (double backward) agrees too
    loss = CE(model(X), Y)
    g = torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
    flat_g = torch.cat([t.reshape(-1) for t in g])
    hv = torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat_g @ v, list(model.parameters()))])
    assert (hv - H @ v).abs().max() < 1e-10


def test_ggn_vp_equals_dense_jacobian_form_and_is_psd_while_h_is_not():
    model = mlp()
    op = CurvatureOperator(model, CE, (X, Y))
    flat = op.flatten(op.parameters())
    J = torch.func.jacrev(lambda f: functional_call(model, op.unflatten(f), (X,)))(flat).reshape(-1, op.dim)
    Lam = torch.func.hessian(lambda z: CE(z.reshape(len(X), 3), Y))(model(X).detach().reshape(-1))
    G = J.T @ Lam @ J
    v = torch.randn(op.dim, generator=gen(), dtype=D)
    assert (ggn_vector_product(model, CE, BATCHES, v) - G @ v).abs().max() < 1e-10
    assert torch.linalg.eigvalsh(G).min() > -1e-10
    assert torch.linalg.eigvalsh(dense_hessian(model)).min() < -1e-3  # the tanh MLP's H is indefinite
    linear = nn.Linear(4, 3).to(D)  # linear model + CE: H = G
    for w in torch.eye(15, dtype=D):
        gv, hv = ggn_vector_product(linear, CE, BATCHES, w), hessian_vector_product(linear, CE, BATCHES, w)
        assert (gv - hv).abs().max() < 1e-12


def test_train_mode_uses_batch_statistics_without_side_effects_and_restores_flags():
    model = mlp(norm=True)
    bn = model[1]
    bn.running_mean.fill_(0.3)
    model.eval()
    before = (bn.running_mean.clone(), bn.num_batches_tracked.clone())
    v = torch.randn(CurvatureOperator(model, CE, (X, Y)).dim, generator=gen(), dtype=D)
    hv_train = hessian_vector_product(model, CE, (X, Y), v, mode="train")
    hv_eval = hessian_vector_product(model, CE, (X, Y), v)
    assert not model.training and torch.equal(bn.running_mean, before[0])
    assert torch.equal(bn.num_batches_tracked, before[1])
    # reference: column-by-column double backward in train mode with batch statistics.  (torch.func.hessian —
    # vmapped — returns an asymmetric, wrong matrix for train-mode BatchNorm in torch 2.13; products are fine.)
    reference = mlp(norm=True)
    reference.load_state_dict(model.state_dict())
    reference.train()
    reference[1].track_running_stats = False
    params = list(reference.parameters())
    flat_g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(CE(reference(X), Y), params, create_graph=True)])
    H = torch.stack([torch.cat([t.reshape(-1) for t in torch.autograd.grad(flat_g[i], params, retain_graph=True)])
                     for i in range(len(flat_g))])
    assert (H - H.T).abs().max() < 1e-12
    assert (hv_train - H @ v).abs().max() < 1e-10
    assert (hv_eval - dense_hessian(model) @ v).abs().max() < 1e-10
    assert (hv_train - hv_eval).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------- eigenvalues
def test_lanczos_and_deflated_power_top3_match_eigh():
    model = mlp()
    exact = torch.linalg.eigvalsh(dense_hessian(model)).flip(0)[:3]
    op = CurvatureOperator(model, CE, BATCHES)
    lz = lanczos_eigenvalues(op, 3, max_steps=40, generator=gen())
    assert lz.converged and (lz.values - exact).abs().max() < 1e-6 and lz.matvecs <= 40
    for i in range(3):  # eigenvectors: A v = λ v
        assert (op @ lz.vectors[:, i] - lz.values[i] * lz.vectors[:, i]).norm() < 1e-4
    pw = power_eigenvalues(CurvatureOperator(model, CE, (X, Y)), 3, max_iter=500, tol=1e-6, residual_tol=1e-3,
                           generator=gen())
    assert pw.converged and ((pw.values - exact).abs() / exact).max() < 1e-3


def test_largest_algebraic_vs_magnitude_with_a_large_negative_eigenvalue():
    eigs = [-5.0, 3.0, 1.0, 0.5]
    model = Quadratic(rotated(eigs))
    op = CurvatureOperator(model, mean_loss, QBATCH)
    for method in (lanczos_eigenvalues, power_eigenvalues):
        kwargs = {} if method is lanczos_eigenvalues else dict(max_iter=2000, tol=1e-9, residual_tol=1e-4)
        assert float(method(op, 1, generator=gen(), **kwargs).values[0]) == pytest.approx(3.0, abs=1e-5)
        magnitude = method(op, 1, which="magnitude", generator=gen(), **kwargs).values
        assert float(magnitude[0]) == pytest.approx(-5.0, abs=1e-5)
    top2 = lanczos_eigenvalues(op, 2, which="LA", generator=gen()).values
    assert torch.allclose(top2, torch.tensor([3.0, 1.0], dtype=D), atol=1e-8)
    top2 = power_eigenvalues(torch.diag(torch.tensor([-5.0, 3.0, 1.0, 0.5], dtype=D)), 2, max_iter=2000, tol=1e-9,
                             residual_tol=1e-4, generator=gen()).values
    assert torch.allclose(top2, torch.tensor([3.0, 1.0], dtype=D), atol=1e-5)
    assert torch.allclose(lanczos_eigenvalues(torch.diag(torch.tensor([-5.0, 3.0], dtype=D)), 1).values,
                          torch.tensor([3.0], dtype=D))


def test_bad_inputs_raise_value_errors():
    model = mlp()
    op = CurvatureOperator(model, CE, (X, Y))
    with pytest.raises(ValueError, match="larger than the parameter count"):
        lanczos_eigenvalues(op, op.dim + 1)
    with pytest.raises(ValueError, match="larger than the parameter count"):
        power_eigenvalues(op, op.dim + 1)
    with pytest.raises(ValueError, match="scalar"):
        hessian_vector_product(model, nn.CrossEntropyLoss(reduction="none"), (X, Y), torch.ones(op.dim, dtype=D))
    with pytest.raises(ValueError, match="scalar"):
        ggn_vector_product(model, nn.CrossEntropyLoss(reduction="none"), (X, Y), torch.ones(op.dim, dtype=D))
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        CurvatureOperator(frozen, CE, (X, Y))
    broken = mlp()
    with torch.no_grad():
        broken[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Non-finite"):
        lanczos_eigenvalues(CurvatureOperator(broken, CE, (X, Y)), 1)
    with pytest.raises(ValueError, match="which"):
        lanczos_eigenvalues(op, 1, which="SA")
    with pytest.raises(ValueError, match="mode"):
        CurvatureOperator(model, CE, (X, Y), mode="inference")
    with pytest.raises(ValueError, match="reduction"):
        CurvatureOperator(model, CE, (X, Y), reduction="none")


# ------------------------------------------------------------------------------------------ Hutchinson
def test_student_t_quantile_matches_scipy():
    # scipy.stats.t.ppf((1 + c)/2, df) for c = 0.5, 0.95, 0.99 (scipy 1.17.1; hard-coded to keep scipy's import out)
    scipy_values = {1: (1.0000000000000002, 12.706204736174694, 63.656741162871526),
                    2: (0.8164965809277261, 4.302652729749462, 9.924843200918287),
                    7: (0.7111417780817866, 2.364624251592784, 3.4994832973504924),
                    30: (0.6827556933212927, 2.0422724563012378, 2.7499956535672254),
                    199: (0.6757245956106454, 1.9719565442517533, 2.600760216058516)}
    for df, values in scipy_values.items():
        for c, value in zip((0.5, 0.95, 0.99), values):
            assert student_t_quantile(c, df) == pytest.approx(value, rel=1e-10)


def test_hutchinson_exact_for_diagonal_within_ci_and_converging():
    diag = torch.diag(torch.tensor([2.0, -1.0, 0.5, 4.0], dtype=D))
    one = hutchinson_trace(CurvatureOperator(Quadratic(diag), mean_loss, QBATCH), 1, generator=gen())
    assert one.value == pytest.approx(5.5, abs=1e-12) and one.matvecs == 1 and math.isinf(one.halfwidth)
    model = mlp()
    H = dense_hessian(model)
    est = hutchinson_trace(CurvatureOperator(model, CE, BATCHES), 49, generator=gen(5))
    assert est.low <= float(H.trace()) <= est.high and est.matvecs == 49
    assert est.halfwidth == pytest.approx(student_t_quantile(0.95, 48) * est.samples.std() / 7)
    # the running estimate converges: 1,000 Rademacher probes within 4σ, σ² = 2Σ_{i≠j}H_ij²/m
    big = hutchinson_trace(H, 1000, generator=gen(6))
    sigma = math.sqrt(2 * float((H ** 2).sum() - (H.diagonal() ** 2).sum()) / 1000)
    assert abs(big.value - float(H.trace())) < 4 * sigma
    assert big.halfwidth < est.halfwidth / 3  # ~1/√m
    gaussian = hutchinson_trace(H, 1000, distribution="gaussian", generator=gen(6))
    assert gaussian.samples.var() > big.samples.var()  # Rademacher has the lower variance


# ------------------------------------------------------------------------------------------------- SLQ
def test_slq_worked_numbers_and_exact_quadrature():
    sd = spectral_density(torch.diag(torch.arange(1.0, 7.0, dtype=D)), 6, generator=gen())
    assert torch.allclose(sd.nodes[0], torch.arange(1.0, 7.0, dtype=D), atol=1e-10)
    assert torch.allclose(sd.weights[0], torch.full((6,), 1 / 6, dtype=D), atol=1e-10)
    diag = torch.diag(torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0], dtype=D))  # diagonal + Rademacher: mean exact
    sd = spectral_density(CurvatureOperator(Quadratic(diag), mean_loss, QBATCH), 3, runs=2, generator=gen())
    assert sd.expectation() * 5 == pytest.approx(4.5, abs=1e-12)
    assert sd.expectation(lambda t: t ** 2) * 5 == pytest.approx(float((diag ** 2).sum()), abs=1e-12)
    model = mlp()
    H, op = dense_hessian(model), CurvatureOperator(model, CE, BATCHES)
    z = _probe_rows(2, op.dim)
    sd = spectral_density(op, 10, start=z, num_points=4000)
    assert torch.allclose(sd.weights.sum(1), torch.ones(2, dtype=D), atol=1e-12) and sd.matvecs == 20
    q = z / z.norm(dim=1, keepdim=True)
    assert sd.expectation() == pytest.approx(float(torch.einsum("ri,ij,rj->r", q, H, q).mean()), abs=1e-10)
    second = float(torch.einsum("ri,ij,rj->r", q, H @ H, q).mean())
    assert sd.expectation(lambda t: t ** 2) == pytest.approx(second, abs=1e-10)
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-6)
    assert float(torch.trapezoid(sd.grid * sd.density, sd.grid)) == pytest.approx(sd.expectation(), abs=1e-6)
    full = spectral_density(H, H.shape[0], generator=gen())  # a full Krylov space: every node is an eigenvalue
    nodes = full.nodes[0][full.weights[0] > 1e-14]
    assert (nodes[:, None] - torch.linalg.eigvalsh(H)[None, :]).abs().min(1).values.max() < 1e-8


def _probe_rows(runs, dim):
    return torch.randint(0, 2, (runs, dim), generator=gen(9)).to(D) * 2 - 1


def test_slq_mean_estimates_trace_over_p_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    H = dense_hessian(mlp())
    sd = spectral_density(H, 8, runs=150, generator=gen(2))
    se = float((sd.weights * sd.nodes).sum(1).std()) / math.sqrt(150)
    assert abs(sd.expectation() - float(H.trace()) / H.shape[0]) < 4 * se
    ax = plot_spectral_density(sd)
    assert len(ax.get_lines()) == 1 and ax.get_yscale() == "log"


# --------------------------------------------------------------------------------------- bulk/outliers
def test_bulk_outliers_logistic_regression_at_zero_has_c_times_c_minus_1_outliers():
    model = nn.Linear(4, 3, bias=False).to(D)
    nn.init.zeros_(model.weight)
    x = 2 * torch.diag(torch.tensor([3.25, 3.25, 3.25, 0.25], dtype=D).sqrt())  # E[xxᵀ] = diag(3.25, ·, ·, 0.25)
    op = CurvatureOperator(model, CE, (x, torch.tensor([0, 1, 2, 0])))
    H = torch.stack([op @ e for e in torch.eye(op.dim, dtype=D)])
    expected = torch.tensor([13 / 12] * 6 + [1 / 12] * 2 + [0.0] * 4, dtype=D)
    assert torch.allclose(torch.linalg.eigvalsh(H).flip(0), expected, atol=1e-10)
    summary = bulk_outliers(H, 3)
    assert summary.n_outliers == 6 == 3 * 2 and summary.bulk_edge == pytest.approx(1 / 12)
    assert bulk_outliers(expected, 3, threshold=0.5).n_outliers == 6
    mlp_model = mlp()
    exact = torch.linalg.eigvalsh(dense_hessian(mlp_model))
    via_op = bulk_outliers(CurvatureOperator(mlp_model, CE, (X, Y)), 3, k=12, generator=gen())
    assert via_op.n_outliers == bulk_outliers(exact[-12:], 3).n_outliers


# ----------------------------------------------------------------------------------------- stability
@pytest.mark.parametrize("kwargs,threshold", [
    (dict(), gd_threshold(0.1)),
    (dict(momentum=0.9), heavy_ball_threshold(0.1, 0.9)),
    (dict(momentum=0.9, dampening=0.5), heavy_ball_threshold(0.1, 0.9, 0.5)),
    (dict(momentum=0.9, nesterov=True), nesterov_threshold(0.1, 0.9)),
])
def test_thresholds_separate_convergence_from_divergence_for_torch_sgd(kwargs, threshold):
    # f = ½ Σ λ_i θ_i² with λ = (0.99, 1.01)·threshold: SGD is elementwise, so one run covers both curvatures
    lam = torch.tensor([0.99, 1.01], dtype=D) * threshold
    theta = torch.ones(2, dtype=D, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=0.1, **kwargs)
    for _ in range(1500):
        theta.grad = lam * theta.detach()
        opt.step()
    assert abs(float(theta[0].detach())) < 1e-3 and abs(float(theta[1].detach())) > 1e3
    assert optimizer_thresholds(opt)[0] == pytest.approx(threshold)


def test_card_threshold_values_and_frozen_preconditioner_adam():
    assert heavy_ball_threshold(0.1, 0.9) == pytest.approx(38.0)
    assert nesterov_threshold(0.1, 0.9) == pytest.approx(13.5714, abs=1e-4)
    assert adam_threshold(0.1, 0.9) == pytest.approx(380.0)
    for factor, converges in ((0.99, True), (1.01, False)):  # m ← β1 m + (1−β1)g; θ ← θ − η m/P, P frozen
        P, lr, beta1 = 2.0, 0.1, 0.9
        lam = factor * adam_threshold(lr, beta1) * P  # λ(P⁻¹H) = factor·threshold
        theta, m = 1.0, 0.0
        for _ in range(3000):
            m = beta1 * m + (1 - beta1) * lam * theta
            theta -= lr * m / P
        assert (abs(theta) < 1e-3) is converges and (abs(theta) > 1e3) is not converges
    assert detect_rule(torch.optim.Adam([nn.Parameter(torch.ones(1))])) == "adam"
    assert detect_rule(torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, momentum=0.5)) == "heavy_ball"


def test_gd_at_the_edge_and_sharpness_monitor_reads_the_current_lr():
    A = rotated([4.0, 1.0, 0.5, 0.25])
    for factor, converges in ((0.99, True), (1.01, False)):
        model = Quadratic(A)
        opt = torch.optim.SGD(model.parameters(), lr=factor * 2 / 4.0)
        mon = SharpnessMonitor(every=100, trace_samples=4)
        for step in range(301):
            mon(step, model=model, optimizer=opt, loss_fn=mean_loss, batch=QBATCH)
            opt.zero_grad()
            mean_loss(model(QBATCH[0]), None).backward()
            opt.step()
        norm = float(model.theta.detach().norm())
        assert (norm < 1e-1) is converges and (norm > 10) is not converges
        for rec in mon.history:
            assert rec["sharpness"] == pytest.approx(4.0, abs=1e-6) and rec["threshold"] == pytest.approx(4 / factor)
            assert rec["ratio"] == pytest.approx(factor) and rec["eos"] == 1.0
    opt.param_groups[0]["lr"] = 0.1  # a schedule: the next measurement reads it
    rec = mon(400, model=model, optimizer=opt, loss_fn=mean_loss, batch=QBATCH)
    assert rec["threshold"] == pytest.approx(20.0) and rec["ratio"] == pytest.approx(0.2) and rec["eos"] == 0.0
    assert rec["trace_ratio"] == pytest.approx(0.1 * rec["trace"] / 2)
    other = SharpnessMonitor()
    other.load_state_dict(mon.state_dict())
    assert len(mon.history) == 5 and other.history == mon.history and other.every == mon.every


def test_sharpness_monitor_momentum_per_group_lrs_batch_sharpness_and_negative_warning():
    A = rotated([3.0, -5.0, 1.0, 0.5])
    model = Quadratic(A)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    mon = SharpnessMonitor(trace_samples=0, batch_sharpness=True)
    with pytest.warns(RuntimeWarning, match="λ_min"):
        rec = mon(0, model=model, optimizer=opt, loss_fn=mean_loss, batch=QBATCH)
    assert rec["sharpness"] == pytest.approx(3.0, abs=1e-6) and rec["threshold"] == pytest.approx(380.0)
    g = A @ model.theta.detach()
    assert rec["batch_sharpness"] == pytest.approx(float(g @ A @ g / (g @ g)), abs=1e-10)
    assert math.isnan(rec["trace"]) and rec["lambda_min"] == pytest.approx(-5.0, abs=1e-4)
    # two parameter groups with different lrs: the ratio is λ_max(D^{1/2} H D^{1/2}), D = diag(η_g/2)
    model2 = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 3)).to(D)
    opt2 = torch.optim.SGD([{"params": model2[0].parameters(), "lr": 0.05},
                            {"params": model2[2].parameters(), "lr": 0.2}])
    x, y = X[:8, :3], Y[:8]
    with warnings.catch_warnings():  # this small net's λ_min dominates too
        warnings.simplefilter("ignore", RuntimeWarning)
        rec2 = SharpnessMonitor(trace_samples=20, lanczos_steps=30, tol=1e-8)(
            0, model=model2, optimizer=opt2, loss_fn=CE, batch=(x, y))
    H2 = dense_hessian(model2, CE, x, y)
    d = torch.tensor([0.05] * 8 + [0.2] * 9, dtype=D)
    scaled = d.sqrt()[:, None] * H2 * d.sqrt()[None, :] / 2
    assert rec2["ratio"] == pytest.approx(float(torch.linalg.eigvalsh(scaled)[-1]), abs=1e-6)
    assert math.isnan(rec2["threshold"]) and math.isnan(rec2["lr"])
    assert rec2["sharpness"] == pytest.approx(float(torch.linalg.eigvalsh(H2)[-1]), abs=1e-6)


def test_sharpness_monitor_adam_preconditioned_sharpness_from_exp_avg_sq():
    A = rotated([4.0, 2.0, 1.0, 0.1])
    model = Quadratic(A, theta=torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=D))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99))
    mon = SharpnessMonitor(preconditioned=True, trace_samples=0, lanczos_steps=4, tol=1e-10)
    first = mon(0, model=model, optimizer=opt, loss_fn=mean_loss, batch=QBATCH)
    assert math.isnan(first["precond_sharpness"])  # no state before the first step
    for _ in range(5):
        opt.zero_grad()
        mean_loss(model(QBATCH[0]), None).backward()
        opt.step()
    rec = mon(5, model=model, optimizer=opt, loss_fn=mean_loss, batch=QBATCH)
    state = opt.state[model.theta]
    P = (1 - 0.9 ** 5) * ((state["exp_avg_sq"] / (1 - 0.99 ** 5)).sqrt() + 1e-8)
    exact = float(torch.linalg.eigvalsh(A / P.sqrt()[:, None] / P.sqrt()[None, :])[-1])
    assert rec["precond_sharpness"] == pytest.approx(exact, rel=1e-8)
    assert rec["threshold"] == pytest.approx(3800.0) and rec["ratio"] == pytest.approx(exact / 3800.0, rel=1e-8)


def test_wu_su_card_worked_data_critical_lr_and_trace_conditions():
    x = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1], [1, 0, 1]], dtype=D)
    table = {1: (1.189750, 2.974376), 2: (1.686565, 2.881216), 3: (1.927839, 2.784657), 4: (2.059787, 2.703471)}
    for B, (eta, lhs) in table.items():
        crit = sgd_critical_lr(x, B)
        assert crit == pytest.approx(eta, abs=1e-5)
        at = sgd_linear_stability(x, crit, B)
        assert at.radius == pytest.approx(1.0, abs=1e-9) and at.lhs == pytest.approx(lhs, abs=1e-5)
        assert at.trace == pytest.approx(1.5) and at.derived_holds and at.trace <= at.derived_trace_bound
        assert at.paper_holds is (B == 1)  # tr H ≤ 2/η holds at B = 1, fails for B ≥ 2
        assert sgd_linear_stability(x, 0.99 * crit, B).stable and not sgd_linear_stability(x, 1.01 * crit, B).stable
    # without replacement: the mixture p = (n − B)/(B(n − 1)) equals enumerating all batches exactly
    Hi = x[:, :, None] * x[:, None, :]
    H, eye, lr = Hi.mean(0), torch.eye(3, dtype=D), 1.3
    batches = [Hi[list(s)].mean(0) for s in itertools.combinations(range(6), 2)]
    T = sum(torch.kron(eye - lr * b, eye - lr * b) for b in batches) / len(batches)
    exact = float(torch.linalg.eigvalsh(T).abs().max())
    assert sgd_linear_stability(Hi, lr, 2, replacement=False).radius == pytest.approx(exact, abs=1e-12)
    assert sgd_critical_lr(x, 6, replacement=False) == pytest.approx(2 / float(torch.linalg.eigvalsh(H)[-1]), rel=1e-9)


def test_batch_sharpness_equals_dense_directional_curvature():
    model = mlp()
    batch = (X[:8], Y[:8])
    H = dense_hessian(model, CE, *batch)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(CE(model(batch[0]), batch[1]), list(model.parameters()))])
    assert batch_sharpness(model, CE, batch) == pytest.approx(float(g @ H @ g / (g @ g)), abs=1e-10)


# ------------------------------------------------------------------------------------------------ parity
def test_parity_backpack_hvp_and_ggn_vp():
    model = mlp()
    v = torch.randn(CurvatureOperator(model, CE, (X, Y)).dim, generator=gen(4), dtype=D)
    vs = list(CurvatureOperator(model, CE, (X, Y)).unflatten(v).values())
    params = list(model.parameters())
    out = model(X)
    loss = CE(out, Y)
    bp_h = torch.cat([t.reshape(-1) for t in backpack_hvp(loss, params, vs)])
    bp_g = torch.cat([t.reshape(-1) for t in ggn_vector_product_from_plist(loss, out, params, vs)])
    assert (hessian_vector_product(model, CE, BATCHES, v) - bp_h).abs().max() < 1e-10
    assert (ggn_vector_product(model, CE, BATCHES, v) - bp_g).abs().max() < 1e-10


def test_parity_curvlinops_trace_and_spectral_density():
    model = mlp()
    H_op = HessianLinearOperator(model, CE, list(model.parameters()), BATCHES)
    op = CurvatureOperator(model, CE, BATCHES)
    torch.manual_seed(11)
    theirs = float(curvlinops_trace(H_op, 20))
    torch.manual_seed(11)
    probes = torch.stack([random_vector(op.dim, "rademacher", torch.device("cpu"), D) for _ in range(20)])
    assert hutchinson_trace(op, probes=probes).value == pytest.approx(theirs, abs=1e-10)
    ev = torch.linalg.eigvalsh(dense_hessian(model))
    lo, hi, ncv, margin = float(ev[0]), float(ev[-1]), 8, 0.05
    torch.manual_seed(12)
    grid, density = lanczos_approximate_spectrum(H_op, ncv, num_points=200, num_repeats=2, boundaries=(lo, hi),
                                                 kappa=3.0, margin=margin)
    torch.manual_seed(12)
    starts = torch.stack([torch.randn(op.dim, dtype=D) for _ in range(2)])
    sigma = (hi - lo) * (1 + 2 * margin) / 2 * 2 / (ncv - 1) / math.sqrt(8 * math.log(3.0))
    ours = spectral_density(op, ncv, start=starts, sigma=sigma, grid=grid)
    assert torch.allclose(ours.density, density, rtol=1e-6, atol=1e-8 * float(density.max()))


def test_critical_lr_terminates_on_a_singular_hessian_and_the_bound_without_replacement():
    from torchstep.diagnostics import sgd_critical_lr, sgd_linear_stability
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(3, 6, generator=g, dtype=torch.float64)      # P > n: H = mean ∇f∇fᵀ is singular
    lr = sgd_critical_lr(grads, 1)
    assert 0 < lr and sgd_linear_stability(grads, lr * 0.999).stable and not sgd_linear_stability(grads, lr * 1.01).stable
    cards = torch.randn(6, 3, generator=g, dtype=torch.float64)
    s = sgd_linear_stability(cards, 0.5, 2, replacement=False)      # p = (6 − 2)/(2·5) = 0.4
    assert s.derived_trace_bound == pytest.approx(2 / (0.5 * 0.4))
    with pytest.raises(ValueError, match="rtol"):
        sgd_critical_lr(cards, 1, rtol=0)


@pytest.mark.parametrize("bad", [{"lanczos_steps": 0}, {"tol": 0.0}, {"eos_fraction": 1.5}, {"mode": "test"},
                                 {"reduction": "none"}])
def test_sharpness_monitor_rejects_bad_arguments_at_construction(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SharpnessMonitor(**bad)
