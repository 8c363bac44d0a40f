"""SPAM and Stable-SPAM: resets, warm-up, spike clipping, AdaClip/AdaGN, both compat modes."""
import math

import pytest
import torch

from torchstep.optim import SPAM, StableSPAM


def _update_sizes(opt, x, grads):
    sizes = []
    for g in grads:
        before = x.detach().clone()
        x.grad = torch.full_like(x, g)
        opt.step()
        sizes.append((before - x.detach()).abs().max().item())
    return sizes


# --------------------------------------------------------------------------- SPAM
def test_spam_official_trace_reset_and_warmup():
    # Card trace: ΔT = 10, N = 5, constant g = 1, lr 1: |update| 1.0 → 0.0048 at the reset → 0.93 five steps later
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SPAM([x], lr=1.0, reset_interval=10, warmup_steps=5, grad_accu_steps=2, compat="official")
    sizes = _update_sizes(opt, x, [1.0] * 15)
    assert sizes[0] == pytest.approx(1.0, abs=1e-3)
    assert sizes[9] == pytest.approx(0.0048, abs=1e-4)      # t = 10: moments reset, ramp 0.01, bc not reset
    assert sizes[14] == pytest.approx(0.93, abs=5e-3)       # t = 15: ramp finished
    assert opt.state[x]["step"].item() == 15


def _fresh_moment_step(t, beta1=0.9, beta2=0.999, eps=1e-6):
    """HF-flavour Adam step for g = 1 with moments holding one step of g and bias correction at step t."""
    return (1 - beta1) / (math.sqrt(1 - beta2) + eps) * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)


def test_spam_default_keeps_the_global_step_in_the_bias_correction():
    # the official code never resets the counter and nothing shows the paper does: s = t by default
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SPAM([x], lr=1.0, reset_interval=10, warmup_steps=5, grad_accu_steps=2)
    sizes = _update_sizes(opt, x, [1.0] * 16)
    assert sizes[9] == pytest.approx(0.01 * _fresh_moment_step(10), rel=1e-9)     # 0.01 × 0.4844…
    assert _fresh_moment_step(10) == pytest.approx(0.4844, abs=1e-4)
    assert _fresh_moment_step(500) == pytest.approx(1.98, abs=0.01)     # ΔT = 500: ≈2× a normal step before the ramp


def test_spam_reset_step_counter_restarts_bias_correction_with_the_moments():
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SPAM([x], lr=1.0, reset_interval=10, warmup_steps=5, grad_accu_steps=2, reset_step_counter=True)
    sizes = _update_sizes(opt, x, [1.0] * 16)
    assert sizes[9] == pytest.approx(0.01 * sizes[0], rel=1e-9)        # fresh Adam step × ramp 0.01
    ramp = [SPAM.warmup_factor(t, 10, 5) for t in range(10, 16)]
    assert ramp == pytest.approx([1 - 0.99 * 0.5 * (1 + math.cos(math.pi * r / 5)) for r in range(5)] + [1.0],
                                 rel=1e-12)
    assert ramp[0] == pytest.approx(0.01)
    assert sizes[15] == pytest.approx(sizes[6], rel=1e-9)   # t = 16: 7th step of fresh moments, like t = 7


def test_spam_official_ramp_is_the_cosine_over_n_plus_one_steps():
    # official CosineAnnealingLR(T_max = N + 1), N = 5: 0.01, 0.0763, 0.2575, 0.505, 0.7525, then exactly 1
    official = [SPAM.warmup_factor(t, 10, 5, official=True) for t in range(10, 16)]
    assert official == pytest.approx([0.01, 0.07632, 0.2575, 0.505, 0.7525, 1.0], abs=1e-4)
    paper = [SPAM.warmup_factor(t, 10, 5) for t in range(10, 16)]
    assert paper[1] == pytest.approx(0.1045, abs=1e-4) and paper[1] != pytest.approx(official[1], abs=1e-3)


