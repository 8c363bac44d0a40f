"""Gram Newton–Schulz (``method="gram"`` / ``ns_method="gram"``) against the standard iteration.

Bands stated here (measured on this file's inputs, 64 × {64, 256, 512}, Gaussian and ill-conditioned
σ ∈ logspace(-4, 0)):

* float64: gram ≡ standard to 1e-10 relative (the two are the same polynomial in exact arithmetic), with
  any restart schedule;
* float32 (default: no restart): ≤ 2e-3 relative Frobenius distance to the float64 standard iteration
  (observed ≤ 9e-4 for Polar Express on ill-conditioned input, ≤ 2e-4 otherwise);
* bfloat16 (default: restart every 2nd iteration): singular values inside the standard bf16 output's
  [σ_min − 0.05, σ_max + 0.05], and distance to the SVD polar factor U·Vᵀ at most the standard bf16
  distance + 0.03;
* float16 (default: restart every 3rd iteration, i.e. once in 5 steps): distance to the float64 standard
  iteration at most 2× the standard fp16 distance + 2e-3 (observed ≤ 1.4×) and at most a third of the standard
  bf16 (= torch.optim.Muon) distance, singular values inside the standard fp16 output's [σ_min − 0.01,
  σ_max + 0.01] (also tall, aspect 4 and 8, Gaussian and ill-conditioned).
"""
from __future__ import annotations

import copy

import pytest
import torch

from torchstep.ops.newton_schulz import (GRAM_AUTO_ASPECT, default_restarts, flops, newton_schulz,
                                         newton_schulz_many)
from torchstep.optim import Muon

PRESETS = ("quintic", "polar_express5")
ASPECTS = (1, 4, 8)
M = 64


def _matrix(m: int, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.logspace(-4, 0, k, dtype=torch.float64)) @ V.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _polar(G: torch.Tensor) -> torch.Tensor:
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("kind", ("gaussian", "illcond"))
def test_float64_gram_is_the_same_polynomial(preset, aspect, kind):
    G = _matrix(M, M * aspect, kind)
    ref = newton_schulz(G, preset=preset, compute_dtype=torch.float64)
    for restarts in (None, (), (2,), (1, 2, 3, 4)):
        out = newton_schulz(G, preset=preset, compute_dtype=torch.float64, method="gram", restarts=restarts)
        assert _rel(out, ref) < 1e-10, restarts


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("kind", ("gaussian", "illcond"))
def test_float32_agrees_with_float64_standard(preset, aspect, kind):
    G = _matrix(M, M * aspect, kind)
    ref = newton_schulz(G, preset=preset, compute_dtype=torch.float64)
    std = newton_schulz(G.float(), preset=preset, compute_dtype=torch.float32)
    gram = newton_schulz(G.float(), preset=preset, compute_dtype=torch.float32, method="gram")
    assert _rel(std, ref) < 1e-4
    assert _rel(gram, ref) < 2e-3


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("aspect", ASPECTS)
@pytest.mark.parametrize("kind", ("gaussian", "illcond"))
def test_bfloat16_same_band_as_standard_vs_svd(preset, aspect, kind):
    G = _matrix(M, M * aspect, kind).float()
    polar = _polar(G)
    std = newton_schulz(G, preset=preset)
    gram = newton_schulz(G, preset=preset, method="gram")
    assert gram.dtype == G.dtype and gram.shape == G.shape
    s_std, s_gram = torch.linalg.svdvals(std.double()), torch.linalg.svdvals(gram.double())
    assert s_gram.min() >= s_std.min() - 0.05 and s_gram.max() <= s_std.max() + 0.05
    assert _rel(gram, polar) <= _rel(std, polar) + 0.03


def test_bfloat16_restart_is_needed_and_default_restarts():
    assert default_restarts(5, torch.bfloat16) == (2, 4)
    assert default_restarts(5, torch.float16) == (3,)                 # one restart, after 3 of 5 iterations
    assert default_restarts(5, torch.float32) == () == default_restarts(5, torch.float64)
    assert default_restarts(12, torch.bfloat16) == (2, 4, 6, 8, 10)
    assert default_restarts(12, torch.float16) == (3, 6, 9)
    assert default_restarts(3, torch.float16) == ()
    G = _matrix(M, 4 * M, "illcond").float()
    ref = newton_schulz(G.double(), preset="polar_express5", compute_dtype=torch.float64)
    err = {r: _rel(newton_schulz(G, preset="polar_express5", method="gram", restarts=r), ref)
           for r in ((), (2,), (2, 4))}
    std = _rel(newton_schulz(G, preset="polar_express5"), ref)
    # without a restart bf16 drift is catastrophic on an ill-conditioned input; every 2nd step restores the band
    assert err[()] > 1.0 > 0.1 + std >= err[(2, 4)]
    assert err[(2, 4)] < err[(2,)] < err[()]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("aspect", (4, 8, -4))                    # -4: tall (4m × m)
