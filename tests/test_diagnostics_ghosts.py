"""Ghosts of Softmax (arXiv 2603.13552): the card's worked numbers (diagnostics.md §4, algorithms.md §17), the
radii against the partition function's complex zeros and the Taylor series of the line loss, JVP slopes against
the reverse-mode Jacobian and finite differences (fp64), predicted updates against real steps, the clip, the
controller, the monitor, checkpoints and bad input."""
import copy
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from torchstep.diagnostics.ghosts import (RhoController, SafeRadiusMonitor, SafeStep, binary_radius,
                                          logit_gap_radius, logit_slopes, predict_update, radius_along,
                                          safe_lr, safe_radius, slope_spread, top2_radius)
from torchstep.optim import Lion, Spectra

PI = math.pi
D = torch.float64


def _mlp(seed=0, act=nn.Tanh, d_in=6, width=8, classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), act(), nn.Linear(width, classes)).to(D)


def _batch(seed=1, n=5, d_in=6, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=D), torch.randint(0, classes, (n,), generator=g)


def _direction(model, seed=2, unit=True):
    g = torch.Generator().manual_seed(seed)
    v = {n: torch.randn(p.shape, generator=g, dtype=D) for n, p in model.named_parameters()}
    norm = math.sqrt(sum(float((t * t).sum()) for t in v.values()))
    return {n: t / norm for n, t in v.items()} if unit else v


