"""AdAdaGrad (arXiv 2402.11215, algorithms.md §16): the AdaGrad(-Norm) rules and the adaptive-batch controller.

The card's tests: (1) the norm test on a 64 × 100 per-sample matrix with ‖Var‖₁ = 386.4, ‖ḡ‖² = 12.73 proposes
b ≈ 3035; (2) the batch size never decreases and is clipped; (3) inner-product and orthogonality statistics
against a NumPy float64 reference (1e-10), augmented = max; (4) ``torch.func`` per-sample gradients equal a
loop over samples (1e-6).  Plus the update rules against hand-computed steps and ``torch.optim.Adagrad``, and a
small logistic regression whose batch grows through the sampler.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchstep.optim import AdAdaGrad, AdAdaGradNorm
from torchstep.scaling.adaptive_batch import (AdaptiveBatch, AdaptiveBatchSampler, augmented_test,
                                              gradient_statistics, inner_product_test, next_batch_size, norm_test,
                                              orthogonality_test, per_sample_gradients)


def matrix_with(variance_l1: float, grad_sq_norm: float, rows: int = 64, cols: int = 100, seed: int = 0):
    """A seeded (rows, cols) float64 matrix scaled to an exact ‖Var‖₁ (unbiased) and ‖mean‖²."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    noise = noise - noise.mean(dim=0)
    noise = noise * math.sqrt(variance_l1 / noise.var(dim=0, correction=1).sum().item())
    direction = torch.randn(cols, generator=g, dtype=torch.float64)
    return noise + direction * math.sqrt(grad_sq_norm) / direction.norm()


# --------------------------------------------------------------------------- (1) the card's norm test
def test_norm_test_on_the_card_matrix_proposes_3035():
    G = matrix_with(386.4, 12.73)
    stats = gradient_statistics(G)
    assert stats.samples == 64
    torch.testing.assert_close(stats.variance_l1, torch.tensor(386.4, dtype=torch.float64), rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.grad_sq_norm, torch.tensor(12.73, dtype=torch.float64), rtol=1e-12, atol=0)
    proposed = norm_test(G, eta=0.1).item()
    assert proposed == pytest.approx(386.4 / (0.01 * 12.73), rel=1e-12) and abs(proposed - 3035) < 1   # 3035.35
    controller = AdaptiveBatch(batch_size=64, max_batch_size=10 ** 6, test="norm", eta=0.1)
    assert controller.update(G) == 3036 == math.ceil(proposed)
    assert controller.last["proposed"] == pytest.approx(proposed, rel=1e-12)


# --------------------------------------------------------------------------- (2) monotone and clipped
def test_batch_size_never_decreases_and_is_clipped_at_max_batch_size():
    controller = AdaptiveBatch(batch_size=8, max_batch_size=500, eta=0.1)
    sizes = [controller.batch_size]
    # proposals 10, 5, 30, 10, 3000 (clipped), 0.1: once at the cap no test runs (not even on None)
    for variance, mean_sq in [(0.1, 1.0), (0.05, 1.0), (0.3, 1.0), (1.0, 10.0), (30.0, 1.0), (0.001, 1.0)]:
        proposed = norm_test(matrix_with(variance, mean_sq, rows=8, cols=20), eta=0.1).item()
        sizes.append(controller.update(matrix_with(variance, mean_sq, rows=8, cols=20)))
        assert sizes[-1] == min(max(sizes[-2], math.ceil(proposed)), 500)
    assert sizes == [8, 10, 10, 30, 30, 500, 500]
    assert not controller.due and controller.update(None) == 500
    # a zero mean gradient proposes inf (clipped), zero variance and zero mean proposes 0 (kept)
    zero_mean = torch.tensor([[1.0, -2.0], [-1.0, 2.0]], dtype=torch.float64)
    assert norm_test(zero_mean).item() == math.inf and norm_test(torch.zeros(3, 4)).item() == 0.0
    assert AdaptiveBatch(2, 64).update(zero_mean) == 64 and AdaptiveBatch(2, 64).update(torch.zeros(3, 4)) == 2
    assert next_batch_size(10, math.nan, 64) == 10 and next_batch_size(10, 10.2, 64) == 11


