"""Newton–Schulz presets against the SVD polar factor and against a per-matrix loop."""
import pytest
import torch

from torchstep.ops.newton_schulz import PRESETS, as_matrix, flops, newton_schulz, newton_schulz_many


def _gaussian(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("preset,band,distance", [("quintic", (0.70, 1.25), (0.10, 0.20)),
                                                   ("polar_express5", (0.85, 1.15), (0.05, 0.13))])
def test_singular_value_bands_against_the_svd_polar_factor(preset, band, distance):
    G = _gaussian(512, 2048)
    O = newton_schulz(G, steps=5, preset=preset, compute_dtype=torch.float32)
    s = torch.linalg.svdvals(O)
    assert band[0] <= s.min() and s.max() <= band[1]
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    rel = (O - U @ Vh).norm() / (U @ Vh).norm()
    assert distance[0] < rel < distance[1]       # close to U·Vᵀ, by design not equal to it


def test_convergent_preset_reaches_the_exact_polar_factor():
    G = _gaussian(16, 24, dtype=torch.float64)
    O = newton_schulz(G, steps=60, preset="convergent", compute_dtype=None)
    U, _, Vh = torch.linalg.svd(G, full_matrices=False)
    torch.testing.assert_close(O, U @ Vh, rtol=0, atol=1e-8)


def test_matches_a_float64_evaluation_of_the_same_polynomial():
    G = _gaussian(32, 48)
    ref = newton_schulz(G.double(), compute_dtype=None).float()
    assert (newton_schulz(G, compute_dtype=torch.float32) - ref).norm() / ref.norm() < 1e-5
    assert (newton_schulz(G) - ref).norm() / ref.norm() < 2e-2       # bf16 compute (torch.optim.Muon: 1.3e-2)


def test_batched_equals_per_matrix_loop_bitwise_in_fp32_and_tall_is_transposed():
    mats = [_gaussian(24, 40, seed=i) for i in range(5)] + [_gaussian(40, 24, seed=9)]
    batched = newton_schulz_many(mats, compute_dtype=torch.float32)
    for m, b in zip(mats, batched):
        assert torch.equal(b, newton_schulz(m, compute_dtype=torch.float32))
    tall = mats[-1]
    torch.testing.assert_close(newton_schulz(tall, compute_dtype=torch.float32),
                               newton_schulz(tall.T, compute_dtype=torch.float32).T)


def test_user_preset_conv_reshape_zero_input_and_flops():
    G = _gaussian(8, 8)
    user = newton_schulz(G, preset=[PRESETS["quintic"].coefficients[0]] * 5, compute_dtype=torch.float32)
    assert torch.equal(user, newton_schulz(G, compute_dtype=torch.float32))
    assert as_matrix(torch.zeros(64, 3, 3, 3)).shape == (64, 27)
    assert torch.equal(newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))
    assert flops(512, 512) == 5 * 6 * 512 ** 3
    with pytest.raises(ValueError, match="preset"):
        newton_schulz(G, preset="cubic")
