"""diffGrad and CLASSP: equation-level tests (no installable official packages)."""
import math

import pytest
import torch

from torchstep.optim import CLASSP, DiffGrad


# --------------------------------------------------------------------------- diffGrad
def _hf_adam_step(t, g, beta1=0.9, beta2=0.999, eps=1e-8, lr=1e-3):
    """HF-flavour Adam step for a constant gradient g at step t (numpy-free scalar math)."""
    m, v = (1 - beta1 ** t) * g, (1 - beta2 ** t) * g * g
    return lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m / (math.sqrt(v) + eps)


def test_first_step_friction_is_sigmoid_of_gradient():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x.grad = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    DiffGrad([x], lr=1e-3).step()
    xi = torch.tensor([0.7311, 0.8808, 0.6225], dtype=torch.float64)   # card values
    steps = torch.tensor([_hf_adam_step(1, g) for g in (1.0, 2.0, 0.5)], dtype=torch.float64)
    torch.testing.assert_close(-x.detach() / steps, xi, rtol=0, atol=1e-4)


def test_constant_gradient_gives_half_an_adam_step():
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = DiffGrad([x], lr=1e-3)
    previous = x.detach().clone()
    for t in range(1, 51):
        x.grad = torch.full((4,), 0.3, dtype=torch.float64)
        opt.step()
        step = (previous - x.detach())
        previous = x.detach().clone()
    assert (step / _hf_adam_step(50, 0.3)).sub(0.5).abs().max() < 1e-6   # ξ = sigmoid(0) = 0.5


def test_previous_gradient_is_a_copy_not_an_alias():
    # The v1 bug: storing .grad by reference makes Δg ≡ 0.  Mutating .grad afterwards must not matter.
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = DiffGrad([x])
    x.grad = torch.tensor([1.0, -1.0], dtype=torch.float64)
    opt.step()
    x.grad.mul_(5.0)                 # caller reuses the buffer in place (zero_grad(set_to_none=False) style)
    assert torch.equal(opt.state[x]["previous_grad"], torch.tensor([1.0, -1.0], dtype=torch.float64))


def test_coupled_weight_decay_enters_the_moments_not_the_grad():
    x = torch.ones(3, dtype=torch.float64, requires_grad=True)
    x.grad = torch.zeros(3, dtype=torch.float64)
    opt = DiffGrad([x], weight_decay=0.1)
    opt.step()
    assert torch.equal(x.grad, torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(opt.state[x]["exp_avg"], torch.full((3,), 0.1 * 0.1, dtype=torch.float64))


# --------------------------------------------------------------------------- CLASSP
def _diffgrad_v2_reference(x0, grads, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, wd=0.0):
    """Transcription of shivram1987/diffGrad ``diffGrad_v2.py`` (per coordinate, plain floats)."""
    x = [float(v) for v in x0]
    m, v, prev = [0.0] * len(x), [0.0] * len(x), [0.0] * len(x)
    for t, g in enumerate(grads, start=1):
        for i, gi in enumerate(g):
            gi = gi + wd * x[i]                       # official: written into p.grad in place
            m[i] = beta1 * m[i] + (1 - beta1) * gi
            v[i] = beta2 * v[i] + (1 - beta2) * gi * gi
            denom = math.sqrt(v[i]) + eps
            xi = 1.0 / (1.0 + math.exp(-abs(prev[i] - gi)))
            prev[i] = gi
            x[i] -= lr * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t) * m[i] * xi / denom
    return x


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_diffgrad_with_varying_gradients_matches_the_official_v2_update(wd):
    # ξ ≠ 0.5 here: the gradients change every step, so |g_prev − g| and the friction vary per coordinate
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(7, generator=g, dtype=torch.float64) for _ in range(25)]
    x = torch.randn(7, generator=g, dtype=torch.float64).requires_grad_()
    x0 = x.detach().tolist()
    opt = DiffGrad([x], lr=1e-2, weight_decay=wd)
    frictions = []
    for gr in grads:
        x.grad = gr.clone()
        prev = opt.state[x]["previous_grad"].clone() if opt.state[x] else torch.zeros(7, dtype=torch.float64)
        frictions.append(torch.sigmoid((prev - (gr + wd * x.detach())).abs()))
        opt.step()
    expected = _diffgrad_v2_reference(x0, [gr.tolist() for gr in grads], lr=1e-2, wd=wd)
    torch.testing.assert_close(x.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-13)
    spread = torch.stack(frictions[1:])
    assert spread.min() < 0.6 and spread.max() > 0.8      # the friction really varies away from 0.5