def test_interval_and_validation():
    controller = AdaptiveBatch(batch_size=4, max_batch_size=10 ** 6, interval=3)
    noisy = matrix_with(100.0, 1.0, rows=4, cols=10)
    grown = [controller.update(noisy if controller.due else None) for _ in range(7)]
    assert [controller.calls] == [7] and grown[0] == grown[1] == grown[2] > 4 and grown[3] >= grown[2]
    for bad, name in [(dict(batch_size=1), "batch_size"), (dict(max_batch_size=2), "max_batch_size"),
                      (dict(test="x"), "test"), (dict(eta=0.0), "eta"), (dict(theta=-1.0), "theta"),
                      (dict(nu=math.inf), "nu"), (dict(interval=0), "interval"), (dict(compat="x"), "compat")]:
        with pytest.raises(ValueError, match=name):
            AdaptiveBatch(**{"batch_size": 4, "max_batch_size": 64, **bad})
    with pytest.raises(ValueError, match="per_sample"):
        gradient_statistics(torch.randn(1, 5))       # one sample: no unbiased variance


def test_controller_state_dict_round_trip_weights_only():
    controller = AdaptiveBatch(batch_size=4, max_batch_size=4096, test="augmented", compat="official", interval=2)
    controller.update(matrix_with(50.0, 1.0, rows=4, cols=6))
    buf = io.BytesIO()
    torch.save(controller.state_dict(), buf)
    buf.seek(0)
    fresh = AdaptiveBatch(batch_size=2, max_batch_size=8)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.state_dict() == controller.state_dict() and fresh.batch_size > 4 and fresh.calls == 1
    nxt = matrix_with(500.0, 1.0, rows=4, cols=6)
    assert fresh.update(nxt) == controller.update(nxt) and fresh.update(nxt) == controller.update(nxt)


# --------------------------------------------------------------------------- (3) NumPy reference
def numpy_statistics(G: np.ndarray) -> tuple[float, float, float, float]:
    mean = G.mean(axis=0)
    sq = float(mean @ mean)
    inner = G @ mean
    orthogonal = G - np.outer(inner / sq, mean)
    return (float(G.var(axis=0, ddof=1).sum()), sq, float(inner.var(ddof=1)),
            float(orthogonal.var(axis=0, ddof=1).sum()))


def test_inner_product_and_orthogonality_statistics_match_numpy_float64():
    G = matrix_with(40.0, 2.0, rows=32, cols=50, seed=3)
    G[:, :5] *= 7.0                                    # anisotropic noise: the two tests disagree
    var_l1, sq, ip_var, orth_var = numpy_statistics(G.numpy())
    stats = gradient_statistics(G)
    for ours, ref in [(stats.variance_l1, var_l1), (stats.grad_sq_norm, sq), (stats.inner_product_variance, ip_var),
                      (stats.orthogonal_variance, orth_var)]:
        assert ours.dtype == torch.float64 and ours.item() == pytest.approx(ref, rel=1e-10, abs=0)
    theta, nu = 0.2, 0.3
    ip, orth = inner_product_test(G, theta).item(), orthogonality_test(G, nu).item()
    assert ip == pytest.approx(ip_var / (theta ** 2 * sq ** 2), rel=1e-10)
    assert orth == pytest.approx(orth_var / (nu ** 2 * sq), rel=1e-10)
    assert augmented_test(G, theta, nu).item() == max(ip, orth) and ip != orth
    # blocks are one vector by default; blockwise=True is the official per-tensor sum
    blocks = {"a": G[:, :20].reshape(32, 4, 5), "b": G[:, 20:]}
    whole = gradient_statistics(blocks)
    assert whole.orthogonal_variance.item() == pytest.approx(orth_var, rel=1e-10)
    assert whole.inner_product_variance.item() == pytest.approx(ip_var, rel=1e-10)
    parts = [numpy_statistics(b.reshape(32, -1).numpy()) for b in blocks.values()]
    official = gradient_statistics(blocks, blockwise=True)
    for ours, k in [(official.inner_product_variance, 2), (official.orthogonal_variance, 3),
                    (official.variance_l1, 0), (official.grad_sq_norm, 1)]:
        assert ours.item() == pytest.approx(sum(p[k] for p in parts), rel=1e-10)