def test_spam_moments_are_zero_right_after_each_reset():
    x = torch.zeros(3, requires_grad=True)
    opt = SPAM([x], reset_interval=4, warmup_steps=2, grad_accu_steps=1, threshold=0)
    for t in range(1, 13):
        x.grad = torch.randn(3)
        m_before = opt.state[x]["exp_avg"].clone() if opt.state[x] else None
        opt.step()
        if t % 4 == 0:  # the step's moments hold only this step's gradient
            torch.testing.assert_close(opt.state[x]["exp_avg"], 0.1 * x.grad)
            assert not torch.allclose(m_before, torch.zeros(3))


@pytest.mark.parametrize("threshold,bound", [(100.0, 0.15811388300841897), (400.0, 0.31622776601683794)])
def test_spam_clips_spikes_to_sqrt_threshold_times_v(threshold, bound):
    # step 1 (unclipped, A = 2): g = 0.5 → v = (1 − 0.999)·0.25 = 2.5e-4; step 2's bound √(τ·v): 0.1581 for τ = 100, 0.3162 for 400
    # (√v alone would be 0.0158: the numbers pin τ inside the root)
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = SPAM([x], lr=1e-3, threshold=threshold, grad_accu_steps=2, reset_interval=0)
    x.grad = torch.full((4,), 0.5, dtype=torch.float64)
    opt.step()
    assert opt.state[x]["exp_avg_sq"].tolist() == pytest.approx([2.5e-4] * 4, rel=1e-12)
    m = opt.state[x]["exp_avg"].clone()
    spike = torch.tensor([0.1, 50.0, -50.0, 0.15], dtype=torch.float64)
    x.grad = spike
    opt.step()
    clipped = torch.tensor([0.1, bound, -bound, 0.15], dtype=torch.float64)
    torch.testing.assert_close(opt.state[x]["exp_avg"], 0.9 * m + 0.1 * clipped, rtol=1e-12, atol=0)
    assert torch.equal(x.grad, spike)   # clipping acted on a copy


@pytest.mark.parametrize("accu", [0, 1])
def test_spam_rejects_accumulation_steps_that_would_freeze_everything(accu):
    with pytest.raises(ValueError, match="grad_accu_steps"):
        SPAM([torch.zeros(2, requires_grad=True)], grad_accu_steps=accu)
    SPAM([torch.zeros(2, requires_grad=True)], grad_accu_steps=accu, threshold=0)   # no clipping: harmless


def test_spam_no_clipping_during_the_first_accumulation_steps_after_a_reset():
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = SPAM([x], threshold=1.0, reset_interval=10, grad_accu_steps=3, warmup_steps=1)
    for t in range(1, 14):
        x.grad = torch.full((1,), 1000.0 if t in (2, 11, 12, 13) else 1.0, dtype=torch.float64)
        v_prev = opt.state[x]["exp_avg_sq"].clone() if opt.state[x] else None
        m_prev = opt.state[x]["exp_avg"].clone() if opt.state[x] else None
        opt.step()
        if t in (2, 11, 12):        # t < A, or t mod ΔT < A: spikes pass unclipped
            expected = 0.9 * (m_prev if t != 10 else 0) + 100.0
            assert opt.state[x]["exp_avg"].item() == pytest.approx(expected.item(), rel=1e-12)
        if t == 13:                 # t mod ΔT = 3 ≥ A: clipped to √(v_prev)
            assert opt.state[x]["exp_avg"].item() == pytest.approx(
                0.9 * m_prev.item() + 0.1 * math.sqrt(v_prev.item()), rel=1e-12)


def test_spam_without_clipping_and_resets_is_hf_adam_with_decay_after_the_step():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_()
    ref = x.detach().clone()
    m = torch.zeros(5, dtype=torch.float64)
    v = torch.zeros(5, dtype=torch.float64)
    lr, wd, eps = 1e-2, 0.1, 1e-6
    opt = SPAM([x], lr=lr, weight_decay=wd, eps=eps, threshold=0, reset_interval=0)
    for t in range(1, 31):
        gr = torch.randn(5, generator=g, dtype=torch.float64)
        x.grad = gr
        opt.step()
        m = 0.9 * m + 0.1 * gr
        v = 0.999 * v + 0.001 * gr ** 2
        ref = ref - lr * (m / (v.sqrt() + eps)) * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
        ref = ref - lr * wd * ref
    torch.testing.assert_close(x.detach(), ref, rtol=1e-12, atol=1e-12)


