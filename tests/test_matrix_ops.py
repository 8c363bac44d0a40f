"""Sinkhorn normalisation, inverse square roots, whitening and soft spectral clipping vs references."""
import pytest
import torch

from torchstep.ops.sinkhorn import sinkhorn_normalize
from torchstep.ops.spectral import inverse_sqrt, soft_spectral_clip, whiten


def _g(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_sinkhorn_column_norms_row_error_and_frobenius():
    G = _g(256, 512)
    m, n = G.shape
    errors = {}
    for L in (1, 2, 5, 20):
        X = sinkhorn_normalize(G, L)
        torch.testing.assert_close(X.norm(dim=0), torch.full((n,), m ** 0.5, dtype=G.dtype), rtol=1e-12, atol=0)
        errors[L] = ((X.norm(dim=1) - n ** 0.5).abs().max() / n ** 0.5).item()
    assert errors[1] > errors[2] > errors[5] > errors[20] and errors[5] < 1e-8 and errors[20] < 1e-14
    assert sinkhorn_normalize(G, 20).norm().item() == pytest.approx((m * n) ** 0.5, rel=1e-12)


def test_sinkhorn_fixed_point_signs_scale_invariance_order_and_zero_rows():
    G = _g(12, 20)
    X = sinkhorn_normalize(G, 200)
    ratio = (X * X) / (G * G)
    assert torch.linalg.matrix_rank(ratio, rtol=1e-10) == 1                       # diag(u)(G⊙G)diag(w)
    torch.testing.assert_close((X * X).sum(1), torch.full((12,), 20.0, dtype=G.dtype))
    torch.testing.assert_close((X * X).sum(0), torch.full((20,), 12.0, dtype=G.dtype))
    assert torch.equal(X.sign(), G.sign())
    assert (sinkhorn_normalize(1e-6 * G) - sinkhorn_normalize(G)).abs().max() < 1e-12
    assert not torch.allclose(sinkhorn_normalize(G.T, 1), sinkhorn_normalize(G, 1).T)   # rows first
    Z = G.clone()
    Z[3] = 0
    Z[:, 5] = 0
    out = sinkhorn_normalize(Z)
    assert torch.isfinite(out).all() and out[3].abs().max() == 0 and out[:, 5].abs().max() == 0


def test_inverse_sqrt_and_whitening_match_eigh_and_svd():
    A = _g(32, 64)
    S = A @ A.T / 64 + 0.5 * torch.eye(32, dtype=A.dtype)
    w, V = torch.linalg.eigh(S)
    torch.testing.assert_close(inverse_sqrt(S, 30), V @ torch.diag(w ** -0.5) @ V.T, rtol=1e-9, atol=1e-9)
    Z = _g(64, 256).float()
    U, _, Vh = torch.linalg.svd(Z, full_matrices=False)
    assert ((whiten(Z, 10) - U @ Vh).norm() / (U @ Vh).norm()) < 1e-3
    assert whiten(Z.bfloat16(), 10).dtype == torch.bfloat16


@pytest.mark.parametrize("c", [1.0, 5.0, 10.0])
def test_soft_spectral_clip_matches_the_svd_map(c):
    U = _g(64, 128).float() * 3
    u, s, vh = torch.linalg.svd(U, full_matrices=False)
    ref = u @ torch.diag(s / (1 + s ** 2 / c ** 2).sqrt()) @ vh
    out = soft_spectral_clip(U, c, steps=10)
    assert ((out - ref).norm() / ref.norm()) < 1e-5
    assert ((soft_spectral_clip(U, c, steps=3) - ref).norm() / ref.norm()) > 1e-5   # the step count matters
    assert torch.linalg.svdvals(out).max() < c
    torch.testing.assert_close(soft_spectral_clip(U.T, c), out.T, rtol=1e-5, atol=1e-6)
    small = 1e-3 * U
    torch.testing.assert_close(soft_spectral_clip(small, 100.0), small, rtol=1e-6, atol=1e-9)
    v = torch.tensor([3.0, 4.0])                       # ‖v‖ = 5
    # the official vector map: unchanged when ‖U‖ ≤ c, else U/√(1 + (‖U‖/c)²)
    assert torch.equal(soft_spectral_clip(v, 5.0), v)
    assert torch.equal(soft_spectral_clip(v, 6.0), v)
    torch.testing.assert_close(soft_spectral_clip(v, 2.5), v / 5 ** 0.5)      # (‖v‖/c)² = 4