def test_orthogonality_column_chunks_equal_one_block(monkeypatch):
    import torchstep.scaling.adaptive_batch as ab
    G = matrix_with(10.0, 1.0, rows=6, cols=37, seed=5)
    reference = ab.gradient_statistics(G).orthogonal_variance
    monkeypatch.setattr(ab, "_CHUNK_ELEMENTS", 6 * 4)        # 4 columns per chunk
    assert ab.gradient_statistics(G).orthogonal_variance.item() == pytest.approx(reference.item(), rel=1e-12)


# --------------------------------------------------------------------------- (4) per-sample gradients
def _mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_per_sample_gradients_equal_a_loop_over_samples():
    model = _mlp()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 3, (10,), generator=g)
    per_sample = per_sample_gradients(model, F.cross_entropy, x, y, chunk_size=4)
    assert all(p.grad is None for p in model.parameters())           # nothing written to .grad
    for i in range(10):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-6, atol=1e-6)
    # the mean of the per-sample gradients is the batch gradient of the mean loss
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(per_sample[name].mean(0), p.grad, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- the update rules
def _two_tensors():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    grads = [[torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, generator=g, dtype=torch.float64)]
             for _ in range(3)]
    return w, b, grads


def test_adagrad_norm_group_step_is_the_hand_computed_one():
    w, b, grads = _two_tensors()
    lr, b0_sq, eps = 0.3, 0.04, 1e-10
    opt = AdAdaGradNorm([w, b], lr=lr, initial_accumulator_value=b0_sq, eps=eps)
    expected_w, expected_b, total = w.detach().clone(), b.detach().clone(), b0_sq
    for k, (gw, gb) in enumerate(grads):
        w.grad, b.grad = gw, (gb if k != 1 else None)               # step 2: the bias has no gradient
        opt.step()
        total += gw.square().sum().item() + (gb.square().sum().item() if k != 1 else 0.0)
        step = lr / (math.sqrt(total) + eps)                          # η / (√(b₀² + Σ‖g‖²) + ε)
        expected_w -= step * gw
        if k != 1:
            expected_b -= step * gb
        torch.testing.assert_close(w.detach(), expected_w, rtol=1e-14, atol=1e-15)
        torch.testing.assert_close(b.detach(), expected_b, rtol=1e-14, atol=1e-15)
    assert opt.state[w]["sum"].shape == () and int(opt.state[b]["step"]) == 2


def test_adagrad_norm_tensor_and_row_accumulators_by_hand():
    w, b, grads = _two_tensors()
    conv = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    gc = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    tensor_opt = AdAdaGradNorm([w.detach().clone().requires_grad_()], lr=0.5, accumulator="tensor")
    (wt,) = tensor_opt.param_groups[0]["params"]
    wt.grad = grads[0][0]
    tensor_opt.step()
    torch.testing.assert_close(wt.detach(), w.detach() - 0.5 * grads[0][0] / (math.sqrt(1e-2 + grads[0][0].square().sum())
                                                                               + 1e-10), rtol=1e-14, atol=1e-15)
    # the official Adagradnorm: S = 1e-2 + Σ ‖row‖², per output row (a vector's rows are its entries), lr 1
    params = [w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), conv.detach().clone().requires_grad_()]
    row_opt = AdAdaGradNorm(params, accumulator="row")
    for p, g in zip(params, [grads[0][0], grads[0][1], gc]):
        p.grad = g
    row_opt.step()
    for p, start, g in zip(params, [w, b, conv], [grads[0][0], grads[0][1], gc]):
        rows = g.reshape(g.shape[0], -1) if g.dim() > 1 else g.reshape(-1, 1)
        std = (1e-2 + rows.square().sum(1, keepdim=True)).sqrt() + 1e-10
        torch.testing.assert_close(p.detach(), (start.detach().reshape(rows.shape[0], -1) - rows / std).reshape(g.shape),
                                   rtol=1e-14, atol=1e-15)
    assert row_opt.state[params[2]]["sum"].shape == (2, 1, 1, 1)


