"""SophiaG / SophiaH: parity with sophia-opt, the clipped update, and both Hessian estimators."""
import pytest
import torch
import torch.nn.functional as F

from torchstep.ops import gnb_sampled_loss, hutchinson_diagonal
from torchstep.optim import SophiaG, SophiaH


def test_before_any_hessian_estimate_the_update_is_sign_momentum():
    x = torch.zeros(4, requires_grad=True)
    x.grad = torch.tensor([0.3, -2.0, 0.0, 1e-6])
    SophiaG([x], lr=0.1, weight_decay=0.0).step()
    assert torch.equal(x.detach(), torch.tensor([-0.1, 0.1, 0.0, -0.1]))


def test_unclipped_regime_is_newton_like():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = SophiaG([x], lr=0.1, betas=(0.9, 0.99), rho=0.5, bs=10, weight_decay=0.0)
    x.grad = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    opt.update_hessian()
    h = opt.state[x]["hessian"].clone()
    torch.testing.assert_close(h, 0.01 * x.grad ** 2)        # h = (1 − β2)·ĝ², b not folded in
    x.grad = torch.tensor([0.01, -0.02, 0.03], dtype=torch.float64)
    opt.step()
    m = 0.1 * x.grad
    torch.testing.assert_close(x.detach(), -0.1 * m / (0.5 * 10 * h), rtol=1e-7, atol=0)


def test_parity_with_sophia_opt_including_hessian_refreshes():
    import sophia_opt   # parity reference (README test command installs it): missing means fail, not skip
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(12, 7, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kw = dict(lr=2e-3, betas=(0.965, 0.99), rho=0.04, weight_decay=0.1)
    a, b = SophiaG(ours, bs=64, **kw), sophia_opt.SophiaG(theirs, **kw)
    for it in range(40):
        for p, q in zip(ours, theirs):
            gr = torch.randn(p.shape, generator=g)
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step(), b.step(bs=64)
        if it % 10 == 9:
            for p, q in zip(ours, theirs):
                gr = torch.randn(p.shape, generator=g) * 0.1
                p.grad, q.grad = gr.clone(), gr.clone()
            a.update_hessian(), b.update_hessian()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)
        torch.testing.assert_close(a.state[p]["hessian"], b.state[q]["hessian"], rtol=1e-6, atol=0)


def test_gnb_estimator_matches_the_gauss_newton_diagonal():
    # Linear softmax model z = W x: the Gauss–Newton diagonal of mean CE over a batch of B is
    # (1/B) Σ_n (diag(p_n) − p_n p_nᵀ)_{kk} x_{nj}² = (1/B) Σ_n p_nk(1 − p_nk) x_nj².
    # E[B · ĝ²] equals it when labels are sampled from the model (Bartlett identity), B = 1.
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(1, 4, generator=g, dtype=torch.float64)
    probs = (x @ W.T).softmax(-1)[0]
    analytic = (probs * (1 - probs))[:, None] * x[0][None, :] ** 2
    samples = 20_000
    total, total_sq = torch.zeros_like(W), torch.zeros_like(W)
    for _ in range(samples):
        (grad,) = torch.autograd.grad(gnb_sampled_loss(x @ W.T, generator=g), W)
        total += grad ** 2
        total_sq += grad ** 4
    mean = total / samples
    stderr = ((total_sq / samples - mean ** 2) / samples).sqrt()
    assert torch.all((mean - analytic).abs() <= 4 * stderr + 1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_for_the_hessian_diagonal(distribution):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = A @ A.T + torch.eye(6, dtype=torch.float64)
    x = torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True)
    n = 4000
    est = hutchinson_diagonal(0.5 * x @ H @ x, [x], samples=n, distribution=distribution, generator=g)[0]
    # variance of u_i(Hu)_i is Σ_{j≠i} H_ij² (Rademacher) or that + 2H_ii² (Gaussian)
    off = (H ** 2).sum(1) - H.diag() ** 2
    var = off if distribution == "rademacher" else off + 2 * H.diag() ** 2
    assert torch.all((est - H.diag()).abs() <= 4 * (var / n).sqrt())
    if distribution == "rademacher":  # a diagonal Hessian is recovered exactly by Rademacher probes
        D = torch.diag(torch.arange(1.0, 7.0, dtype=torch.float64))
        exact = hutchinson_diagonal(0.5 * x @ D @ x, [x], generator=g)[0]
        torch.testing.assert_close(exact, D.diag())


