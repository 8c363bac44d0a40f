"""Regression tests for the correctness audit (core-redesign issue, §3): each fails on the code before it."""
import math

import pytest
import torch

from torchstep.ops.newton_schulz import PRESETS, newton_schulz
from torchstep.ops.shapes import as_matrix, shape_scale
from torchstep.optim import SWAN, AdamW, Lanton, Muon, MuonPP, NorMuon, SinkGD, Spectra


# §3.1 — every Newton–Schulz preset maps a zero matrix to a zero update; the convergent preset is the card's quintic
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_maps_zero_to_zero(preset):
    for shape in [(4, 6), (6, 4), (3, 4, 6)]:
        out = newton_schulz(torch.zeros(shape), steps=12, preset=preset, compute_dtype=torch.float32)
        assert torch.equal(out, torch.zeros(shape))
    w = torch.randn(5, 7, requires_grad=True)
    before = w.detach().clone()
    opt = Muon([w], ns_preset=preset, ns_steps=12, ns_dtype="float32")
    for _ in range(3):
        w.grad = torch.zeros(5, 7)
        opt.step()
    assert torch.equal(w.detach(), before)


def test_convergent_preset_is_the_reference_cards_quintic():
    assert PRESETS["convergent"].coefficients == ((2.0, -1.5, 0.5),)


# §3.2 — any ndim >= 2 tensor is the (out, prod(rest)) matrix for NS, scale, statistics and dual norms
MATRIX_METHODS = [
    ("muon", lambda ps: Muon(ps, lr=0.05, ns_dtype="float32")),
    ("muonpp", lambda ps: MuonPP(ps, lr=0.05, ns_dtype="float32")),
    ("normuon-paper", lambda ps: NorMuon(ps, lr=0.05, ns_dtype="float32")),
    ("normuon-official", lambda ps: NorMuon(ps, compat="official", ns_dtype="float32")),
    ("lanton", lambda ps: Lanton(ps, lr=0.05, ns_dtype="float32")),
    ("lanton-sign", lambda ps: Lanton([{"params": ps, "algo": "lanton", "lmo": "sign"}], lr=0.05)),
    ("sinkgd", lambda ps: SinkGD(ps, lr=0.05)),
    ("swan", lambda ps: SWAN(ps, lr=0.05)),
    ("spectra", lambda ps: Spectra(AdamW(ps, lr=0.05, weight_decay=0.1), c=0.5)),
]


@pytest.mark.parametrize("shape", [(8, 3, 1), (6, 3, 2), (4, 3, 3, 3), (5, 2, 2, 1)])
@pytest.mark.parametrize("name,make", MATRIX_METHODS, ids=[m[0] for m in MATRIX_METHODS])
def test_conv_weights_step_exactly_as_their_flattened_matrix(name, make, shape):
    g = torch.Generator().manual_seed(0)
    conv = torch.randn(shape, generator=g).requires_grad_()
    flat = conv.detach().reshape(shape[0], -1).clone().requires_grad_()
    other = [torch.randn(shape, generator=g).requires_grad_() for _ in range(2)]   # a group of several tensors
    other_flat = [o.detach().reshape(shape[0], -1).clone().requires_grad_() for o in other]
    a, b = make([conv, *other]), make([flat, *other_flat])
    for _ in range(4):
        grads = [torch.randn(shape, generator=g) for _ in range(3)]
        for p, q, gr in zip([conv, *other], [flat, *other_flat], grads):
            p.grad, q.grad = gr, gr.reshape(shape[0], -1).clone()
        a.step(), b.step()
    assert conv.shape == shape
    torch.testing.assert_close(conv.detach().reshape(shape[0], -1), flat.detach(), rtol=1e-6, atol=1e-7)


def test_conv1d_shape_scale_is_sqrt_out_over_in_times_k():
    # (8, 3, 1): √max(1, 8/3) = 1.633, not √2 (old code: a batch of 8 (3×1) matrices)
    assert as_matrix(torch.zeros(8, 3, 1)).shape == (8, 3)
    w = torch.zeros(8, 3, 1, requires_grad=True)
    w.grad = torch.randn(8, 3, 1, generator=torch.Generator().manual_seed(1))
    Muon([w], lr=1.0, momentum=0.0, nesterov=False, ns_preset="convergent", ns_steps=60, ns_dtype="float64").step()
    s = torch.linalg.svdvals(as_matrix(w.detach()).double())
    torch.testing.assert_close(s, torch.full((3,), math.sqrt(8 / 3), dtype=torch.float64), rtol=1e-6, atol=0)
    assert shape_scale("original", 8, 3) == pytest.approx(math.sqrt(8 / 3))


