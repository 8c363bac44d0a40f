"""DoRA factored norm and stable compose (peft.md §1, algorithms.md §20) and parity with peft 0.21.2 DoRA."""
import copy
import io
import math

import peft  # noqa: F401  - plain import: peft missing must fail, not skip
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from torchstep.ops.dora import (DoRAComposeFunction, compose, dense_row_norm, dora_chunk_size, dora_compose,
                                dora_compose_, dora_compose_compiled, dora_compose_fused, factored_row_norm)
from torchstep.peft.dora import DoRALinear, patch_peft_dora

F64 = torch.float64


def _factors(d_out, d_in, r, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g, dtype=F64).to(dtype)
    A = torch.randn(r, d_in, generator=g, dtype=F64).div(math.sqrt(d_in)).to(dtype)
    B = torch.randn(d_out, r, generator=g, dtype=F64).to(dtype)
    return W, A, B


# ------------------------------------------------------------------------------------ card §1 tests 1–5

def test_worked_example_2x2():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    A = torch.tensor([[1.0, 0.0]], dtype=F64)
    B = torch.tensor([[1.0], [2.0]], dtype=F64)
    s = 0.5
    base = (W * W).sum(1)
    U = W @ A.T
    cross = (B * U).sum(1)
    G = A @ A.T
    ba = ((B @ G) * B).sum(1)
    torch.testing.assert_close(base, torch.tensor([5.0, 25.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(U, torch.tensor([[1.0], [3.0]], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(cross, torch.tensor([1.0, 6.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(ba, torch.tensor([1.0, 4.0], dtype=F64), rtol=0, atol=1e-15)
    pinned = torch.tensor([2.5, math.sqrt(32.0)], dtype=F64)
    assert abs(pinned[1].item() - 5.656854) < 1e-6
    fac = factored_row_norm(W, A, B, s)
    den = dense_row_norm(W, A, B, s)
    torch.testing.assert_close(fac, pinned, rtol=0, atol=1e-15)
    torch.testing.assert_close(den, pinned, rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.linalg.vector_norm(W + s * B @ A, dim=1), pinned, rtol=0, atol=1e-15)
    m = factored_row_norm(W, A, B, 0.0)
    torch.testing.assert_close(m, torch.tensor([math.sqrt(5.0), 5.0], dtype=F64), rtol=0, atol=1e-15)
    assert abs(m[0].item() - 2.236068) < 1e-6
    g = m / fac
    assert abs(g[0].item() - 0.894427) < 1e-6 and abs(g[1].item() - 0.883883) < 1e-6


def test_chunk_sizes_pinned():
    assert dora_chunk_size(4096, 11008, 64, 4, 256) == 11008
    assert ((4096 + 64) * 11008 + 4096 * 64 + 64 * 64) * 4 == 184_238_080
    assert dora_chunk_size(8192, 28672, 384, 4, 256, "cpu") == 7441
    assert ((8192 + 384) * 28672 + 8192 * 384 + 384 * 384) * 4 == 996_737_024
    assert dora_chunk_size(8192, 28672, 384, 4, 256, "cuda") == 7424
    assert dora_chunk_size(8192, 8192, 384, 4, 256, "cuda") == 7424
    assert dora_chunk_size(8192, 8192, 384, 4, 0) == dora_chunk_size(8192, 8192, 384, 4, 16)   # floor 16 MB
    with pytest.raises(ValueError, match="budget_mb"):
        dora_chunk_size(8, 8, 2, 4, -1)


def test_chunk_1_7_full_identical_fp64():
    W, A, B = _factors(33, 50, 5)
    ref = dense_row_norm(W, A, B, 0.7)
    outs = [factored_row_norm(W, A, B, 0.7, chunk_size=c) for c in (1, 7, 50)]
    for o in outs:
        torch.testing.assert_close(o, ref, rtol=1e-14, atol=0)
        torch.testing.assert_close(o, outs[-1], rtol=1e-14, atol=0)
    # algorithms.md §20 test 1 shape: factored vs dense ≤ 1e-14 relative in fp64
    W, A, B = _factors(512, 1024, 16, seed=1)
    rel = ((factored_row_norm(W, A, B, 2.0) - dense_row_norm(W, A, B, 2.0)).abs() / dense_row_norm(W, A, B, 2.0))
    assert rel.max().item() <= 1e-14


def test_fp32_accumulation_for_bf16():
    W, A, B = _factors(256, 2048, 16, seed=2)
    ref = dense_row_norm(W, A, B, 1.0)                       # fp64
    Wb, Ab, Bb = W.bfloat16(), A.bfloat16(), B.bfloat16()
    exact_b = dense_row_norm(Wb.double(), Ab.double(), Bb.double(), 1.0)
    fac = factored_row_norm(Wb, Ab, Bb, 1.0)
    assert fac.dtype == torch.bfloat16
    # fp32 accumulation: the only error is the final bf16 rounding (≤ half an ulp = 2^-8 relative), and the
    # result is the correctly rounded exact norm in (nearly) every row
    assert ((fac.double() - exact_b).abs() / exact_b).max().item() <= 2.0 ** -8
    assert (fac == exact_b.bfloat16()).double().mean().item() >= 0.98
    assert torch.isfinite(ref).all()


def test_autograd_matches_closed_form_and_norm_is_constant():
    torch.manual_seed(0)
    s = 0.37
    lora = torch.randn(3, 4, 6, dtype=F64, requires_grad=True)
    base = torch.randn(3, 4, 6, dtype=F64, requires_grad=True)
    W, A, B = _factors(6, 5, 2)
    A.requires_grad_(True)
    B.requires_grad_(True)
    norm = factored_row_norm(W, A, B, s)
    assert norm.grad_fn is None and not norm.requires_grad
    m = (norm * (1 + 0.1 * torch.randn(6, dtype=F64))).requires_grad_(True)
    g = m / norm
    d_out = torch.randn(3, 4, 6, dtype=F64)
    for fn in (dora_compose, dora_compose_fused):
        g = m / norm
        gl, gb, gm = torch.autograd.grad(fn(lora, base, g, s), (lora, base, m), d_out)
        gv = g.detach()
        torch.testing.assert_close(gl, gv * s * d_out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, (gv - 1) * d_out, rtol=1e-12, atol=1e-12)
        d_g = ((s * lora + base).detach() * d_out).sum((0, 1))
        torch.testing.assert_close(gm, d_g / norm, rtol=1e-12, atol=1e-12)
    # forward of the Function equals eager bitwise; gradcheck of the closed form
    assert torch.equal(dora_compose_fused(lora, base, g, s), dora_compose(lora, base, g, s))
    gg = g.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b, c: DoRAComposeFunction.apply(a, b, c, s), (lora, base, gg))


def test_inner_saved_only_when_g_requires_grad():
    lora, base = torch.randn(4, 8), torch.randn(4, 8)
    lora.requires_grad_(True)
    out = dora_compose_fused(lora, base, torch.rand(8) + 0.5, 0.5)
    assert len(out.grad_fn.saved_tensors) == 1            # g only
    out = dora_compose_fused(lora, base, (torch.rand(8) + 0.5).requires_grad_(True), 0.5)
    assert len(out.grad_fn.saved_tensors) == 2            # g and inner


def test_scale_zero_skips_A_and_eps_clamp():
    W, A, B = _factors(7, 9, 3)
    nanA = torch.full_like(A, float("nan"))
    out = factored_row_norm(W, nanA, B, 0.0)
    torch.testing.assert_close(out, torch.linalg.vector_norm(W, dim=1), rtol=0, atol=1e-15)
    torch.testing.assert_close(factored_row_norm(W, None, None, 0.0), out, rtol=0, atol=0)
    # zero row of W + sBA
    for dtype, eps in ((F64, 1e-12), (torch.float32, 1e-12), (torch.bfloat16, 1e-6)):
        W2 = torch.zeros(2, 4, dtype=dtype)
        W2[1] = 1.0
        A2 = torch.zeros(1, 4, dtype=dtype)
        B2 = torch.zeros(2, 1, dtype=dtype)
        n = factored_row_norm(W2, A2, B2, 1.0)
        assert n.dtype == dtype
        assert n[0].item() == pytest.approx(eps, rel=1e-2)
        g = torch.ones(2, dtype=dtype) / n
        assert torch.isfinite(g).all()
    # cancellation exactly to zero: W row = -s·(BA) row
    W3 = torch.tensor([[2.0, -4.0]], dtype=F64)
    n = factored_row_norm(W3, torch.tensor([[1.0, -2.0]], dtype=F64), torch.tensor([[4.0]], dtype=F64), -0.5)
    assert n.item() == 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g_fp32", [False, True])
def test_inplace_equals_out_of_place_bitwise(dtype, g_fp32):
    torch.manual_seed(1)
    lora = torch.randn(6, 5, 48).to(dtype)
    base = torch.randn(6, 5, 48).to(dtype)
    g = 1 + 1e-3 * torch.randn(48)
    g = g if g_fp32 else g.to(dtype)
    ref = dora_compose(lora, base, g, 0.125)
    got = dora_compose_(lora.clone(), base, g, 0.125)
    assert ref.dtype == dtype and torch.equal(ref, got)
    got_small = dora_compose_(lora.clone(), base, g.view(1, -1), 0.125, chunk_mb=0)
    assert torch.equal(ref, got_small)
    # > 1 row chunk at the 16 MiB floor: 16 MiB / (3·48·4 B) = 29127 rows per chunk
    big_l, big_b = torch.randn(40000, 48).to(dtype), torch.randn(40000, 48).to(dtype)
    assert torch.equal(dora_compose_(big_l.clone(), big_b, g, 0.125, chunk_mb=0),
                       dora_compose(big_l, big_b, g, 0.125))


def test_stable_compose_beats_naive_in_bf16():
    torch.manual_seed(2)
    base = torch.randn(64, 256).bfloat16()
    lora = (0.01 * torch.randn(64, 256)).bfloat16()
    g = (1 + 1e-4 * torch.randn(256)).bfloat16()
    exact = (g.double() - 1) * base.double() + g.double() * (0.5 * lora.double())
    stable = dora_compose(lora, base, g, 0.5).double()
    naive = (g * (0.5 * lora + base) - base).double()
    assert (stable - exact).abs().mean() < 0.5 * (naive - exact).abs().mean()


def test_compile_matches_eager():
    try:
        out_c = dora_compose_compiled(torch.randn(8, 16), torch.randn(8, 16), torch.rand(16) + 0.5, 0.3)
    except Exception as exc:   # no C++ toolchain
        pytest.skip(f"torch.compile unavailable: {exc}")
    torch.manual_seed(3)
    lora, base, g = torch.randn(32, 64), torch.randn(32, 64), 1 + 1e-2 * torch.randn(64)
    torch.testing.assert_close(dora_compose_compiled(lora, base, g, 0.3), dora_compose(lora, base, g, 0.3),
                               rtol=1e-6, atol=1e-6)
    assert out_c.shape == (8, 16)
    torch.testing.assert_close(compose(lora, base, g, 0.3, fused="compile"), dora_compose(lora, base, g, 0.3),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------ input checks

def test_bad_input_rejected():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="r "):
        DoRALinear(lin, 0, 8)
    with pytest.raises(ValueError, match="base"):
        DoRALinear(nn.Conv1d(2, 2, 1), 2, 8)
    with pytest.raises(ValueError, match="chunk_mb"):
        DoRALinear(lin, 2, 8, chunk_mb=-1)
    with pytest.raises(ValueError, match="fused"):
        DoRALinear(lin, 2, 8, fused="nope")
    with pytest.raises(ValueError, match="chunk_mb"):
        factored_row_norm(lin.weight, torch.zeros(2, 8), torch.zeros(4, 2), 1.0, chunk_mb=-5)
    with pytest.raises(ValueError, match="A must"):
        factored_row_norm(lin.weight, torch.zeros(2, 7), torch.zeros(4, 2), 1.0)
    with pytest.raises(ValueError, match="model"):
        patch_peft_dora("not a model")


# --------------------------------------------------------------------------------------------- peft parity

TOL = dict(rtol=1e-5, atol=1e-6)   # fp32 parity tolerance vs peft's dense path


def _peft_mlp(seed=0, r=4, alpha=8, use_rslora=False, dtype=torch.float32):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.Tanh(), nn.Linear(24, 8)).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=alpha, use_dora=True, use_rslora=use_rslora, target_modules=["0", "2", "4"])
    pm = get_peft_model(mlp, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    return pm


def test_peft_dora_at_init_equals_base():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    ref = copy.deepcopy(mlp)
    pm = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["0", "2"]))
    x = torch.randn(5, 16)
    with patch_peft_dora(pm) as h:
        assert len(h) == 2
        torch.testing.assert_close(pm(x), ref(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_patched_peft_matches_dense_forward_backward(use_rslora):
    dense = _peft_mlp(use_rslora=use_rslora)
    fact = copy.deepcopy(dense)
    h = patch_peft_dora(fact)
    assert h.names == [f"base_model.model.{i}.default" for i in (0, 2, 4)] and h.skipped == {}
    x = torch.randn(7, 16)
    yd, yf = dense(x), fact(x)
    torch.testing.assert_close(yf, yd, **TOL)
    with dense.disable_adapter():
        assert (yd - dense(x)).abs().max().item() > 1e-2      # the adapter is really active
    yd.square().sum().backward()
    yf.square().sum().backward()
    n_grads = 0
    for (n, pd), (_, pf) in zip(dense.named_parameters(), fact.named_parameters()):
        if pd.grad is None:
            assert pf.grad is None
            continue
        n_grads += 1
        torch.testing.assert_close(pf.grad, pd.grad, **TOL, msg=n)
    assert n_grads == 9     # A, B, magnitude × 3 layers
    h.restore()
    assert torch.equal(fact(x), dense(x))


@pytest.mark.parametrize("fused", ["eager", "function"])
def test_patched_peft_adamw_lockstep(fused):
    dense = _peft_mlp(seed=4)
    fact = copy.deepcopy(dense)
    patch_peft_dora(fact, fused=fused, chunk_mb=0)
    od = torch.optim.AdamW([p for p in dense.parameters() if p.requires_grad], lr=1e-2)
    of = torch.optim.AdamW([p for p in fact.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    start = {n: p.detach().clone() for n, p in dense.named_parameters()}
    for _ in range(10):
        x = torch.randn(9, 16, generator=g)
        t = torch.randn(9, 8, generator=g)
        for model, opt in ((dense, od), (fact, of)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), t).backward()
            opt.step()
    moved = 0
    for (n, pd), (_, pf) in zip(dense.named_parameters(), fact.named_parameters()):
        torch.testing.assert_close(pf, pd, rtol=1e-5, atol=1e-5, msg=n)
        moved += int(not torch.equal(pd, start[n]))
    assert moved == 9


def test_dropout_path_matches_peft():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    dense = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, use_dora=True,
                                           target_modules=["0", "2"]))
    with torch.no_grad():
        for n, p in dense.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    fact = copy.deepcopy(dense)
    patch_peft_dora(fact)
    dense.train()
    fact.train()
    x = torch.randn(6, 16)
    torch.manual_seed(11)
    yd = dense(x)
    torch.manual_seed(11)
    yf = fact(x)
    torch.testing.assert_close(yf, yd, **TOL)


def _copy_from_peft(layer, peft_layer):
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight)
        layer.magnitude.copy_(peft_layer.lora_magnitude_vector["default"].weight)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_doralinear_matches_peft_layer(use_rslora):
    pm = _peft_mlp(seed=6, r=6, alpha=12, use_rslora=use_rslora)
    pl = pm.base_model.model[2]
    lin = copy.deepcopy(pl.get_base_layer())
    d = DoRALinear(lin, 6, 12, use_rslora=use_rslora)
    assert d.scaling == pytest.approx(pl.scaling["default"])
    _copy_from_peft(d, pl)
    x = torch.randn(5, 32, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    yp, yd = pl(x), d(x2)
    torch.testing.assert_close(yd, yp, **TOL)
    yp.sum().backward()
    yd.sum().backward()
    torch.testing.assert_close(d.lora_A.grad, pl.lora_A["default"].weight.grad, **TOL)
    torch.testing.assert_close(d.lora_B.grad, pl.lora_B["default"].weight.grad, **TOL)
    torch.testing.assert_close(d.magnitude.grad, pl.lora_magnitude_vector["default"].weight.grad, **TOL)
    torch.testing.assert_close(x2.grad, x.grad, **TOL)
    # merged weight reproduces the forward
    merged = d.to_linear()
    torch.testing.assert_close(merged(x2), yd, **TOL)


def test_doralinear_init_semantics():
    torch.manual_seed(7)
    lin = nn.Linear(20, 12)
    d = DoRALinear(lin, 4, 8)
    assert torch.equal(d.lora_B, torch.zeros(12, 4))
    torch.testing.assert_close(d.magnitude, torch.linalg.vector_norm(lin.weight, dim=1), rtol=0, atol=1e-6)
    bound = 1 / math.sqrt(20)       # kaiming_uniform(a=√5) on fan_in 20
    assert d.lora_A.abs().max().item() <= bound and d.lora_A.abs().max().item() > 0.5 * bound
    x = torch.randn(3, 20)
    torch.testing.assert_close(d(x), lin(x), rtol=0, atol=2e-6)
    assert not lin.weight.requires_grad
    assert {n for n, p in d.named_parameters() if p.requires_grad} == {"lora_A", "lora_B", "magnitude"}


def test_doralinear_state_dict_round_trip():
    torch.manual_seed(8)
    d = DoRALinear(nn.Linear(10, 6), 3, 6)
    with torch.no_grad():
        d.lora_B.normal_()
        d.magnitude.mul_(1.1)
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    e = DoRALinear(nn.Linear(10, 6), 3, 6)
    e.load_state_dict(sd)
    x = torch.randn(4, 10)
    assert torch.equal(e(x), d(x))
    assert set(sd) == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B", "magnitude"}


def test_patched_peft_state_dict_round_trip():
    pm = _peft_mlp(seed=9)
    patch_peft_dora(pm)
    buf = io.BytesIO()
    torch.save(pm.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    other = _peft_mlp(seed=10)
    patch_peft_dora(other)
    other.load_state_dict(sd)
    x = torch.randn(3, 16)
    assert torch.equal(other(x), pm(x))


def test_bf16_parameters():
    torch.manual_seed(12)
    lin = nn.Linear(64, 48).bfloat16()
    d = DoRALinear(lin, 8, 16)
    assert d.lora_A.dtype == d.magnitude.dtype == torch.bfloat16
    x = torch.randn(5, 64).bfloat16()
    y = d(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, lin(x)) or (y.float() - lin(x).float()).abs().max() <= 2 ** -6
    with torch.no_grad():
        d.lora_B.normal_(0, 0.1)
    y = d(x)
    y.float().sum().backward()
    assert d.lora_A.grad.dtype == torch.bfloat16 and torch.isfinite(d.magnitude.grad.float()).all()
    # against an fp64 reference of the same bf16 weights
    W, A, B, m = (t.detach().double() for t in (lin.weight, d.lora_A, d.lora_B, d.magnitude))
    V = W + d.scaling * B @ A
    ref = x.double() @ (m[:, None] * V / torch.linalg.vector_norm(V, dim=1, keepdim=True)).T + lin.bias.double()
    assert ((y.double() - ref).abs().max() / ref.abs().max()).item() < 2e-2
    # peft in bf16: patched vs dense
    dense = _peft_mlp(seed=13, dtype=torch.bfloat16)
    fact = copy.deepcopy(dense)
    patch_peft_dora(fact)
    xb = torch.randn(4, 16).bfloat16()
    yd, yf = dense(xb).float(), fact(xb).float()
    assert (yf - yd).abs().max().item() <= 2e-2 * yd.abs().max().item()


def test_bench_memory_probe_and_compose_table_smoke():
    from torchstep.peft import bench_dora
    out = bench_dora._child([{"kind": "norm", "variant": v, "d_out": 64, "d_in": 64, "r": 4}
                             for v in ("peft_dense", "factored")])
    assert len(out) == 2 and all(r["peak_delta_mib"] >= 0 and r["rss_before_mib"] > 0 for r in out)
    fns = bench_dora._norm_fns(bench_dora._peft_layer(64, 48, 4)[1])
    ref = fns["peft_dense"]()
    for k in ("torchstep_dense", "factored"):
        torch.testing.assert_close(fns[k](), ref, rtol=1e-5, atol=1e-6)


def test_patch_skips_embedding_dora_and_is_idempotent_to_restore():
    torch.manual_seed(14)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 16)
            self.fc = nn.Linear(16, 4)

        def forward(self, i):
            return self.fc(self.emb(i))

    pm = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, use_dora=True, target_modules=["emb", "fc"]))
    ids = torch.tensor([[1, 2, 3]])
    ref = pm(ids)
    h = patch_peft_dora(pm)
    assert h.names == ["base_model.model.fc.default"]
    assert list(h.skipped) == ["base_model.model.emb.default"]
    torch.testing.assert_close(pm(ids), ref, rtol=0, atol=1e-6)
    h.restore()
    h.restore()
    assert torch.equal(pm(ids), ref)


@pytest.mark.parametrize("fused", ["eager", "function", "auto"])
def test_doralinear_fused_modes_agree(fused):
    torch.manual_seed(15)
    ref = DoRALinear(nn.Linear(24, 16), 4, 8, fused="eager")
    with torch.no_grad():
        ref.lora_B.normal_()
        ref.magnitude.mul_(1.2)
    other = copy.deepcopy(ref)
    other.fused = fused
    x = torch.randn(3, 5, 24)
    ya, yb = ref(x), other(x)
    assert torch.equal(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for n in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(getattr(other, n).grad, getattr(ref, n).grad, rtol=1e-6, atol=1e-6)
