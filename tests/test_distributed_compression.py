"""EF21 / EF21-W (Top-k, Rand-k) and gradient sketching: identities on simulated workers, one 2-process DDP run."""
import os
import pickle
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchstep.distributed import (CountSketch, EF21Simulator, EF21State, GaussianSketch, RandK, SketchState,
                                   TopK, compress, derive_seed, ef21_hook, ef21_stepsize, ef21_theta_beta,
                                   ef21w_weights, sketch_hook)

# ------------------------------------------------------------------ the card's quadratic problem (fp64)
LS = [1.0, 1.0, 1.0, 9.0]                  # f_i = (L_i/2)‖x − b_i‖², f = mean f_i is L = 3 smooth
B = torch.tensor(np.random.default_rng(0).standard_normal((4, 10)))
X_STAR = sum(L * b for L, b in zip(LS, B)) / sum(LS)


def _grads(x):
    return [L * (x - b) for L, b in zip(LS, B)]


def _full_grad(x):
    return sum(_grads(x)) / len(LS)


def _ef21_gd(lr, compressor, weights=None, steps=None, tol=1e-8, check=None):
    """GD driven by simulated EF21 from x⁰ = 0; stops after ``steps`` or when ‖∇f‖ < tol; returns (t, x)."""
    x = torch.zeros(10, dtype=torch.float64)
    sim = EF21Simulator(len(LS), compressor, weights)
    g = sim.init(_grads(x))
    t = 0
    while (t < steps) if steps is not None else (_full_grad(x).norm() >= tol and t < 10_000):
        x = x - lr * g
        g = sim.step(_grads(x))
        t += 1
        if check is not None:
            check(sim, x, g)
    return t, x


class _Threshold:
    """Fixed-threshold sparsifier |v_j| > τ: contractive-ish but not positively homogeneous."""
    sends_indices = True

    def __init__(self, tau):
        self.tau = tau

    def select(self, v, **_):
        return (v.abs() > self.tau).nonzero().flatten()


def test_topk_contraction_exact_size_and_tie_breaking():
    g = torch.Generator().manual_seed(0)
    for d, k in [(1, 1), (7, 1), (50, 5), (50, 49), (300, 30), (300, 300)]:
        for _ in range(20):
            v = torch.randn(d, generator=g, dtype=torch.float64) * torch.rand(d, generator=g, dtype=torch.float64)
            c = compress(v, TopK(k=k))
            assert (c != 0).sum() == k
            assert ((c - v).square().sum() <= (1 - k / d) * v.square().sum() * (1 + 1e-12)).item()
    # ties at the k-th magnitude: the lower indices win, whatever torch.topk returns
    v = torch.tensor([1.0, -3.0, 2.0, 3.0, -2.0, 2.0, 0.5])
    assert TopK(k=3).select(v).tolist() == [1, 2, 3]
    assert TopK(k=4).select(v).tolist() == [1, 2, 3, 4]
    assert TopK(ratio=0.5).num_kept(7) == 4 and TopK(ratio=1e-9).num_kept(7) == 1
    with pytest.raises(ValueError):
        TopK(k=0)
    with pytest.raises(ValueError):
        TopK(k=2, ratio=0.5)