def test_sophiah_update_hessian_and_step_on_a_quadratic():
    D = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = SophiaH([x], lr=1.0, rho=1.0, betas=(0.0, 0.0), eps=1e-12)
    opt.update_hessian(lambda: 0.5 * (D * x ** 2).sum())
    torch.testing.assert_close(opt.state[x]["hessian"], D)    # Rademacher probes, diagonal H: exact
    opt.zero_grad()
    (0.5 * (D * x ** 2).sum()).backward()
    opt.step()
    # β1 = 0: m = g = D x; update = clip(m/(ρ h), 1) = clip(x, 1) = x → one Newton step to 0
    torch.testing.assert_close(x.detach(), torch.zeros(3, dtype=torch.float64))


def test_sophiag_gnb_training_loop_from_the_docstring_runs_and_learns():
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(8, 4)
    X = torch.randn(256, 8, generator=g)
    y = (X[:, :4]).argmax(-1)
    opt = SophiaG(model.parameters(), lr=2e-2, rho=0.05, weight_decay=0.0, bs=256)
    first = F.cross_entropy(model(X), y).item()
    for step in range(100):
        loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 9:
            gnb_sampled_loss(model(X), generator=g).backward()
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
    assert F.cross_entropy(model(X), y).item() < 0.5 * first
    assert all(opt.state[p]["hessian"].abs().sum() > 0 for p in model.parameters())


def test_sophiah_negative_curvature_estimate_never_flips_the_step():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = SophiaH([x], lr=0.1, rho=1.0, betas=(0.0, 0.0), eps=1e-12)
    opt.update_hessian(lambda: -0.5 * (x ** 2).sum() + 0 * x.sum())   # H = −I: estimate −1
    assert torch.equal(opt.state[x]["hessian"], -torch.ones(2, dtype=torch.float64))
    x.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    assert torch.equal(x.detach(), torch.tensor([-0.1, 0.1], dtype=torch.float64))   # clipped sign step, downhill


def test_nonfinite_hessian_estimates_are_skipped():
    x = torch.ones(3, requires_grad=True)
    opt = SophiaG([x])
    x.grad = torch.tensor([1.0, float("nan"), 2.0])
    opt.update_hessian()
    assert x not in opt.state or torch.isfinite(opt.state[x]["hessian"]).all()


