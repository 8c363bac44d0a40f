"""Muon / SinkGD / SWAN hybrids: parity with torch.optim.Muon, routing, scales, equations."""
import math

import pytest
import torch

import torchstep
from torchstep.ops.sinkhorn import sinkhorn_normalize
from torchstep.ops.spectral import whiten
from torchstep.optim import SWAN, Muon, SinkGD
from torchstep.optim.muon import shape_scale


def _mats(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust", [None, "match_rms_adamw"])
def test_parity_with_torch_optim_muon_on_matrices(nesterov, adjust):
    shapes = [(32, 16), (32, 16), (16, 48), (24, 24)]
    ours, theirs = _mats(shapes), _mats(shapes)
    a = Muon(ours, lr=1e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr=adjust or "original")
    b = torch.optim.Muon(theirs, lr=1e-2, weight_decay=0.1, nesterov=nesterov, adjust_lr_fn=adjust)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):   # same bf16 NS, same formulas: equal to float rounding
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
        torch.testing.assert_close(a.state[p]["momentum_buffer"], b.state[q]["momentum_buffer"], rtol=0, atol=1e-7)


def test_sum_form_momentum_gives_the_same_direction_after_normalisation():
    # torch's docstring states b ← μb + g (sum form); the EMA form differs by a positive factor only
    p = _mats([(16, 32)])[0]
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(16, 32, generator=g) for _ in range(3)]
    opt = Muon([p], lr=0.1, nesterov=False, ns_dtype="float32")
    start = p.detach().clone()
    buf = torch.zeros(16, 32)
    for gr in grads:
        p.grad = gr
        opt.step()
        buf = 0.95 * buf + gr
    from torchstep.ops.newton_schulz import newton_schulz
    last = p.detach() - start
    # reproduce with the sum-form buffer: same NS input up to scale
    p2 = start.clone().requires_grad_()
    opt2 = Muon([p2], lr=0.1, nesterov=False, ns_dtype="float32")
    b2 = torch.zeros(16, 32)
    for gr in grads:
        b2 = 0.95 * b2 + gr
        with torch.no_grad():
            p2.add_(newton_schulz(b2, compute_dtype=torch.float32), alpha=-0.1)
    torch.testing.assert_close(p2.detach() - start, last, rtol=1e-5, atol=1e-6)
    del opt2


def test_conv_scale_uses_the_flattened_shape_and_match_rms_gives_rms_0_2():
    assert shape_scale("original", 64, 27) == pytest.approx(math.sqrt(64 / 27))   # (64, 3, 3, 3)
    conv = torch.zeros(64, 3, 3, 3, requires_grad=True)
    conv.grad = torch.randn(64, 3, 3, 3)
    Muon([conv], lr=1.0, momentum=0.0, nesterov=False, ns_dtype="float32", ns_preset="convergent",
         ns_steps=60, adjust_lr="match_rms_adamw").step()
    # an exact orthogonal factor of a 64×27 matrix has RMS √(1/64); × 0.2·√64 → RMS 0.2
    assert conv.detach().pow(2).mean().sqrt().item() == pytest.approx(0.2, rel=1e-4)


def test_routing_flags_and_one_scheduler_and_checkpoint_for_a_model():
    model = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 8), "hidden": torch.nn.Linear(8, 8),
                                 "norm": torch.nn.LayerNorm(8), "head": torch.nn.Linear(8, 10)})
    opt = torchstep.create("muon", model, lr=0.02, fallback_lr=1e-3)
    algos = {g["name"]: (g["algo"], g["lr"]) for g in opt.param_groups}
    assert algos == {"matrix": ("muon", 0.02), "embedding": ("adamw", 1e-3), "head": ("adamw", 1e-3),
                     "no_decay": ("adamw", 1e-3)}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["embedding"] == 5e-4   # each group's own lr scaled
    x = torch.randint(0, 10, (4,))
    model["head"](model["norm"](model["hidden"](model["emb"](x)))).sum().backward()
    opt.step(), sched.step()
    state = opt.state_dict()
    assert len(state["state"]) == len(list(model.parameters()))
    flags = Muon([{"params": [model["hidden"].weight], "use_muon": True},
                  {"params": [model["head"].weight], "use_muon": False},
                  {"params": [model["emb"].weight], "use_fallback": True, "lr": 5e-3}])
    assert [g["algo"] for g in flags.param_groups] == ["muon", "adamw", "adamw"]
    assert [g["lr"] for g in flags.param_groups] == [0.02, 3e-4, 5e-3]
    with pytest.raises(ValueError, match="algo"):
        Muon([{"params": [model["hidden"].bias], "use_muon": True}])


def test_zero_gradient_gives_zero_update_and_decay_uses_the_base_lr():
    p = torch.ones(8, 4, requires_grad=True)
    p.grad = torch.zeros(8, 4)
    Muon([p], lr=0.1, weight_decay=0.5, adjust_lr="match_rms_adamw").step()
    torch.testing.assert_close(p.detach(), torch.full((8, 4), 1 - 0.1 * 0.5))


