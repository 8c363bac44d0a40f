"""Spectra wrapper: SVD reference, no-op limit, recovered direction, pre-clipping, delegation."""
import io
import math

import pytest
import torch

from torchstep.optim import Lion, Spectra


def _svd_clip(U, c):
    u, s, vh = torch.linalg.svd(U, full_matrices=False)
    return u @ torch.diag(s / (1 + s ** 2 / c ** 2).sqrt()) @ vh


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 16, generator=g).requires_grad_(), torch.randn(16, 48, generator=g).requires_grad_(),
            torch.randn(16, generator=g).requires_grad_()]


@pytest.mark.parametrize("c", [0.5, 5.0])
def test_sgd_base_gives_the_svd_clipped_gradient_step(c):
    ps = _params()
    start = [p.detach().clone() for p in ps]
    g = torch.Generator().manual_seed(1)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * 3
    opt = Spectra(torch.optim.SGD(ps, lr=0.1), c=c)
    opt.step()
    for p, x0 in zip(ps[:2], start):
        s = math.sqrt(max(1.0, p.shape[0] / p.shape[1]))
        expected = x0 - s * 0.1 * _svd_clip(p.grad, c)
        assert ((p.detach() - expected).norm() / (x0 - expected).norm()) < 1e-4
        assert torch.linalg.svdvals((x0 - p.detach()) / (0.1 * s)).max() < c
    torch.testing.assert_close(ps[2].detach(), start[2] - 0.1 * ps[2].grad)   # 1-D untouched with apply_to="2d"


def test_infinite_c_is_a_bit_exact_no_op():
    a, b = _params(), _params()
    wrapped = Spectra(torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1), c=math.inf, apply_to="all")
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for x, y in zip(a, b):
            grad = torch.randn(x.shape, generator=g)
            x.grad, y.grad = grad.clone(), grad.clone()
        wrapped.step(), plain.step()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_large_c_recovers_the_base_direction_with_decoupled_decay_and_the_shape_scale():
    a, b = _params(), _params()
    loose = Spectra(torch.optim.AdamW(a, lr=1e-2, weight_decay=0.1), c=1e6, apply_to="all")
    plain = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1)
    start = [p.detach().clone() for p in a]
    g = torch.Generator().manual_seed(3)
    for x, y in zip(a, b):
        grad = torch.randn(x.shape, generator=g)
        x.grad, y.grad = grad.clone(), grad.clone()
    loose.step(), plain.step()
    for x, y, x0 in zip(a, b, start):
        s = math.sqrt(max(1.0, x.shape[0] / x.shape[1])) if x.dim() == 2 else 1.0
        decayed = x0 * (1 - 1e-2 * 0.1)
        torch.testing.assert_close(decayed - x.detach(), s * (decayed - y.detach()), rtol=1e-4, atol=1e-6)


def test_pre_clip_leaves_the_callers_gradients_untouched_and_clips_what_the_base_sees():
    p = _params()[0]
    p.grad = torch.randn(32, 16) * 10
    grad = p.grad
    snapshot = grad.clone()
    start = p.detach().clone()
    Spectra(torch.optim.SGD([p], lr=1.0), c=math.inf, pre_clip=0.1).step()
    assert p.grad is grad and torch.equal(grad, snapshot)
    assert torch.linalg.svdvals(start - p.detach()).max() < 0.1


def test_delegation_schedulers_checkpoints_and_closure():
    ps = _params()
    opt = Spectra(Lion(ps, lr=1e-3, weight_decay=0.1), c=2.0, apply_to="all")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    loss = opt.step(lambda: sum((p ** 2).sum() for p in ps).backward() or torch.tensor(1.0))
    sched.step()
    assert loss.item() == 1.0 and opt.param_groups[0]["lr"] == 5e-4 and opt.state is opt.base.state
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = Spectra(Lion(_params(), lr=1e-3, weight_decay=0.1), c=2.0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.param_groups[0]["spectra_c"] == 2.0 and len(fresh.state) == 3
    with pytest.raises(ValueError, match="apply_to"):
        Spectra(Lion(_params()), apply_to="some")


def test_c_warmup_keeps_c_times_lr_constant_during_warmup_then_uses_c():
    # official schedule: c_t = c·η_peak/η_t for the first N steps; equal to setting spectra_c by hand
    g = torch.Generator().manual_seed(9)
    a = torch.randn(12, 8, generator=g).requires_grad_()
    b = a.detach().clone().requires_grad_()
    warm = Spectra(torch.optim.SGD([a], lr=0.1), c=0.5, c_warmup_steps=3)
    manual = Spectra(torch.optim.SGD([b], lr=0.1), c=0.5)
    factor = lambda k: min(1.0, (k + 1) / 4)   # noqa: E731  4-step linear lr warm-up
    s1 = torch.optim.lr_scheduler.LambdaLR(warm, factor)
    s2 = torch.optim.lr_scheduler.LambdaLR(manual, factor)
    for k in range(6):
        grad = torch.randn(12, 8, generator=g)
        a.grad, b.grad = grad.clone(), grad.clone()
        manual.param_groups[0]["spectra_c"] = 0.5 / factor(k) if k < 3 else 0.5
        warm.step(), manual.step()
        s1.step(), s2.step()
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert warm.param_groups[0]["spectra_step"] == 6
