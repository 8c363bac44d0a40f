"""AdamP / SGDP: parity with the official ``adamp`` package and the projection's equations."""
import adamp   # the parity reference: installed by the README's test command; missing means fail, not skip
import pytest
import torch

from torchstep.optim import SGDP, AdamP


def _scale_invariant_grads(params, g):
    """Gradients orthogonal to each output row (what a following norm layer produces)."""
    grads = []
    for p in params:
        r = torch.randn(p.shape, generator=g, dtype=p.dtype)
        if p.dim() > 1:
            rows = p.reshape(p.shape[0], -1)
            rr = r.reshape(p.shape[0], -1)
            rr = rr - rows * (rr * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
            r = rr.reshape(p.shape)
        grads.append(r)
    return grads


def _shapes():
    return [(8, 4, 3, 3), (16, 10), (10,)]


@pytest.mark.parametrize("orthogonal", [False, True], ids=["random-grads", "scale-invariant-grads"])
@pytest.mark.parametrize("kind,kwargs", [
    ("adamp", dict(lr=1e-2, weight_decay=1e-2)),
    ("adamp", dict(lr=1e-2, weight_decay=1e-2, nesterov=True)),
    ("sgdp", dict(lr=1e-1, momentum=0.9, weight_decay=1e-3, compat="official")),
    ("sgdp", dict(lr=1e-1, momentum=0.9, weight_decay=1e-3, nesterov=True)),
])
def test_parity_with_official_adamp(kind, kwargs, orthogonal):
    g = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in _shapes()]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    ours_cls, their_cls = (AdamP, adamp.AdamP) if kind == "adamp" else (SGDP, adamp.SGDP)
    a = ours_cls(ours, **kwargs)
    b = their_cls(theirs, **{k: v for k, v in kwargs.items() if k != "compat"})
    for _ in range(30):
        grads = _scale_invariant_grads(ours, g) if orthogonal else [torch.randn(p.shape, generator=g, dtype=p.dtype)
                                                                   for p in ours]
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):  # float64; the decay factor is a 0-dim tensor on our side
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


def test_sgdp_paper_mode_keeps_the_momentum_buffer_unprojected():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    opt = SGDP([p], lr=0.1, momentum=0.9)
    grads = [_scale_invariant_grads([p], g)[0] + 0.01 * torch.randn(6, 5, generator=g, dtype=p.dtype)
             for _ in range(3)]
    expected = torch.zeros_like(p)
    for gr in grads:
        p.grad = gr
        opt.step()
        expected = 0.9 * expected + gr
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], expected, rtol=0, atol=1e-12)


def test_aligned_gradient_is_plain_adamw():
    # cos(g, θ) = 1 ≥ δ/√dim: no projection, so AdamP ≡ torch AdamW with the same λ
    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 5, generator=g).requires_grad_()
    q = p.detach().clone().requires_grad_()
    a = AdamP([p], lr=1e-2, weight_decay=0.1)
    b = torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        scale = torch.rand((), generator=g) + 0.5
        p.grad, q.grad = p.detach() * scale, q.detach() * scale
        a.step(), b.step()
    torch.testing.assert_close(p, q, rtol=0, atol=2e-7)


def test_orthogonal_gradient_removes_radial_component_and_uses_wd_ratio():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    p.grad = _scale_invariant_grads([p], g)[0]
    before = p.detach().clone()
    lr, wd = 1e-2, 0.5
    opt = AdamP([p], lr=lr, weight_decay=wd)
    opt.step()
    decayed = before * (1 - lr * wd * 0.1)       # decay used λ·wd_ratio
    update = p.detach() - decayed
    radial = (update * before).sum(1) / before.norm(dim=1)
    assert radial.abs().max() < 1e-7


def test_one_dimensional_tensors_are_never_projected():
    p = torch.randn(7, dtype=torch.float64).requires_grad_()
    q = p.detach().clone().requires_grad_()
    a = AdamP([p], lr=1e-2)
    b = torch.optim.Adam([q], lr=1e-2)
    for _ in range(5):
        gr = torch.randn(7, dtype=torch.float64)
        p.grad, q.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    torch.testing.assert_close(p, q, rtol=0, atol=1e-12)