def test_spectra_never_leaves_a_half_applied_step(monkeypatch):
    ps = [torch.randn(4, 4, requires_grad=True) for _ in range(3)]
    opt = Spectra(torch.optim.SGD(ps, lr=0.1), c=0.5)
    for p in ps:
        p.grad = torch.randn(4, 4)
    before = [p.detach().clone() for p in ps]
    calls = []
    real = Spectra._clip

    def failing(self, u, c):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in the second clip")
        return real(self, u, c)

    monkeypatch.setattr(Spectra, "_clip", failing)
    with pytest.raises(RuntimeError, match="injected"):
        opt.step()
    assert all(torch.equal(p.detach(), b) for p, b in zip(ps, before))


# §3.3 — pre-clipping never touches 1-D tensors (official); the vector post-map is tested in test_matrix_ops.py
def test_spectra_pre_clip_leaves_vectors_alone_even_with_apply_to_all():
    W = torch.zeros(4, 6, requires_grad=True)
    b = torch.zeros(6, requires_grad=True)
    opt = Spectra(torch.optim.SGD([W, b], lr=1.0), c=math.inf, pre_clip=0.1, apply_to="all")
    gW = torch.randn(4, 6, generator=torch.Generator().manual_seed(2)) * 10
    gb = torch.full((6,), 10.0)
    W.grad, b.grad = gW, gb
    opt.step()
    assert torch.equal(b.detach(), -gb)                                          # unclipped
    assert torch.linalg.svdvals(W.detach()).max() < 0.1                           # clipped: σ < c
    assert torch.equal(W.grad, gW) and torch.equal(b.grad, gb)                    # callers' gradients untouched


# §3.7 — NorMuon: the paper's algorithm uses plain momentum; its default lr suits the 0.2-RMS scale; adjust_lr
def _normuon_trajectory(**kw):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 32, generator=g).requires_grad_()
    opt = NorMuon([w], ns_dtype="float32", **kw)
    for _ in range(3):
        w.grad = torch.randn(16, 32, generator=g)
        opt.step()
    return w.detach(), opt


def test_normuon_paper_mode_uses_plain_momentum_and_official_mode_nesterov():
    paper, opt = _normuon_trajectory()
    assert opt.param_groups[0]["nesterov"] is None and opt.defaults["lr"] == 3e-3
    torch.testing.assert_close(paper, _normuon_trajectory(nesterov=False)[0], rtol=0, atol=0)
    assert not torch.allclose(paper, _normuon_trajectory(nesterov=True)[0])
    official, opt = _normuon_trajectory(compat="official")
    assert opt.defaults["lr"] == 0.02
    torch.testing.assert_close(official, _normuon_trajectory(compat="official", nesterov=True)[0], rtol=0, atol=0)


def test_normuon_update_rms_in_paper_mode_is_0_2_lr():
    w = torch.zeros(16, 32, requires_grad=True)
    w.grad = torch.randn(16, 32, generator=torch.Generator().manual_seed(4))
    NorMuon([w], ns_dtype="float32").step()
    assert w.detach().square().mean().sqrt().item() == pytest.approx(0.2 * 3e-3, rel=1e-5)


def test_normuon_adjust_lr_is_honoured_in_official_mode_and_rejected_in_paper_mode():
    def step(**kw):
        w = torch.zeros(16, 32, requires_grad=True)
        w.grad = torch.randn(16, 32, generator=torch.Generator().manual_seed(5))
        NorMuon([w], lr=1.0, ns_dtype="float32", compat="official", **kw).step()
        return w.detach()
    default, moonlight = step(), step(adjust_lr="match_rms_adamw")
    ratio = (0.2 * math.sqrt(32)) / math.sqrt(max(1.0, 16 / 32))
    torch.testing.assert_close(moonlight, default * ratio, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="adjust_lr"):
        NorMuon([torch.zeros(4, 4, requires_grad=True)], adjust_lr="original")