def _classp_reference(x0, grads, lr, threshold, eps, power):
    """Direct transcription of the paper's per-coordinate rule: the accumulator is the sum of |g_k|^p over
    all past gradients (every coordinate, adjusted or not), current gradient included (our documented choice)."""
    x, acc = [float(v) for v in x0], [0.0] * len(x0)
    for g in grads:
        for i, gi in enumerate(g):
            acc[i] += abs(gi) ** power
            if gi * gi > threshold:
                x[i] -= lr * gi / (eps + acc[i]) ** (1 / power)
    return x


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 0.5])
def test_classp_matches_the_paper_equation(power):
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, generator=g, dtype=torch.float64) for _ in range(12)]
    x = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = CLASSP([x], lr=0.2, threshold=0.3, eps=1e-5, power=power)
    for gr in grads:
        x.grad = gr
        opt.step()
    expected = _classp_reference([0.0] * 6, [gr.tolist() for gr in grads], 0.2, 0.3, 1e-5, power)
    torch.testing.assert_close(x.detach(), torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_classp_threshold_freezes_small_gradient_coordinates_but_charges_every_coordinate():
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    opt = CLASSP([x], threshold=0.5)
    x.grad = torch.tensor([0.1, -2.0, 0.7], dtype=torch.float64)    # g² = 0.01, 4, 0.49
    opt.step()
    assert x[0].item() == 0.0 and x[2].item() == 0.0 and x[1].item() > 0
    assert opt.state[x]["grad_sum"].tolist() == [0.1, 2.0, 0.7]      # the paper's sum over all gradients


@pytest.mark.parametrize("power", [0.1, 0.05])
def test_classp_small_power_keeps_unadjusted_coordinates_finite(power):
    # ε^(−1/p) = (1e-5)^(−10) overflows float32: unadjusted coordinates must stay exactly where they are
    x = torch.zeros(4, requires_grad=True)
    opt = CLASSP([x], threshold=0.5, power=power)
    for _ in range(3):
        x.grad = torch.tensor([0.0, 0.1, -2.0, 0.7])
        opt.step()
        assert torch.isfinite(x).all() and torch.isfinite(opt.state[x]["grad_sum"]).all()
    assert x[0].item() == 0.0 and x[1].item() == 0.0 and x[3].item() == 0.0 and x[2].item() > 0


def test_classp_power_two_zero_threshold_is_adagrad():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(10, generator=g, dtype=torch.float64).requires_grad_()
    y = x.detach().clone().requires_grad_()
    a = CLASSP([x], lr=0.1, threshold=0.0, power=2.0, eps=1e-20)
    b = torch.optim.Adagrad([y], lr=0.1, eps=1e-20)
    for _ in range(30):
        gr = torch.randn(10, generator=g, dtype=torch.float64)
        x.grad, y.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_classp_official_mode_transcribes_the_official_code():
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(5, generator=g, dtype=torch.float64) * 0.3 for _ in range(8)]
    x = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = CLASSP([x], lr=0.2, threshold=0.5, eps=1e-5, power=2.0, compat="official")
    ref, acc = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    for gr in grads:
        x.grad = gr
        opt.step()
        acc += gr.abs()                            # |g| accumulated; `** power` discarded
        ref -= 0.2 / (acc + 1e-5) ** 0.5 * gr       # every coordinate moves (tensor-level test)
    torch.testing.assert_close(x.detach(), ref, rtol=1e-12, atol=1e-14)
    frozen = torch.zeros(2, requires_grad=True)
    opt = CLASSP([frozen], threshold=1.0, compat="official")
    frozen.grad = torch.tensor([5.0, 5.0])
    opt.step()
    assert torch.equal(frozen.detach(), torch.zeros(2))   # `True > 1.0` is False: never updates