def test_whole_tensor_view_fires_when_only_it_qualifies():
    # Row 0 of g is parallel to row 0 of θ (per-channel cos = 1 ⇒ channel view does not fire),
    # but globally g is nearly orthogonal to θ (one short row among many long ones).
    from torchstep.optim.adamp import project_radial
    theta = torch.zeros(50, 40, dtype=torch.float64)
    theta[0] = 1e-3
    theta[1:, 0] = 1.0
    grad = torch.zeros_like(theta)
    grad[0] = 1.0
    grad[1:, 1] = 1.0
    update = torch.randn(theta.shape, generator=torch.Generator().manual_seed(5), dtype=theta.dtype)
    out, ratio = project_radial(theta, grad, update.clone(), delta=0.1, wd_ratio=0.1, eps=1e-8)
    assert float(ratio) == pytest.approx(0.1)
    flat = theta.reshape(-1) / theta.norm()
    before = abs((update.reshape(-1) * flat).sum().item())
    after = abs((out.reshape(-1) * flat).sum().item())
    assert before > 0.1 and after < 1e-7                            # whole-tensor radial part removed
    row_cos = torch.nn.functional.cosine_similarity(grad, theta, dim=1).abs().max()
    assert row_cos > 0.1 / 40 ** 0.5                                 # the channel view did not qualify


def test_sgdp_decay_factor_when_projection_fires():
    g = torch.Generator().manual_seed(3)
    p = torch.randn(6, 5, generator=g, dtype=torch.float64).requires_grad_()
    p.grad = _scale_invariant_grads([p], g)[0]
    before = p.detach().clone()
    lr, wd, mu = 0.1, 0.01, 0.9
    SGDP([p], lr=lr, momentum=mu, weight_decay=wd).step()
    # first step: buffer = g, projection removes nothing radial from an orthogonal g
    expected = before * (1 - lr * wd * 0.1 / (1 - mu)) - lr * p.grad
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("orthogonal", [False, True])
def test_sync_free_projection_path_equals_the_branching_path(orthogonal):
    from torchstep.optim.adamp import project_radial
    g = torch.Generator().manual_seed(6)
    for shape in [(8, 4, 3, 3), (16, 10), (50, 40)]:
        p = torch.randn(shape, generator=g, dtype=torch.float64)
        grad = _scale_invariant_grads([p], g)[0] if orthogonal else torch.randn(shape, generator=g, dtype=p.dtype)
        update = torch.randn(shape, generator=g, dtype=p.dtype)
        a, ra = project_radial(p, grad, update, 0.1, 0.1, 1e-8, sync_free=False)
        b, rb = project_radial(p, grad, update, 0.1, 0.1, 1e-8, sync_free=True)
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)
        assert float(ra) == float(rb)
        if orthogonal:
            assert float(ra) == 0.1


def _whole_tensor_orthogonal_grad(p, g):
    """A gradient whose rows 0/1 are (anti-)aligned with θ's rows (per-channel |cos| = 1: that view never
    fires) while ⟨g, θ⟩ = 0 over the whole tensor (the whole-tensor view fires)."""
    rows = p.detach().reshape(p.shape[0], -1)
    r = torch.randn(rows.shape, generator=g, dtype=p.dtype)
    r = r - rows * (r * rows).sum(1, keepdim=True) / (rows * rows).sum(1, keepdim=True)
    r[0] = rows[0]
    r[1] = -rows[1] * (rows[0] @ rows[0]) / (rows[1] @ rows[1])
    return r.reshape(p.shape)


@pytest.mark.parametrize("kind", ["adamp", "sgdp"])
def test_whole_tensor_projection_view_fires_and_matches_the_official_package(kind):
    from torchstep.optim.adamp import project_radial
    g = torch.Generator().manual_seed(7)
    ours = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in [(6, 4, 2), (8, 5)]]
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    kwargs = dict(lr=1e-2, weight_decay=1e-2) if kind == "adamp" else dict(lr=1e-1, momentum=0.9, weight_decay=1e-3)
    a = AdamP(ours, **kwargs) if kind == "adamp" else SGDP(ours, compat="official", **kwargs)   # in-place buffer quirk
    b = (adamp.AdamP if kind == "adamp" else adamp.SGDP)(theirs, **kwargs)
    for _ in range(10):
        grads = [_whole_tensor_orthogonal_grad(p, g) for p in ours]
        for p, gr in zip(ours, grads):      # the trigger: channel view off, whole-tensor view on
            update, ratio = project_radial(p.detach(), gr, gr.clone(), 0.1, 0.1, 1e-8)
            assert ratio == 0.1 and abs(float((update * p.detach()).sum())) < 1e-9 * float(p.detach().norm()) ** 2
            for sync_free in (False, True):          # both execution paths agree
                u2, r2 = project_radial(p.detach(), gr, gr.clone(), 0.1, 0.1, 1e-8, sync_free=sync_free)
                torch.testing.assert_close(u2, update, rtol=0, atol=1e-15)
                assert float(r2) == 0.1
        for p, q, gr in zip(ours, theirs, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        a.step(), b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)