def test_sophiag_batch_size_enters_the_step_not_the_stored_estimate():
    # bs = B scales the curvature in the denominator (ρ·B·h + ε); h itself is the mean-gradient estimate
    a, b = (torch.zeros(3, dtype=torch.float64, requires_grad=True) for _ in range(2))
    oa = SophiaG([a], lr=0.1, rho=0.04, bs=64, weight_decay=0.0)
    ob = SophiaG([b], lr=0.1, rho=0.04 * 64, bs=1, weight_decay=0.0)
    for x, o in ((a, oa), (b, ob)):
        x.grad = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
        o.update_hessian()
        x.grad = torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64)
        o.step()
    assert torch.equal(oa.state[a]["hessian"], ob.state[b]["hessian"])
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-15, atol=0)
    h = oa.state[a]["hessian"]
    expected = -0.1 * (0.035 * torch.tensor([0.3, 0.2, -0.1], dtype=torch.float64) / (0.04 * 64 * h + 1e-15)).clamp(-1, 1)
    torch.testing.assert_close(a.detach(), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sophiag_update_hessian_squares_low_precision_gradients_in_fp32(dtype):
    # (1e-4)² = 1e-8 is below fp16's smallest subnormal (6e-8): squaring in fp16 stored 0 curvature
    x = torch.zeros(4, dtype=dtype, requires_grad=True)
    opt = SophiaG([x], betas=(0.965, 0.99))
    x.grad = torch.full((4,), 1e-4, dtype=dtype)
    opt.update_hessian()
    h = opt.state[x]["hessian"]
    assert h.dtype == torch.float32
    torch.testing.assert_close(h, 0.01 * x.grad.float().square(), rtol=1e-6, atol=0)
    assert (h > 0).all()


def test_sophiah_unused_parameter_gets_zero_curvature_instead_of_an_error():
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    unused = torch.ones(2, dtype=torch.float64, requires_grad=True)
    linear = torch.ones(2, dtype=torch.float64, requires_grad=True)       # in the graph, zero Hessian
    opt = SophiaH([x, unused, linear], betas=(0.0, 0.0))
    opt.update_hessian(lambda: (x ** 4).sum() + linear.sum())
    torch.testing.assert_close(opt.state[x]["hessian"], torch.full((3,), 12.0, dtype=torch.float64))
    assert torch.equal(opt.state[unused]["hessian"], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(opt.state[linear]["hessian"], torch.zeros(2, dtype=torch.float64))


def test_sophiah_reads_samples_and_distribution_from_each_group():
    # Rademacher probes recover a diagonal Hessian exactly, Gaussian ones do not: each group must use its own
    D = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    x, y = torch.ones(3, dtype=torch.float64, requires_grad=True), torch.ones(3, dtype=torch.float64, requires_grad=True)
    opt = SophiaH([{"params": [x], "distribution": "gaussian", "samples": 3},
                   {"params": [y], "distribution": "rademacher"}], betas=(0.0, 0.0))
    torch.manual_seed(0)
    opt.update_hessian(lambda: 0.5 * (D * x ** 2).sum() + 0.5 * (D * y ** 2).sum())
    torch.testing.assert_close(opt.state[y]["hessian"], D)
    assert not torch.allclose(opt.state[x]["hessian"], D)
    torch.manual_seed(0)      # the Gaussian group's estimate is the mean of its 3 probes z²·D
    z = torch.randn(3, 3, dtype=torch.float64)
    torch.testing.assert_close(opt.state[x]["hessian"], (z ** 2).mean(0) * D, rtol=1e-12, atol=0)


def test_sophiah_matches_pytorch_optimizer_under_the_documented_mapping():
    import pytorch_optimizer   # the peer (installed by the README's test command): missing means fail
    # theirs: p ← p(1 − lr·λ); m ← lerp(m, g, 1 − β1); at steps 1, 1+k, …: h ← lerp(h, z⊙Hz, 1 − β2);
    # p ← p − lr·clamp(m/max(h, ε), ±p_c).  Ours with η = lr·p_c, ρ = p_c, ε = p_c·ε', λ = λ'/p_c, Gaussian probes.
    lr, p_c, eps, wd, k = 0.05, 0.02, 1e-12, 0.1, 5
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
    data = [torch.randn(8, 4, generator=g, dtype=torch.float64) for _ in range(20)]

    def loss(params, step):
        W, b = params
        return torch.log1p(((data[step] @ W + b) ** 2)).sum()

    ours = [t.clone().requires_grad_() for t in start]
    theirs = [t.clone().requires_grad_() for t in start]
    a = SophiaH(ours, lr=lr * p_c, rho=p_c, eps=p_c * eps, weight_decay=wd / p_c, betas=(0.9, 0.95),
                distribution="gaussian")
    b = pytorch_optimizer.SophiaH(theirs, lr=lr, p=p_c, eps=eps, weight_decay=wd, betas=(0.9, 0.95), update_period=k,
                                  foreach=False)
    for step in range(20):
        b.zero_grad()
        loss(theirs, step).backward(create_graph=True)
        torch.manual_seed(100 + step)
        b.step()
        if step % k == 0:
            torch.manual_seed(100 + step)
            a.update_hessian(lambda: loss(ours, step))
        a.zero_grad()
        loss(ours, step).backward()
        a.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-12)