def test_randk_is_contractive_in_expectation_and_regenerable():
    d, k = 40, 10
    comp = RandK(k=k, seed=5)
    v = torch.randn(d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = comp.select(v, rank=1, step=7, bucket=2)
    assert torch.equal(a, comp.indices(d, "cpu", rank=1, step=7, bucket=2))     # what other ranks rebuild
    assert not torch.equal(a, comp.select(v, rank=0, step=7, bucket=2))        # workers draw independently
    assert a.numel() == k and a.unique().numel() == k
    # E‖C(v) − v‖² = (1 − k/d)‖v‖²: each coordinate is kept with probability k/d; 4000 fixed draws
    errs = torch.stack([(compress(v, comp, rank=0, step=t, bucket=0) - v).square().sum() for t in range(4000)])
    ratio = errs.mean() / v.square().sum()
    se = errs.std() / v.square().sum() / 4000 ** 0.5
    assert abs(ratio - 0.75) < 4 * se and abs(ratio - 0.75) < 0.01, (ratio, se)


def test_stepsize_rules_reproduce_the_worked_numbers():
    theta, beta = ef21_theta_beta(0.1)
    assert theta == pytest.approx(0.0513167, abs=1e-7) and beta == pytest.approx(17.53815, abs=1e-5)
    for alpha, root in [(0.1, 18.48683), (0.5, 1 + 2 ** 0.5), (0.2, 8.472136), (0.01, 198.4987)]:
        t, b = ef21_theta_beta(alpha)
        assert (b / t) ** 0.5 == pytest.approx(root, abs=1e-4)
    assert ef21w_weights(LS) == pytest.approx([1 / 12, 1 / 12, 1 / 12, 3 / 4], abs=1e-15)
    g_qm = ef21_stepsize(3.0, LS, 0.1, mean="quadratic")
    g_am = ef21_stepsize(3.0, LS, 0.1)                 # Error Feedback Reloaded: arithmetic mean
    assert g_qm == pytest.approx(0.0114003, abs=1e-7) and g_am == pytest.approx(0.0171056, abs=1e-7)
    assert g_am / g_qm == pytest.approx(1.5005, abs=1e-4)
    assert ef21_stepsize(3.0, LS, 1.0) == 1 / 3         # k = d: plain GD's 1/L
    with pytest.raises(ValueError):
        ef21_stepsize(3.0, LS, 0.1, mean="geometric")


def test_ef21_with_k_equal_d_is_gradient_averaging():
    def check(sim, x, g):   # g = mean ∇f_i(x) (what DDP's default all-reduce gives) and g = mean g_i
        torch.testing.assert_close(g, _full_grad(x), rtol=0, atol=1e-12)
        torch.testing.assert_close(sim.g, sum(sim.g_local) / 4, rtol=0, atol=1e-12)
    _, x = _ef21_gd(0.1, TopK(k=10), steps=30, check=check)
    gd = torch.zeros(10, dtype=torch.float64)
    for _ in range(30):
        gd = gd - 0.1 * _full_grad(gd)
    torch.testing.assert_close(x, gd, rtol=0, atol=1e-12)


@pytest.mark.parametrize("compressor", [TopK(k=2), RandK(k=2, seed=3)], ids=["topk", "randk"])
def test_ef21w_equals_ef21_for_homogeneous_compressors(compressor):
    w = ef21w_weights(LS)

    def inv_w(sim, x, g):     # EF21-W invariant g = Σ w_i g_i
        torch.testing.assert_close(g, sum(wi * gi for wi, gi in zip(w, sim.g_local)), rtol=0, atol=1e-12)

    def inv(sim, x, g):       # EF21 invariant g = (1/n) Σ g_i
        torch.testing.assert_close(g, sum(sim.g_local) / 4, rtol=0, atol=1e-12)
    _, x = _ef21_gd(0.03, compressor, steps=50, check=inv)
    _, xw = _ef21_gd(0.03, compressor, w, steps=50, check=inv_w)
    assert (x - xw).abs().max() <= 1e-12


def test_ef21w_differs_for_a_fixed_threshold_sparsifier():
    # homogeneity C(λv) = λC(v) is what makes EF21-W ≡ EF21; a fixed threshold breaks it (card: 0.153)
    _, x = _ef21_gd(0.03, _Threshold(0.5), steps=50)
    _, xw = _ef21_gd(0.03, _Threshold(0.5), ef21w_weights(LS), steps=50)
    assert (x - xw).abs().max().item() == pytest.approx(0.1528, abs=5e-4)


def test_ef21_converges_with_the_theoretical_steps_and_reloaded_is_faster():
    alpha = 2 / 10                                   # Top-2 of d = 10
    g_qm = ef21_stepsize(3.0, LS, alpha, mean="quadratic")
    g_am = ef21_stepsize(3.0, LS, alpha)
    assert g_qm == pytest.approx(0.0239096, abs=1e-7) and g_am == pytest.approx(0.0351909, abs=1e-7)
    t_qm, x_qm = _ef21_gd(g_qm, TopK(k=2))
    t_am, x_am = _ef21_gd(g_am, TopK(k=2))
    t_w, x_w = _ef21_gd(g_am, TopK(k=2), ef21w_weights(LS))
    assert (t_qm, t_am, t_w) == (260, 171, 171)      # iterations to ‖∇f‖ < 1e-8 (the card's counts)
    for x in (x_qm, x_am, x_w):                      # ∇f = 3(x − x*) ⇒ ‖x − x*‖ < 1e-8/3
        assert (x - X_STAR).norm() < 1e-8 / 3


# ------------------------------------------------------------------------------------------ sketching

@pytest.mark.parametrize("sk", [GaussianSketch(s=6, block_elems=20), CountSketch(s=6)], ids=["gauss", "count"])
def test_sketch_is_linear_and_desketch_is_its_transpose(sk):
    d, seed = 23, derive_seed(0, 4, 1)
    g = torch.Generator().manual_seed(2)
    vs = [torch.randn(d, generator=g, dtype=torch.float64) for _ in range(3)]
    # R built column by column from the (block-regenerated) sketch of unit vectors
    R = torch.stack([sk.sketch(e, seed) for e in torch.eye(d, dtype=torch.float64)], dim=1)
    assert R.shape == (6, d)
    y = sum(sk.sketch(v, seed) for v in vs)          # what all_reduce of the sketches gives
    torch.testing.assert_close(y, R @ sum(vs), rtol=0, atol=1e-12)
    torch.testing.assert_close(sk.desketch(y, d, seed), R.T @ y, rtol=0, atol=1e-12)
    assert torch.equal(sk.sketch(vs[0], seed), sk.sketch(vs[0], seed))        # same seed, same R on every rank
    assert not torch.equal(sk.sketch(vs[0], seed), sk.sketch(vs[0], seed + 1))


@pytest.mark.parametrize("sk,factor", [(GaussianSketch(s=16), 65 / 16), (CountSketch(s=16), 63 / 16)],
                         ids=["gauss", "count"])
def test_sketch_unbiased_with_the_card_variance_factor(sk, factor):
    d, draws = 64, 4000
    v = torch.randn(d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sk.variance_factor(d) == factor
    est = torch.stack([sk.desketch(sk.sketch(v, derive_seed(9, t)), d, derive_seed(9, t)) for t in range(draws)])
    errs = (est - v).square().sum(1) / v.square().sum()
    se = errs.std() / draws ** 0.5
    # fixed seeds: deterministic; the bounds are ~4 standard errors and the card's ±5 %
    assert abs(errs.mean() - factor) < 4 * se and abs(errs.mean() / factor - 1) < 0.05, (errs.mean(), se)
    # unbiased: E‖mean − v‖² = factor‖v‖²/draws; a bias would not shrink with draws
    assert (est.mean(0) - v).square().sum() / v.square().sum() < 2 * factor / draws


# --------------------------------------------------------------------- one 2-process gloo DDP run
STEPS, LR, START = 6, 0.1, 2
D = 8 * 16 + 16 + 16 * 4 + 4                          # parameters of _model (one DDP bucket)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()


def _batch(step, rank, world):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 4, generator=g, dtype=torch.float64)
    return x[rank::world], y[rank::world]


def _methods():
    return {"topk": lambda: (EF21State(compressor=TopK(k=20), start_iter=START), ef21_hook),
            "randk": lambda: (EF21State(compressor=RandK(k=20, seed=3), start_iter=START), ef21_hook),
            "ef21w": lambda: (EF21State(compressor=TopK(k=20), start_iter=START, weights=[0.25, 0.75]), ef21_hook),
            "full": lambda: (EF21State(compressor=TopK(ratio=1.0), start_iter=START), ef21_hook),
            "count": lambda: (SketchState(sketch=CountSketch(s=50), seed=1), sketch_hook),
            "gauss": lambda: (SketchState(sketch=GaussianSketch(s=50, block_elems=500), seed=1), sketch_hook),
            "default": lambda: (None, None)}


def _worker(rank, world, init_file, out_prefix):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    out = {}
    for name, make in _methods().items():
        net = _model()
        index_of = {p.data_ptr(): i for i, p in enumerate(net.parameters())}
        model = torch.nn.parallel.DistributedDataParallel(net)
        state, hook = make()
        orders, sent = {}, []
        if hook is not None:
            def recorded(st, bucket, hook=hook, orders=orders):   # the bucket's parameter order, per iteration
                orders.setdefault(st.iter, []).append([index_of[p.data_ptr()] for p in bucket.parameters()])
                return hook(st, bucket)
            model.register_comm_hook(state, recorded)
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(STEPS):
            x, y = _batch(step, rank, world)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if state is not None:
                sent.append((state.bytes_sent, state.dense_bytes))
        out[name] = {"params": [p.detach().clone() for p in model.parameters()], "orders": orders, "sent": sent}
        if name == "topk":                           # state survives a pickle round trip (group dropped)
            back = pickle.loads(pickle.dumps(state))
            out["pickle_ok"] = (back.process_group is None and back.iter == STEPS
                                and torch.equal(back.g[0], state.g[0]) and torch.equal(back.g_local[0],
                                                                                          state.g_local[0]))
    torch.save(out, f"{out_prefix}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _simulate(name, orders):
    """The same training in one process: per-worker gradients, the aggregation rule, torch SGD."""
    model, world = _model(), 2
    params = list(model.parameters())
    state, _ = _methods()[name]()
    opt = torch.optim.SGD(params, lr=LR)
    sim = None
    if isinstance(state, EF21State):
        sim = EF21Simulator(world, state.compressor, state.weights, step_offset=START - 1)
    for step in range(STEPS):
        (order,) = orders[step] if orders else [list(range(len(params)))]   # one bucket
        flats = []
        for r in range(world):
            x, y = _batch(step, r, world)
            gr = torch.autograd.grad(torch.nn.functional.mse_loss(model(x), y), params)
            flats.append(torch.cat([gr[i].flatten() for i in order]))
        if isinstance(state, SketchState):
            seed = derive_seed(state.seed, step, 0)
            agg = state.sketch.desketch(sum(state.sketch.sketch(f, seed) for f in flats), D, seed) / world
        elif sim is None or step < START - 1:
            agg = sum(f / world for f in flats)
        else:
            agg = sim.init(flats) if step == START - 1 else sim.step(flats)
        for i, piece in zip(order, agg.split([params[i].numel() for i in order])):
            params[i].grad = piece.view_as(params[i]).clone()
        opt.step()
    return [p.detach() for p in params]


def test_ddp_hooks_on_two_gloo_processes_match_the_simulation():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, prefix = os.path.join(tmp, "init"), os.path.join(tmp, "out")
        mp.spawn(_worker, args=(2, init_file, prefix), nprocs=2, join=True)
        r0, r1 = (torch.load(f"{prefix}.{r}", weights_only=False) for r in (0, 1))
    assert r0["pickle_ok"] and r1["pickle_ok"]
    for name in _methods():
        # every rank holds the same g, hence the same parameters (bitwise)
        assert all(torch.equal(a, b) for a, b in zip(r0[name]["params"], r1[name]["params"])), name
        if name != "default":
            assert all(len(r0[name]["orders"][t]) == 1 for t in range(STEPS)), "expected one bucket"
            for p, q in zip(r0[name]["params"], _simulate(name, r0[name]["orders"])):
                torch.testing.assert_close(p, q, rtol=0, atol=1e-12, msg=name)
    # EF21 with k = d ≡ DDP's default averaging
    for p, q in zip(r0["full"]["params"], r0["default"]["params"]):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-12)
    # bytes per worker per step: warm-up = dense fp64; Top-k 20 values (8 B) + 20 int32 indices; Rand-k values
    dense = D * 8
    assert r0["topk"]["sent"] == [(dense, dense)] * START + [(20 * 12, dense)] * (STEPS - START)
    assert r0["randk"]["sent"] == [(dense, dense)] * START + [(20 * 8, dense)] * (STEPS - START)
    assert r0["count"]["sent"] == r0["gauss"]["sent"] == [(50 * 8, dense)] * STEPS


def test_hook_state_validation():
    with pytest.raises(ValueError):
        EF21State(start_iter=1)
    with pytest.raises(ValueError):
        EF21Simulator(3, TopK(k=1), weights=[0.5, 0.5])