def _backward(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _partition_zeros(z, a, box=8.0, n=41, iters=80):
    """Zeros of F(t) = Σ_k e^{z_k + a_k t} by Newton from an n×n grid on [−box, box]²; z, a: (cases, C)."""
    z, a = np.atleast_2d(z)[:, None, :], np.atleast_2d(a)[:, None, :]
    re, im = np.meshgrid(np.linspace(-box, box, n), np.linspace(-box, box, n))
    t = np.broadcast_to((re + 1j * im).ravel(), (z.shape[0], n * n)).copy()
    with np.errstate(all="ignore"):
        for _ in range(iters):
            e = np.exp(z + a * t[..., None])
            t = t - e.sum(-1) / (a * e).sum(-1)
        e = np.exp(z + a * t[..., None])
        ok = np.abs(e.sum(-1)) < 1e-10 * np.abs(e).sum(-1)
    return t, ok & np.isfinite(t)


# ---------------------------------------------------------------------------------------------- worked numbers
def test_card_binary_radius_and_its_pi_bound():
    assert binary_radius(1.3, 0.7).item() == pytest.approx(4.857060, abs=1e-6)
    assert binary_radius(-1.3, -0.7).item() == pytest.approx(4.857060, abs=1e-6)   # sign invariance
    assert PI / 0.7 == pytest.approx(4.487990, abs=1e-6)
    assert math.isinf(binary_radius(1.0, 0.0).item())


def test_card_three_classes_nearest_zero_bound_and_top2_estimate():
    z, a = np.array([2.0, 0.5, -1.0]), np.array([0.3, -0.4, 1.1])
    t, ok = _partition_zeros(z, a)
    roots = t[ok]
    nearest = roots[np.argmin(np.abs(roots))]
    assert abs(nearest) == pytest.approx(4.973463, abs=1e-5)
    assert nearest.real == pytest.approx(-2.131198, abs=1e-5)
    assert abs(nearest.imag) == pytest.approx(4.493699, abs=1e-5)
    za, aa = torch.tensor(z[None], dtype=D), torch.tensor(a[None], dtype=D)
    assert safe_radius(aa).item() == pytest.approx(PI / 1.5, abs=1e-12) == pytest.approx(2.094395, abs=1e-6)
    assert top2_radius(za, aa).item() == pytest.approx(4.973317, abs=1e-6)
    assert safe_radius(aa).item() <= abs(nearest)


def test_zero_free_strip_and_binary_radius_is_the_nearest_zero():
    """Thm 4.6: F has no zero with |Im t| < π/Δ_a, so every zero is at least ρ_a away (200 random cases,
    C = 3…8); for C = 2 the nearest zero is exactly √(δ² + π²)/|Δa|."""
    rng = np.random.default_rng(0)
    for c in range(3, 9):
        z, a = rng.normal(size=(34, c)) * 1.5, rng.normal(size=(34, c))
        t, ok = _partition_zeros(z, a, box=12.0, n=13, iters=40)
        bound = PI / (a.max(1) - a.min(1))
        assert ok.any(1).mean() > 0.9
        assert np.all(np.abs(t.imag)[ok] >= np.broadcast_to(bound[:, None], t.shape)[ok] * (1 - 1e-9))
    z, a = rng.normal(size=(20, 2)) * 2, rng.normal(size=(20, 2))
    t, ok = _partition_zeros(z, a, box=20.0, n=31)
    nearest = np.where(ok, np.abs(t), np.inf).min(1)
    exact = binary_radius(torch.tensor(z[:, 0] - z[:, 1]), torch.tensor(a[:, 0] - a[:, 1])).numpy()
    seen = exact < 18   # zeros inside the Newton grid
    assert seen.sum() >= 15
    np.testing.assert_allclose(nearest[seen], exact[seen], rtol=1e-9)


def test_binary_line_loss_taylor_series_converges_inside_and_diverges_beyond_the_radius():
    """A logistic model (logits exactly linear along the line): ρ* from the JVP slopes and the margin is the
    radius of convergence of the cross-entropy's Taylor series in τ — the partial sums reproduce the real
    loss at 0.7ρ*, blow up at 1.3ρ*, and the root test gives ρ* (not the π/Δa bound)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(D)
    with torch.no_grad():
        model.bias.copy_(torch.tensor([1.5, -1.5], dtype=D))
    x, y = torch.tensor([[0.3, -0.2, 0.5]], dtype=D), torch.tensor([1])
    v = _direction(model)
    z, a = (t[0] for t in logit_slopes(model, x, v))
    hi, lo = (0, 1) if z[0] >= z[1] else (1, 0)
    delta, gap = (z[hi] - z[lo]).item(), (a[hi] - a[lo]).item()
    assert delta > 2
    rho = binary_radius(delta, gap).item()

    def line_loss(t):   # −z_y(t) + log Σ e^{z(t)}, branch-safe for |t| < ρ*
        zt = z.numpy() + a.numpy() * t[..., None]
        return -zt[..., y.item()] + zt[..., hi] + np.log1p(np.exp(-(zt[..., hi] - zt[..., lo])))

    def real_loss(tau):
        ps = {n: p.detach() + tau * v[n] for n, p in model.named_parameters()}
        return F.cross_entropy(functional_call(model, ps, (x,)), y).item()

    assert line_loss(np.array(0.4 * rho)) == pytest.approx(real_loss(0.4 * rho), abs=1e-12)
    N, R = 512, 0.9 * rho
    n = np.arange(151)
    coef = np.fft.fft(line_loss(R * np.exp(2j * PI * np.arange(N) / N)))[:151] / N / R ** n
    inside = (coef * (0.7 * rho) ** n).sum()
    assert inside.real == pytest.approx(real_loss(0.7 * rho), abs=1e-10) and abs(inside.imag) < 1e-10
    beyond = np.abs(coef * (1.3 * rho) ** n)
    assert beyond[130:].max() > 1e10 * beyond[:5].max()
    root = (np.abs(coef[100:151]) ** (-1.0 / n[100:])).min()
    assert root == pytest.approx(rho, rel=0.05) and root > 1.15 * PI / abs(gap)


# ---------------------------------------------------------------------------------------------- JVP slopes
def test_jvp_slopes_equal_the_jacobian_and_central_differences_fp64():
    model, (x, _), v = _mlp(), _batch(), _direction(_mlp())
    logits, slopes = logit_slopes(model, x, v)
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)   # reverse mode as the reference (torch.func.jacrev agrees; its first call costs ~2 s)
    jac = torch.autograd.functional.jacobian(
        lambda *ts: functional_call(model, dict(zip(names, ts)), (x,)), tuple(params.values()))
    exact = sum((j * v[n]).flatten(2).sum(-1) for n, j in zip(names, jac))
    torch.testing.assert_close(slopes, exact, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, model(x).detach(), rtol=0, atol=0)
    h = 1e-5
    f = lambda s: functional_call(model, {n: p + s * v[n] for n, p in params.items()}, (x,))  # noqa: E731
    torch.testing.assert_close(slopes, (f(h) - f(-h)) / (2 * h), rtol=1e-5, atol=1e-8)
    shifted = {n: p + 0.1 for n, p in params.items()}                  # at= linearises elsewhere
    _, there = logit_slopes(model, x, v, at=shifted)
    assert not torch.allclose(there, slopes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.testing.assert_close(there, logit_slopes(model, x, v)[1], rtol=1e-14, atol=1e-14)


def test_invariances_sign_temperature_superset_and_max_over_samples():
    model, (x, _), v = _mlp(), _batch(n=8), _direction(_mlp())
    _, a = logit_slopes(model, x, v)
    neg = {n: -t for n, t in v.items()}
    torch.testing.assert_close(safe_radius(logit_slopes(model, x, neg)[1]), safe_radius(a), rtol=1e-14, atol=0)
    _, cooled = logit_slopes(model, x, v, logits_fn=lambda o: o / 3.0)
    torch.testing.assert_close(safe_radius(cooled), 3.0 * safe_radius(a), rtol=1e-14, atol=0)
    assert safe_radius(a) <= safe_radius(a[:4]) and safe_radius(a) <= safe_radius(a[4:])
    torch.testing.assert_close(safe_radius(a), (PI / slope_spread(a)).min(), rtol=1e-15, atol=0)
    # leading axes are samples (tokens): (2, 4, C) is the same set as (8, C)
    torch.testing.assert_close(safe_radius(a.reshape(2, 4, -1)), safe_radius(a), rtol=0, atol=0)


def test_radius_along_an_unnormalised_update_and_modes():
    model, (x, _) = _mlp(), _batch()
    v = _direction(model)
    update = {n: 0.37 * t for n, t in v.items()}
    rad = radius_along(model, x, update)
    assert rad.tau.item() == pytest.approx(0.37, rel=1e-14)
    assert rad.rho.item() == pytest.approx(safe_radius(logit_slopes(model, x, v)[1]).item(), rel=1e-12)
    assert rad.r.item() == pytest.approx(rad.tau.item() / rad.rho.item(), rel=1e-12)
    zero = radius_along(model, x, {n: torch.zeros_like(t) for n, t in v.items()})
    assert math.isinf(zero.rho.item()) and zero.r.item() == 0 and zero.tau.item() == 0
    bn = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).to(D).train()
    stats = bn[1].running_mean.clone()
    radius_along(bn, x, {"0.weight": torch.ones(8, 6, dtype=D)})
    assert bn.training and bn[1].training and torch.equal(bn[1].running_mean, stats)   # eval, then restored
    batch_stats = radius_along(bn, x, {"0.weight": torch.ones(8, 6, dtype=D)}, mode="train")
    bn.eval()
    running = radius_along(bn, x, {"0.weight": torch.ones(8, 6, dtype=D)}, mode="eval")
    assert not bn.training and torch.equal(bn[1].running_mean, stats)   # train mode: batch statistics, buffers kept
    assert batch_stats.rho.item() != pytest.approx(running.rho.item(), rel=1e-3)


# ---------------------------------------------------------------------------------------------- predicted updates
def _state_equal(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def _check_prediction(make, methods, steps=3):
    model = _mlp()
    opt = make(model)
    calls = []
    opt.register_step_post_hook(lambda *args: calls.append(1))
    params = [p for g in opt.param_groups for p in g["params"]]
    g = torch.Generator().manual_seed(5)
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step == 1) else torch.randn(p.shape, generator=g, dtype=D)
        saved, before = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
        grads = [None if p.grad is None else p.grad.clone() for p in params]
        predicted = {m: predict_update(opt, m) for m in methods}
        assert _state_equal(opt.state_dict(), saved) and all(torch.equal(p, b) for p, b in zip(params, before))
        assert all((gr is None) == (p.grad is None) and (gr is None or torch.equal(gr, p.grad))
                   for gr, p in zip(grads, params))
        n_calls = len(calls)
        opt.step()
        assert len(calls) == n_calls + 1     # the prediction fired no hook
        for m, pred in predicted.items():
            for p, b, d in zip(params, before, pred):
                torch.testing.assert_close(d, p.detach() - b, rtol=1e-12, atol=1e-15, msg=m)


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.Adam(m.parameters(), lr=0.01),
    lambda m: torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, maximize=True),
    lambda m: torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01, dtype=D), weight_decay=0.1,
                               decoupled_weight_decay=True),
    lambda m: torch.optim.AdamW([{"params": list(m[0].parameters()), "lr": 0.03},
                                 {"params": list(m[2].parameters())}], lr=0.01, weight_decay=0.1, foreach=True),
], ids=["adam", "adam-l2-amsgrad-maximize", "adam-decoupled-tensor-lr", "adamw-groups-foreach"])
def test_adam_closed_form_and_dry_run_predict_the_real_step_without_touching_state(make):
    _check_prediction(make, ("adam", "dry_run", "auto"))


@pytest.mark.parametrize("make", [
    lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda m: Lion(m.parameters(), lr=1e-3, weight_decay=0.1),
    lambda m: Spectra(torch.optim.SGD(m.parameters(), lr=0.1), c=0.5, apply_to="all"),
], ids=["sgd-nesterov", "torchstep-lion", "spectra-wrapper"])
def test_dry_run_predicts_any_optimizer(make):
    _check_prediction(make, ("dry_run", "auto"))


# ---------------------------------------------------------------------------------------------- SafeStep
def test_card_clip_numbers():
    """‖p‖ = 2, ρ_a = 0.5 → s = 0.25, ‖p̃‖ = 0.5, r = 1 (a linear model built to have exactly these)."""
    model = nn.Linear(2, 3, bias=False).to(D)
    x = torch.tensor([[math.sqrt(2) * PI, 0.0]], dtype=D)
    step = torch.tensor([[math.sqrt(2), 0], [-math.sqrt(2), 0], [0, 0]], dtype=D)   # ‖Δθ‖ = 2, slopes ±2π
    w0 = model.weight.detach().clone()
    model.weight.grad = -step
    grad = model.weight.grad
    safe = SafeStep(torch.optim.SGD(model.parameters(), lr=1.0), model)
    safe.step(inputs=x)
    last = {k: v.item() for k, v in safe.last.items()}
    assert last == pytest.approx({"rho": 0.5, "tau": 0.5, "r": 1.0, "scale": 0.25}, rel=1e-14)
    torch.testing.assert_close(model.weight.detach() - w0, 0.25 * step, rtol=1e-14, atol=1e-15)
    assert model.weight.grad is grad and torch.equal(grad, -step)    # p.grad untouched


@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_clip_never_exceeds_the_fraction_and_keeps_the_direction(fraction):
    model, (x, y) = _mlp(), _batch()
    plain = copy.deepcopy(model)
    safe = SafeStep(torch.optim.Adam(model.parameters(), lr=1.0), model, fraction=fraction)
    base = torch.optim.Adam(plain.parameters(), lr=1.0)
    for _ in range(3):
        _backward(model, x, y), _backward(plain, x, y)
        grads = [p.grad.clone() for p in model.parameters()]
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        proposed = {n: d for n, d in zip(start, predict_update(base))}
        safe.step(inputs=x)
        base.step()
        applied = {n: p.detach() - start[n] for n, p in model.named_parameters()}
        rad = radius_along(model, x, applied, at=start)
        assert safe.last["scale"].item() < 1
        assert rad.tau.item() <= fraction * rad.rho.item() * (1 + 1e-12)
        assert rad.r.item() == pytest.approx(fraction, rel=1e-12)
        s = safe.last["scale"].item()
        for n in applied:   # p̃ = s·p along the base's own direction
            torch.testing.assert_close(applied[n], s * proposed[n], rtol=1e-10, atol=1e-14)
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))
        with torch.no_grad():   # keep the plain twin at the same point so both see the same state sequence
            for p, q in zip(plain.parameters(), model.parameters()):
                p.copy_(q)


def test_inside_the_radius_the_step_is_bit_identical_to_the_base():
    model, (x, y) = _mlp(), _batch()
    plain = copy.deepcopy(model)
    safe = SafeStep(torch.optim.Adam(model.parameters(), lr=1e-5), model)
    base = torch.optim.Adam(plain.parameters(), lr=1e-5)
    for _ in range(3):
        _backward(model, x, y), _backward(plain, x, y)
        safe.step(inputs=x), base.step()
        assert safe.last["scale"].item() == 1 and safe.last["r"].item() < 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))


def test_set_batch_closure_and_no_host_sync():
    model, (x, y) = _mlp(), _batch()
    safe = SafeStep(torch.optim.SGD(model.parameters(), lr=10.0), model)
    safe.set_batch(x)

    def closure():
        model.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    class NoSync(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
                        torch.Tensor.__int__):
                raise AssertionError(f"host sync: {func}")
            return func(*args, **(kwargs or {}))

    closure()
    with NoSync():
        safe.step()
    assert safe.step(closure) is not None and safe.last["r"].item() <= 1 + 1e-12


def test_state_dict_round_trip_resumes_bit_exactly():
    model, (x, y) = _mlp(), _batch()
    safe = SafeStep(torch.optim.Adam(model.parameters(), lr=0.5), model, fraction=0.7)
    for _ in range(3):
        _backward(model, x, y), safe.step(inputs=x)
    buf = io.BytesIO()
    torch.save(safe.state_dict(), buf)
    buf.seek(0)
    twin = copy.deepcopy(model)
    resumed = SafeStep(torch.optim.Adam(twin.parameters(), lr=0.5), twin, fraction=0.2)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.param_groups[0]["safe_fraction"] == 0.7 and resumed.state is resumed.base.state
    for _ in range(2):
        _backward(model, x, y), _backward(twin, x, y)
        safe.step(inputs=x), resumed.step(inputs=x)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


# ---------------------------------------------------------------------------------------------- controller
def test_safe_lr_formula_and_card_numbers():
    assert safe_lr(1.0, 0.5, 2.0, target=0.5) == 0.125 == safe_lr(1e-9, 0.5, 2.0, 0.5, "set")   # card: η = 0.125
    for lr, rho, p in [(0.1, 1.0, 5.0), (0.1, 1.0, 20.0), (0.3, 2.0, 1.0)]:   # the lr-spike rule
        assert safe_lr(lr, rho, p) == (rho / p if lr * p > rho else lr)
    assert safe_lr(0.1, math.inf, 3.0, lr_mode="set") == 0.1 and safe_lr(0.1, 1.0, 0.0) == 0.1


def test_jvp_controller_equals_the_clip_and_the_tutorial_form():
    """On Adam (update ∝ lr) the paper's pre-step controller η_eff = min(η, r·ρ_a/‖p‖) and the post-hoc
    SafeStep clip take the same steps; the scheduled lr is restored."""
    model, (x, y) = _mlp(), _batch()
    twin, ref = copy.deepcopy(model), copy.deepcopy(model)
    ctl = RhoController(torch.optim.Adam(model.parameters(), lr=0.5), model, target=0.5)
    clip = SafeStep(torch.optim.Adam(twin.parameters(), lr=0.5), twin, fraction=0.5)
    adam = torch.optim.Adam(ref.parameters(), lr=0.5)
    for _ in range(4):
        for m in (model, twin, ref):
            _backward(m, x, y)
        names = [n for n, _ in ref.named_parameters()]
        pred = predict_update(adam)
        rad = radius_along(ref, x, dict(zip(names, pred)))
        p_norm = rad.tau.item() / 0.5                                  # ‖m̂/(√v̂+ε)‖
        adam.param_groups[0]["lr"] = safe_lr(0.5, rad.rho.item(), p_norm, target=0.5)
        ctl.step(inputs=x), clip.step(inputs=x), adam.step()
        adam.param_groups[0]["lr"] = 0.5
        assert ctl.param_groups[0]["lr"] == 0.5 and ctl.last["r"] == pytest.approx(0.5, rel=1e-12)
        for p, q, r in zip(model.parameters(), twin.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(p, r, rtol=0, atol=0)


def test_set_mode_steps_exactly_target_times_the_radius():
    model, (x, y) = _mlp(), _batch()
    ctl = RhoController(torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9), model, target=0.5, lr_mode="set")
    for _ in range(3):
        _backward(model, x, y)
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        ctl.step(inputs=x)
        applied = {n: p.detach() - start[n] for n, p in model.named_parameters()}
        rad = radius_along(model, x, applied, at=start)
        assert rad.r.item() == pytest.approx(0.5, rel=1e-9) and ctl.last["lr_scale"] > 1


def test_logit_gap_proxy_matches_rho_scaled_adam():
    """The official test case (logits (0, 2, 1) → ρ = π/(2 + 1e-6)) and the proxy's lr: η·clip(ρ, floor, cap)
    per group on Adam with coupled L2 decay."""
    official = logit_gap_radius(torch.tensor([[0.0, 2.0, 1.0]], dtype=D)).item()
    assert official == pytest.approx(PI / (2 + 1e-6), rel=1e-14)
    model, (x, y) = _mlp(), _batch()
    ref = copy.deepcopy(model)
    def groups(m):
        return [{"params": list(m[0].parameters()), "rho_cap": 0.5}, {"params": list(m[2].parameters())}]

    ctl = RhoController(torch.optim.Adam(groups(model), lr=0.01, weight_decay=1e-3), model,
                        controller="logit_gap", floor=0.01, cap=1.0)
    adam = torch.optim.Adam([{"params": g["params"]} for g in groups(ref)], lr=0.01, weight_decay=1e-3)
    for scale_logits in (1.0, 0.1, 100.0):   # cap 0.5 / 1.0 bind, the radius itself, the floor
        for m in (model, ref):
            _backward(m, x, y)
        logits = model(x).detach() * scale_logits
        rho = PI / ((logits.max(1).values - logits.min(1).values).mean().item() + 1e-6)
        for g, c in zip(adam.param_groups, (0.5, 1.0)):
            g["lr"] = 0.01 * max(min(rho, c), 0.01)
        ctl.step(logits=logits), adam.step()
        assert ctl.last["rho"] == pytest.approx(rho, rel=1e-12)
        assert [g["lr"] for g in ctl.param_groups] == [0.01, 0.01]
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    _backward(model, x, y)
    expected = logit_gap_radius(model.eval()(x)).item()
    model.train()
    ctl.step(inputs=x)   # without logits: one no-grad forward on the inputs (eval mode)
    assert ctl.last["rho"] == pytest.approx(expected, rel=1e-14)


# ---------------------------------------------------------------------------------------------- monitor
def test_monitor_records_rho_tau_r_every_k_steps_and_round_trips():
    model, (x, y) = _mlp(), _batch()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    mon = SafeRadiusMonitor(every=2)
    names = [n for n, _ in model.named_parameters()]
    for step in range(5):
        _backward(model, x, y)
        expected = radius_along(model, x, dict(zip(names, predict_update(opt))))
        record = mon(step, model=model, optimizer=SafeStep(opt, model), loss_fn=F.cross_entropy, batch=(x, y))
        opt.step()
        if step % 2:
            assert record is None
            continue
        assert record == pytest.approx({"step": step, "rho": expected.rho.item(), "tau": expected.tau.item(),
                                        "r": expected.r.item()}, rel=1e-12)
        assert record["r"] == pytest.approx(record["tau"] / record["rho"], rel=1e-12)
    assert [r["step"] for r in mon.history] == [0, 2, 4]
    other = SafeRadiusMonitor()
    other.load_state_dict(copy.deepcopy(mon.state_dict()))
    assert other.history == mon.history and other.every == 2


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors():
    model, (x, y) = _mlp(), _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0.0, -1.0, math.nan, "1"):
        with pytest.raises(ValueError, match="fraction"):
            SafeStep(opt, model, fraction=bad)
    with pytest.raises(ValueError, match="mode"):
        SafeStep(opt, model, mode="test")
    with pytest.raises(TypeError, match="model"):
        SafeStep(opt, lambda t: t)
    with pytest.raises(TypeError, match="Optimizer"):
        SafeStep(model, model)
    with pytest.raises(TypeError, match="logits_fn"):
        SafeStep(opt, model, logits_fn=3)
    with pytest.raises(ValueError, match="not parameters of the model"):
        SafeStep(torch.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.ones(2))], lr=0.1), model)
    safe = SafeStep(opt, model)
    _backward(model, x, y)
    start = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="inputs"):
        safe.step()
    with pytest.raises(ValueError, match="class axis"):   # a logits_fn returning a scalar: the step is undone
        SafeStep(opt, model, logits_fn=lambda o: o.sum()).step(inputs=x)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    for kwargs, name in [({"target": 0.0}, "target"), ({"controller": "hessian"}, "controller"),
                         ({"lr_mode": "clip"}, "lr_mode"), ({"floor": 0.0}, "floor"),
                         ({"floor": 0.5, "cap": 0.1}, "cap"), ({"predict": "guess"}, "predict")]:
        with pytest.raises(ValueError, match=name):
            RhoController(opt, model, **kwargs)
    with pytest.raises(ValueError, match="method"):
        predict_update(opt, "adam")
    with pytest.raises(ValueError, match="method"):
        predict_update(opt, "newton")
    with pytest.raises(ValueError, match="not parameters"):
        logit_slopes(model, x, {"nope": torch.ones(1)})
    with pytest.raises(ValueError, match="shape"):
        logit_slopes(model, x, {"0.weight": torch.ones(3, dtype=D)})
    with pytest.raises(ValueError, match="empty"):
        logit_slopes(model, x, {})
    with pytest.raises(ValueError, match="C >= 2"):
        top2_radius(torch.ones(3, 1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="lr_mode"):
        safe_lr(0.1, 1.0, 1.0, lr_mode="up")
    with pytest.raises(ValueError, match="optimizer"):
        SafeRadiusMonitor()(0, model=model, optimizer=None, loss_fn=F.cross_entropy, batch=(x, y))
    with pytest.raises(ValueError, match="every"):
        SafeRadiusMonitor(every=0)


def test_every_public_name_documents_each_argument_and_the_paper():
    import inspect

    import torchstep.diagnostics.ghosts as ghosts
    assert "2603.13552" in ghosts.__doc__
    for name in ghosts.__all__:
        obj = getattr(ghosts, name)
        if name == "SafeRadius":
            continue
        fn = obj.__init__ if inspect.isclass(obj) else obj
        doc = (inspect.getdoc(obj) or "").split("Args:", 1)
        assert len(doc) == 2, name
        params = [p for p in inspect.signature(fn).parameters if p != "self"]
        assert [p for p in params if p not in doc[1]] == [], name
