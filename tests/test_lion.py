"""Lion: parity with lion-pytorch, the paper's one-step example, and the ∞-norm box bound."""
import pytest
import torch

from torchstep.optim import Lion


def test_one_step_example_from_the_card():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = Lion([x], lr=0.1)
    x.grad = torch.tensor([0.5, 2.0, 1e-3])
    opt.step()
    assert torch.equal(x.detach(), torch.tensor([0.9, -2.1, 2.9]))  # −η·sign(c), c = 0.1·g


@pytest.mark.parametrize("wd", [0.0, 0.5])
def test_parity_with_lion_pytorch(wd):
    import lion_pytorch   # parity reference (README test command installs it): missing means fail, not skip
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(16, 8, generator=g).requires_grad_(), torch.randn(8, generator=g).requires_grad_()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    a = Lion(ours, lr=3e-3, betas=(0.9, 0.99), weight_decay=wd)
    b = lion_pytorch.Lion(theirs, lr=3e-3, betas=(0.9, 0.99), weight_decay=wd)
    for _ in range(40):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.state[p]["exp_avg"], b.state[q]["exp_avg"], rtol=1e-6, atol=1e-7)


def _box_run(x0, steps, lr=1e-3, wd=2.0):
    c = torch.tensor([3.0, -5.0, 0.2, 0.0], dtype=torch.float64)
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = Lion([x], lr=lr, weight_decay=wd)
    history = [x.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((x - c) ** 2).sum()).backward()
        opt.step()
        history.append(x.detach().clone())
    return c, history


def test_iterates_inside_the_box_stay_inside():
    # Lion with decoupled λ solves min f s.t. ‖x‖∞ ≤ 1/λ (arXiv 2310.05898), λ = 2 → box 0.5
    c, hist = _box_run([0.0] * 4, 3000)
    assert max(h.abs().max().item() for h in hist) <= 0.5 + 1e-12
    assert (hist[-1] - c.clamp(-0.5, 0.5)).abs().max() <= 5e-3  # constrained optimum within 5η


def test_excess_outside_the_box_shrinks_by_one_minus_lr_lambda():
    lr, wd = 1e-3, 2.0
    _, hist = _box_run([10.0, -10.0, 4.0, 0.0], 10_000, lr, wd)
    for prev, cur in zip(hist, hist[1:]):  # |x_{t+1}| ≤ (1 − ηλ)|x_t| + η elementwise
        assert torch.all(cur.abs() <= (1 - lr * wd) * prev.abs() + lr + 1e-12)
    assert hist[-1].abs().max().item() == pytest.approx(0.5, abs=1e-3)