def test_same_shape_matrices_are_orthogonalised_in_one_batch(monkeypatch):
    from torchstep.ops import newton_schulz as ns
    calls = []
    real = ns.newton_schulz
    monkeypatch.setattr(ns, "newton_schulz", lambda G, **kw: calls.append(tuple(G.shape)) or real(G, **kw))
    params = _mats([(16, 8)] * 6 + [(8, 8)])
    opt = Muon(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    assert sorted(calls) == [(6, 16, 8), (8, 8)]


def test_sinkgd_update_is_the_sinkhorn_normalised_gradient():
    p = _mats([(12, 20)])[0]
    start = p.detach().clone()
    p.grad = torch.randn(12, 20, generator=torch.Generator().manual_seed(3))
    SinkGD([p], lr=0.1, iters=5).step()
    torch.testing.assert_close(start - p.detach(), 0.1 * sinkhorn_normalize(p.grad, 5), rtol=1e-6, atol=1e-7)
    q = _mats([(12, 20)])[0]
    q.grad = p.grad.clone()
    SinkGD([q], lr=0.1, iters=5, normalization="unit").step()
    torch.testing.assert_close((start - q.detach()) * math.sqrt(12), start - p.detach(), rtol=1e-5, atol=1e-6)


def test_swan_grad_norm_and_whitened_update():
    G = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 3 + 1
    Z = SWAN.grad_norm(G)
    assert Z.mean(-1).abs().max() < 1e-6 and (Z.var(-1, correction=0) - 1).abs().max() < 1e-5
    p = torch.zeros(16, 64, requires_grad=True)
    p.grad = G
    SWAN([p], lr=1.0, rescale=False).step()
    U, _, Vh = torch.linalg.svd(Z, full_matrices=False)
    assert ((-p.detach() - U @ Vh).norm() / (U @ Vh).norm()) < 1e-3
    assert torch.linalg.svdvals(-p.detach()).sub(1).abs().max() < 1e-2
    torch.testing.assert_close(-p.detach(), whiten(Z))


def test_swan_paper_rescale_restores_the_gradnorm_frobenius_norm():
    # ΔW ← (‖G̃‖_F/‖ΔW‖_F)·ΔW: the update gets ‖G̃‖_F = √(mn) (RMS 1), √max(m, n) = 8× the bare whitened step
    G = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 3 + 1
    Z = SWAN.grad_norm(G)
    p, q = torch.zeros(16, 64, requires_grad=True), torch.zeros(16, 64, requires_grad=True)
    p.grad, q.grad = G, G.clone()
    SWAN([p], lr=1.0).step()
    SWAN([q], lr=1.0, rescale=False).step()
    torch.testing.assert_close(torch.linalg.matrix_norm(p.detach()), torch.linalg.matrix_norm(Z), rtol=1e-6, atol=0)
    torch.testing.assert_close(torch.linalg.matrix_norm(Z).item(), 32.0, rtol=1e-5, atol=0)        # √(16·64)
    ratio = torch.linalg.matrix_norm(p.detach()) / torch.linalg.matrix_norm(q.detach())
    torch.testing.assert_close(ratio.item(), 8.0, rtol=1e-2, atol=0)                               # √max(m, n)
    torch.testing.assert_close(p.detach() / ratio, q.detach(), rtol=1e-5, atol=1e-7)               # same direction


def test_muon_solves_a_matrix_least_squares_problem():
    g = torch.Generator().manual_seed(5)
    A = torch.randn(64, 16, generator=g)
    W_star = torch.randn(8, 16, generator=g)
    W = torch.zeros(8, 16, requires_grad=True)
    opt = Muon([W], lr=0.05, ns_dtype="float32")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / 400)
    for _ in range(400):
        opt.zero_grad()
        ((A @ (W - W_star).T) ** 2).mean().backward()
        opt.step(), sched.step()
    assert (W.detach() - W_star).abs().max() < 5e-2


def test_normuon_row_statistic_and_both_update_scales():
    from torchstep.ops.newton_schulz import newton_schulz
    from torchstep.optim import NorMuon
    g = torch.Generator().manual_seed(6)
    grad = torch.randn(24, 40, generator=g)
    for compat in ("paper", "official"):
        p = torch.zeros(24, 40, requires_grad=True)
        p.grad = grad
        opt = NorMuon([p], lr=0.1, momentum=0.0, nesterov=False, beta2=0.0, compat=compat, ns_dtype="float32")
        opt.step()
        O = newton_schulz(grad, compute_dtype=torch.float32)
        v = opt.state[p]["row_second_moment"]
        assert v.shape == (24, 1)
        torch.testing.assert_close(v, O.square().mean(-1, keepdim=True))
        update = -p.detach() / 0.1
        if compat == "paper":
            assert update.square().mean().sqrt().item() == pytest.approx(0.2, rel=1e-5)    # RMS 0.2·η
        else:
            assert update.norm().item() == pytest.approx(O.norm().item(), rel=1e-5)     # Frobenius kept
        normed = O / (O.square().mean(-1, keepdim=True).sqrt() + 1e-10)
        direction = normed / normed.norm()
        torch.testing.assert_close(update / update.norm(), direction, rtol=1e-5, atol=1e-6)


def test_normuon_equal_row_norms_and_beta2_zero_is_plain_muon_direction():
    from torchstep.optim import NorMuon
    W = torch.linalg.qr(torch.randn(32, 32, generator=torch.Generator().manual_seed(7)))[0]   # orthogonal rows
    p, q = torch.zeros(32, 32, requires_grad=True), torch.zeros(32, 32, requires_grad=True)
    p.grad, q.grad = W.clone(), W.clone()
    NorMuon([p], lr=1.0, momentum=0.0, nesterov=False, beta2=0.0, compat="official", ns_dtype="float32").step()
    Muon([q], lr=1.0, momentum=0.0, nesterov=False, ns_dtype="float32").step()
    torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