def test_spam_without_features_matches_torch_adam_up_to_eps_flavour():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, generator=g).requires_grad_()
    y = x.detach().clone().requires_grad_()
    a = SPAM([x], lr=1e-3, eps=1e-12, threshold=0, reset_interval=0)
    b = torch.optim.AdamW([y], lr=1e-3, eps=1e-12, weight_decay=0)
    for _ in range(200):
        gr = torch.randn(50, generator=g)
        x.grad, y.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- Stable-SPAM
def test_stablespam_schedule_factor_values():
    f = StableSPAM.schedule_factor
    assert [round(f(t, 100, 0.5, True), 4) for t in (1, 50, 100, 150)] == [0.9999, 0.7539, 0.5001, 0.7383]
    assert f(150, 100, 0.5, False) == pytest.approx(0.5)   # paper mode stays at eta_min
    assert f(10, None, 0.5, True) == 1.0


def test_adagn_normalises_a_constant_norm_to_one_and_a_jump_to_the_hand_computed_kappa():
    # Official code (and paper): g ← g/‖g‖ · m̂/(√v̂ + ε) — an Adam step on the norm, so a
    # constant norm gives an output of norm ≈ 1 (the reference card's "→ ‖g‖" does not match the code).
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([x], betas=(0.0, 0.999), gamma1=0.9, gamma2=0.9, adaclip=False, reset_interval=0)
    grad = torch.tensor([3.0, 4.0, 0.0, 0.0], dtype=torch.float64)   # ‖g‖ = 5
    for _ in range(30):
        x.grad = grad
        opt.step()
    assert opt.state[x]["exp_avg"].norm().item() == pytest.approx(1.0, rel=1e-6)   # β1 = 0 ⇒ m = g̃
    x.grad = 100 * grad
    a_prev, c_prev = opt.state[x]["norm_avg"].item(), opt.state[x]["norm_sq_avg"].item()
    opt.step()
    a, c = 0.9 * a_prev + 0.1 * 500, 0.9 * c_prev + 0.1 * 500 ** 2
    kappa = (a / (1 - 0.9 ** 31)) / (math.sqrt(c / (1 - 0.9 ** 31)) + 1e-8)
    assert opt.state[x]["exp_avg"].norm().item() == pytest.approx(kappa, rel=1e-6)
    assert torch.equal(x.grad, 100 * grad)


def test_adaclip_puts_the_largest_entry_on_the_running_max():
    x = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([x], betas=(0.0, 0.999), gamma3=0.9, adagn=False, reset_interval=0)
    for _ in range(5):
        x.grad = torch.tensor([1.0, -0.5, 0.2, 0.0], dtype=torch.float64)
        opt.step()
    spike = torch.tensor([10.0, -0.5, 3.0, 0.0], dtype=torch.float64)
    M = opt.state[x]["max_abs_avg"].item()
    x.grad = spike
    opt.step()
    M_hat = (0.9 * M + 0.1 * 10.0) / (1 - 0.9 ** 6)
    out = opt.state[x]["exp_avg"]
    assert out[0].item() == pytest.approx(M_hat, rel=1e-12)          # largest entry lands on M̂
    assert out[2].item() == pytest.approx(3.0 * M_hat / 10.0, rel=1e-12)  # above M̂: rescaled
    assert out[1].item() == -0.5 and out[3].item() == 0.0            # below M̂: untouched