@pytest.mark.parametrize("kind", ("gaussian", "illcond"))
def test_float16_gram_default_in_band(preset, aspect, kind):
    G = _matrix(M, M * abs(aspect), kind)
    G = (G.T.contiguous() if aspect < 0 else G).float()
    exact = newton_schulz(G.double(), preset=preset, compute_dtype=torch.float64)
    std16 = newton_schulz(G, preset=preset, compute_dtype=torch.float16)
    bf16 = newton_schulz(G, preset=preset)                              # torch.optim.Muon's iteration
    gram = newton_schulz(G, preset=preset, compute_dtype=torch.float16, method="gram")
    assert gram.dtype == G.dtype and gram.shape == G.shape
    assert _rel(gram, exact) <= 2 * _rel(std16, exact) + 2e-3
    assert _rel(gram, exact) <= _rel(bf16, exact) / 3
    s_std, s_gram = torch.linalg.svdvals(std16.double()), torch.linalg.svdvals(gram.double())
    assert s_gram.min() >= s_std.min() - 0.01 and s_gram.max() <= s_std.max() + 0.01
    polar = _polar(G)
    assert _rel(gram, polar) <= min(_rel(bf16, polar) + 2e-3, _rel(std16, polar) + 5e-3)


def test_float16_restart_schedule():
    """Why one restart after iteration 3 (not the package's 2, same FLOPs): on the ill-conditioned input the
    restart at 3 is ≈ 2× closer to the exact polynomial and keeps σ_max in the standard band; none diverges."""
    G = _matrix(M, 4 * M, "illcond").float()
    ref = newton_schulz(G.double(), preset="polar_express5", compute_dtype=torch.float64)
    out = {r: newton_schulz(G, preset="polar_express5", compute_dtype=torch.float16, method="gram", restarts=r)
           for r in ((), (2,), (3,))}
    err = {r: _rel(o, ref) for r, o in out.items()}
    smax = {r: float(torch.linalg.svdvals(o.double()).max()) for r, o in out.items()}
    std = newton_schulz(G, preset="polar_express5", compute_dtype=torch.float16)
    s_std = float(torch.linalg.svdvals(std.double()).max())
    assert err[()] > 1.0 > 0.1 > err[(2,)] > 1.5 * err[(3,)]
    assert smax[(3,)] <= s_std + 0.01 < smax[(2,)]
    assert torch.equal(out[(3,)], newton_schulz(G, preset="polar_express5", compute_dtype=torch.float16,
                                                method="gram"))


@pytest.mark.parametrize("method", ("standard", "gram"))
def test_float16_normalises_before_the_cast(method):
    """fp16's range is 6e-8…65504: the input is normalised in fp32 first (a cast first gave a zero update for
    ‖G‖_F > 65504 and NaN for an entry > 65504, and flushed tiny gradients to zero)."""
    G = torch.randn(M, 4 * M, generator=torch.Generator().manual_seed(2))
    for scale in (1e-7, 1.0, 1e3, 1e6):
        out = newton_schulz(G * scale, compute_dtype=torch.float16, method=method)
        ref = newton_schulz(G * scale, compute_dtype=torch.float32, method=method)
        assert torch.isfinite(out).all() and _rel(out, ref) < 5e-3, scale
    assert newton_schulz(torch.zeros(M, 4 * M), compute_dtype=torch.float16, method=method).abs().max() == 0


def test_tall_batched_and_zero():
    g = torch.Generator().manual_seed(1)
    G = torch.randn(3, 48, 200, generator=g)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        batched = newton_schulz(G, compute_dtype=dtype, method="gram")
        singles = torch.stack([newton_schulz(x, compute_dtype=dtype, method="gram") for x in G])
        torch.testing.assert_close(batched, singles, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-2)
        tall = newton_schulz(G.mT, compute_dtype=dtype, method="gram")
        torch.testing.assert_close(tall, batched.mT, rtol=0, atol=1e-6)
    many = newton_schulz_many([G[0], G[1].mT, G[2]], compute_dtype=torch.float32, method="gram")
    torch.testing.assert_close(many[1], newton_schulz(G[1], compute_dtype=torch.float32, method="gram").mT)
    assert newton_schulz(torch.zeros(2, 16, 64), method="gram").abs().max() == 0


def test_auto_and_default_unchanged():
    G = torch.randn(32, 32 * int(GRAM_AUTO_ASPECT))
    S = torch.randn(32, 40)
    f32 = dict(compute_dtype=torch.float32)
    assert torch.equal(newton_schulz(G, method="auto", **f32), newton_schulz(G, method="gram", **f32))
    assert torch.equal(newton_schulz(S, method="auto", **f32), newton_schulz(S, **f32))
    # the default is the standard iteration, restarts ignored by it
    assert torch.equal(newton_schulz(S), newton_schulz(S, method="standard", restarts=(1, 2)))
    with pytest.raises(ValueError, match="method"):
        newton_schulz(S, method="fast")