def test_adadagrad_is_torch_adagrad_bit_for_bit():
    w, b, grads = _two_tensors()
    ours_params = [w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
    ref_params = [w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()]
    ours = AdAdaGrad(ours_params, lr=0.1, initial_accumulator_value=0.5, weight_decay=1e-2, maximize=True)
    ref = torch.optim.Adagrad(ref_params, lr=0.1, initial_accumulator_value=0.5, weight_decay=1e-2, maximize=True,
                              foreach=False)
    for step_grads in grads:
        for p, q, g in zip(ours_params, ref_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ours_params, ref_params):
            assert torch.equal(p, q)
    assert torch.equal(ours.state[ours_params[0]]["sum"], ref.state[ref_params[0]]["sum"])


def test_accumulator_is_fixed_once_state_exists_and_restricted_per_class():
    w, _, grads = _two_tensors()
    opt = AdAdaGradNorm([w], accumulator="tensor")
    w.grad = grads[0][0]
    opt.step()
    opt.param_groups[0]["accumulator"] = "row"
    with pytest.raises(ValueError, match="accumulator"):
        opt.step()
    with pytest.raises(ValueError, match="accumulator"):
        AdAdaGrad([w], accumulator="group")
    with pytest.raises(ValueError, match="initial_accumulator_value"):
        AdAdaGradNorm([w], initial_accumulator_value=-1.0)


# --------------------------------------------------------------------------- the sampler and a growing run
def test_sampler_reads_the_batch_size_per_batch_and_covers_each_epoch_once():
    controller = AdaptiveBatch(batch_size=3, max_batch_size=100)
    sampler = AdaptiveBatchSampler(20, controller, seed=4)
    it = iter(sampler)
    first = [next(it), next(it)]
    controller.batch_size = 7                                   # (as update() would set it)
    rest = list(it)
    sizes = [len(b) for b in first + rest]
    assert sizes == [3, 3, 7, 7] and sampler.epoch == 1 and sampler.position == 0
    seen = [i for batch in first + rest for i in batch]
    assert sorted(seen) == list(range(20)) and seen == sampler.order(0).tolist()
    # resume mid-epoch from a state dict: the same batches follow
    it = iter(sampler)
    next(it)
    saved = sampler.state_dict()
    expected = list(it)
    twin = AdaptiveBatchSampler(20, controller, seed=4)
    twin.load_state_dict(saved)
    assert list(twin) == expected and sampler.order(1).tolist() != sampler.order(0).tolist()
    dropped = AdaptiveBatchSampler(20, controller, shuffle=False, drop_last=True)
    assert [len(b) for b in dropped] == [7, 7] and next(iter(dropped))[0] == 0


def test_logistic_regression_batch_grows_through_the_loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 10, generator=g)
    y = (x @ torch.randn(10, generator=g) + 0.5 * torch.randn(256, generator=g) > 0).long()
    dataset = TensorDataset(x, y)

    def run():
        torch.manual_seed(0)
        model = torch.nn.Linear(10, 2)
        opt = AdAdaGradNorm(model.parameters(), lr=0.5)
        controller = AdaptiveBatch(batch_size=4, max_batch_size=256, eta=0.5)
        sampler = AdaptiveBatchSampler(len(dataset), controller, seed=1)
        loader = DataLoader(dataset, batch_sampler=sampler)     # num_workers=0: drawn when the loop asks
        sizes = []
        for _ in range(2):
            for xb, yb in loader:
                last_of_epoch = sampler.position == len(dataset)
                assert len(yb) == controller.batch_size or (last_of_epoch and len(yb) < controller.batch_size)
                controller.step(model, F.cross_entropy, xb, yb)      # the test on this batch, before the step
                sizes.append(controller.batch_size)
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
        with torch.no_grad():
            return sizes, F.cross_entropy(model(x), y).item()

    sizes, final_loss = run()
    assert sizes == sorted(sizes) and sizes[0] > 4 and sizes[-1] >= 64     # grows, never shrinks
    assert final_loss < math.log(2) - 0.2
    assert run() == (sizes, final_loss)                                     # deterministic