@pytest.mark.parametrize("compat", ["paper", "official"])
def test_stablespam_reset_step(compat):
    x = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([x], lr=1.0, adaclip=False, adagn=False, reset_interval=5, compat=compat)
    sizes = _update_sizes(opt, x, [1.0] * 7)
    m5 = 1 - 0.9 ** 5
    v5 = 1 - 0.999 ** 5
    if compat == "official":
        # old moments, step-1 bias corrections: (m/0.1)/(√(v/0.001) + ε)
        assert sizes[4] == pytest.approx((m5 / 0.1) / (math.sqrt(v5 / 0.001) + 1e-8), rel=1e-9)
        assert sizes[4] == pytest.approx(1.83, abs=5e-3)        # card: 1.0 → 1.83 → 0.74
        # the reset step's gradient was lost: moments hold one gradient but bias-correct for two
        assert sizes[5] == pytest.approx((0.1 / 0.19) / math.sqrt(0.001 / (1 - 0.999 ** 2)), rel=1e-6)
        assert sizes[5] == pytest.approx(0.74, abs=5e-3)
    else:
        assert sizes[4] == pytest.approx(sizes[0], rel=1e-9)   # fresh moments hold this step's gradient
        assert sizes[5] == pytest.approx(sizes[1], rel=1e-9)


def test_stablespam_with_everything_off_is_torch_adamw():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(40, generator=g).requires_grad_()
    y = x.detach().clone().requires_grad_()
    a = StableSPAM([x], lr=1e-3, weight_decay=0.1, adaclip=False, adagn=False, reset_interval=0)
    b = torch.optim.AdamW([y], lr=1e-3, weight_decay=0.1)
    for _ in range(200):
        gr = torch.randn(40, generator=g)
        x.grad, y.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    torch.testing.assert_close(x, y, rtol=0, atol=2e-7)


def test_stablespam_official_adaclip_counter_restarts_after_a_reset():
    x = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    opt = StableSPAM([x], betas=(0.0, 0.999), gamma3=0.9, adagn=False, reset_interval=3, compat="official")
    for _ in range(4):                     # t = 4: counter restarted at the reset (t = 3) → 2
        x.grad = torch.tensor([1.0, 0.5], dtype=torch.float64)
        opt.step()
    M = opt.state[x]["max_abs_avg"].item()
    x.grad = torch.tensor([10.0, 0.5], dtype=torch.float64)
    opt.step()                             # t = 5 → counter 3
    M_hat = (0.9 * M + 1.0) / (1 - 0.9 ** 3)
    assert opt.state[x]["exp_avg"][0].item() == pytest.approx(min(10.0, M_hat), rel=1e-12)


def test_stablespam_zero_gradient_is_safe():
    x = torch.ones(3, requires_grad=True)
    opt = StableSPAM([x])
    x.grad = torch.zeros(3)
    opt.step()
    assert torch.isfinite(x).all() and torch.equal(x.detach(), torch.ones(3))


def test_stablespam_zero_gradient_with_the_bf16_recipe_stays_finite():
    # γ1 = 0.85, γ2 = 0.99999: after a jump in gradient norm κ = â/√ĉ > 4, and κ/‖g‖ at ‖g‖ = 0 overflowed
    # float32 (κ/tiny > 3.4e38) so 0·inf poisoned parameters and moments; the official code only rescales
    # when ‖g‖ > 0.  (AdaClip off: it would clip the jump that makes κ large.)
    x = torch.randn(8, requires_grad=True)
    opt = StableSPAM([x], gamma1=0.85, gamma2=0.99999, adaclip=False)
    g = torch.Generator().manual_seed(0)
    for t in range(1005):
        x.grad = torch.randn(8, generator=g) * (1e-3 if t < 1000 else 1.0)   # norms ≈ 0.003, then ≈ 2.8
        opt.step()
    s = opt.state[x]
    x.grad = torch.zeros(8)
    a_hat = 0.85 * s["norm_avg"] / (1 - 0.85 ** 1006)               # the EMAs after the zero step
    c_hat = 0.99999 * s["norm_sq_avg"] / (1 - 0.99999 ** 1006)
    assert float(a_hat / (c_hat.sqrt() + 1e-8)) > 4
    before = x.detach().clone()
    for _ in range(3):
        opt.step()
        x.grad = torch.zeros(8)
    assert torch.isfinite(x).all() and all(torch.isfinite(v).all() for v in s.values())
    assert (x.detach() - before).abs().max() < 1e-2        # the old moments still move x a little, finitely