def test_flops_model():
    m, n = 512, 2048
    assert flops(m, n) == 5 * (4 * m * m * n + 2 * m ** 3)
    assert flops(m, n, method="gram") == 4 * m * m * n + 34 * m ** 3            # fp32: no restart
    assert flops(m, n, method="gram", restarts=(2, 4)) == 12 * m * m * n + 22 * m ** 3
    # fp16 default: one restart (the package's count) — 8m²n + 28m³, 1.5× fewer than standard at n = 4m
    assert flops(m, n, method="gram", restarts=default_restarts(5, torch.float16)) == 8 * m * m * n + 28 * m ** 3
    assert flops(m, n, method="gram", restarts=(2,)) == flops(m, n, method="gram", restarts=(3,))
    assert flops(m, n) / flops(m, n, method="gram", restarts=default_restarts(5, torch.float16)) == 1.5
    assert flops(m, n, method="gram", restarts=default_restarts(5, torch.bfloat16)) == 12 * m * m * n + 22 * m ** 3
    assert flops(m, n, method="gram") < flops(m, n, method="gram", restarts=(3,)) < \
        flops(m, n, method="gram", restarts=(2, 4)) < flops(m, n)
    assert flops(m, m, method="gram") > flops(m, m)                               # square: gram costs more


def _model(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, 128, generator=g).requires_grad_(), torch.randn(96, 24, generator=g).requires_grad_(),
            torch.randn(32, generator=g).requires_grad_()]


def _run(opt, params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


@pytest.mark.parametrize("dtype, atol", (("float32", 1e-5), ("bfloat16", 2e-3)))
def test_muon_gram_matches_standard(dtype, atol):
    a, b = _model(), _model()
    opt_a = Muon(a, lr=0.02, ns_dtype=dtype)
    opt_b = Muon(b, lr=0.02, ns_dtype=dtype, ns_method="gram")
    _run(opt_a, a, 3)
    _run(opt_b, b, 3)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=atol)
    assert all(grp["ns_method"] == "gram" for grp in opt_b.param_groups if "ns_steps" in grp)


def test_muon_float16_gram_and_auto():
    a, b, c = _model(), _model(), _model()
    ref = Muon(a, lr=0.02, ns_dtype="float32")
    gram = Muon(b, lr=0.02, ns_dtype="float16", ns_method="gram")
    auto = Muon(c, lr=0.02, ns_dtype="float16", ns_method="auto")    # both matrices have aspect 4: gram
    for opt, params in ((ref, a), (gram, b), (auto, c)):
        _run(opt, params, 3)
    for x, y, z in zip(a, b, c):
        assert torch.equal(y, z)
        torch.testing.assert_close(y, x, rtol=0, atol=2e-4)


def test_invalid_ns_method():
    with pytest.raises(ValueError, match="ns_method"):
        Muon(_model(), ns_method="fast")


def test_state_dict_round_trip_and_old_checkpoints():
    a = _model()
    opt = Muon(a, lr=0.02, ns_dtype="float32", ns_method="gram")
    _run(opt, a, 2)
    sd = copy.deepcopy(opt.state_dict())               # load_state_dict may alias same-device state tensors
    b = [p.detach().clone().requires_grad_() for p in a]
    opt_b = Muon(b, lr=0.02, ns_dtype="float32")            # ns_method comes from the state dict
    opt_b.load_state_dict(sd)
    assert [grp.get("ns_method") for grp in opt_b.param_groups] == [grp.get("ns_method") for grp in opt.param_groups]
    _run(opt, a, 2, seed=5)
    _run(opt_b, b, 2, seed=5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    # a state dict saved before ns_method existed runs the standard iteration
    c, d = _model(), _model()
    old, std = Muon(c, lr=0.02, ns_dtype="float32"), Muon(d, lr=0.02, ns_dtype="float32")
    sd_old = copy.deepcopy(old.state_dict())
    for grp in sd_old["param_groups"]:
        grp.pop("ns_method", None)
    old.load_state_dict(sd_old)
    _run(old, c, 2)
    _run(std, d, 2)
    for x, y in zip(c, d):
        assert torch.equal(x, y)


def test_parity_with_gram_newton_schulz_package():
    """The package's pure-torch path (``ns_use_kernels=False``, no compile; it always computes in fp16,
    restarting after iteration 2).  Not a dependency: it pulls CUDA/CuTeDSL wheels (quack-kernels,
    nvidia-cutlass-dsl, cuda-bindings); the test runs where it is installed."""
    gns = pytest.importorskip("gram_newton_schulz")
    G = torch.randn(2, 64, 256, generator=torch.Generator().manual_seed(3))
    theirs = gns.GramNewtonSchulz(ns_use_kernels=False, ns_coefficients=gns.YOU_COEFFICIENTS,
                                  gram_newton_schulz_reset_iterations=[2], compile_kwargs=None)(G)
    ours = newton_schulz(G, preset="you_cesista", compute_dtype=torch.float16, method="gram", restarts=(2,))
    ref = newton_schulz(G.double(), preset="you_cesista", compute_dtype=torch.float64)
    assert _rel(ours, theirs) < 3e-3                      # fp16 rounding level (measured 9e-4)
    assert abs(_rel(ours, ref) - _rel(theirs, ref)) < 1e-3
