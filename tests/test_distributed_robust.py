"""Robust aggregation (torchstep.distributed.robust): the reference card's worked numbers, invariances, the
implicit (Gram/eigen) Flag Aggregator against an explicit construction, convergence of a Byzantine
parameter-server simulation, and the DDP comm hook on 2 gloo processes."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchstep.distributed.robust import (LeastSquaresTask, ParameterServer, RobustHookState, byzantine_gradients,
                                          coordinate_median, flag_aggregate, krum, krum_scores, mean_aggregate,
                                          multi_krum, robust_aggregate, robust_comm_hook,
                                          simulate_parameter_server, trimmed_mean)

F64 = torch.float64
# the card's example: four honest gradients around e1, one orthogonal outlier (p = 5 in R^3)
CARD = torch.tensor([[1, .1, 0], [1, -.1, 0], [1, 0, .1], [1, 0, -.1], [0, 0, 5.]], dtype=F64)


def _close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), rtol=0, atol=tol)


# ------------------------------------------------------------------------------------------------ worked numbers

def test_flag_aggregator_worked_numbers():
    out, info = flag_aggregate(CARD, iters=100, init="flag_mean", return_info=True)   # converged flag median
    _close(out, [3.980149, 0, 0])
    _close(out[0], 4 / 1.01 ** 0.5, 1e-12)                     # 4·(1/√1.01)·e1, the outlier contributes 0
    _close(info.objective[-1], 1.398015)
    _close(info.weights_at_solution, [3.170146] * 4 + [1.0])
    y0 = torch.tensor([0.3, -0.2, 0.1], dtype=F64)
    _close(flag_aggregate(CARD, iters=1, init=y0 / y0.norm()), [3.983416, -0.024114, 0.013787])
    _close(flag_aggregate(CARD, iters=1, init=y0), [3.983416, -0.024114, 0.013787])   # init is orthonormalised
    same = torch.tensor([[3, 4, 0.]] * 4, dtype=F64)
    _close(flag_aggregate(same), [2.4, 3.2, 0])                 # norm p/r = 4 whatever ‖g‖ is
    _close(flag_aggregate(same, r=2).norm(), 2.0)               # p/r with r = 2 (rank-deficient direction dropped)
    _close(flag_aggregate(same, scale="median_norm"), [3, 4, 0], 1e-12)


def test_classical_rules_worked_numbers():
    _close(mean_aggregate(CARD), [0.8, 0, 1])
    _close(coordinate_median(CARD), [1, 0, 0])
    _close(trimmed_mean(CARD, f=1), [1, 0, 0.033333])
    _close(krum_scores(CARD, f=1), [0.04, 0.04, 0.04, 0.04, 51.02], 1e-12)
    _close(krum(CARD, f=1), [1, 0.1, 0], 0)                     # ties → lowest index; an actual worker gradient
    _close(multi_krum(CARD, f=1), [1, 0, 0], 1e-12)              # mean of the p − f = 4 honest gradients
    _close(multi_krum(CARD, f=1, m=2), [1, 0, 0], 1e-12)         # (1, .1, 0) and (1, −.1, 0)
    _close(coordinate_median(CARD[:4]), [1, 0, 0])              # even p: mean of the two middle values
    _close(coordinate_median(torch.tensor([[0.], [1.], [3.], [10.]])), [2.0])
    _close(robust_aggregate(list(CARD), "trimmed_mean", f=1), [1, 0, 0.033333])   # list input, by name
    with pytest.raises(ValueError):
        krum(CARD, f=2)                                        # needs p > 2f + 2
    with pytest.raises(ValueError):
        trimmed_mean(CARD, f=3)


# ------------------------------------------------------------------------------------------------ invariances

def _random_grads(p=6, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d, generator=g, dtype=F64) + 0.7 * torch.randn(p, d, generator=g, dtype=F64)


def test_flag_scale_invariance_equivariance_and_permutation():
    G = _random_grads()
    c = torch.tensor([0.1, 3.0, 1.0, 7.0, 0.5, 2.0], dtype=F64)[:, None]
    for kw in ({}, {"iters": 10, "init": "flag_mean", "r": 2}, {"lam": 0.5, "iters": 3}):
        ref = flag_aggregate(G, **kw)
        _close(flag_aggregate(c * G, **kw), ref, 1e-12)         # positive rescaling of any worker: no change
        perm = torch.tensor([3, 0, 5, 1, 4, 2])
        _close(flag_aggregate(G[perm], **kw), ref, 1e-12)       # worker order does not matter
    Q = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(1), dtype=F64))[0]
    for kw in ({"iters": 10, "init": "flag_mean"}, {"iters": 10, "init": "flag_mean", "r": 3, "lam": 0.2}):
        _close(flag_aggregate(G @ Q.T, **kw), Q @ flag_aggregate(G, **kw), 1e-10)   # FA(Q g_i) = Q FA(g_i)


def test_classical_rules_permutation_and_identical_inputs():
    G = _random_grads(p=7, seed=3)
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    for rule, f in (("median", 0), ("trimmed_mean", 2), ("krum", 2), ("multi_krum", 2), ("mean", 0)):
        _close(robust_aggregate(G[perm], rule, f=f), robust_aggregate(G, rule, f=f), 1e-12)
    g = torch.randn(4, 5, generator=torch.Generator().manual_seed(4))
    same = [g.clone() for _ in range(6)]
    for rule, f in (("median", 0), ("median", 2), ("trimmed_mean", 2), ("krum", 1)):
        assert torch.equal(robust_aggregate(same, rule, f=f), g), rule   # shape kept, value exact
    torch.testing.assert_close(multi_krum(same, f=1), g, rtol=1e-6, atol=0)   # a mean of 5 copies: rounding
    # Krum picks from the honest cluster; Multi-Krum averages only honest gradients
    gen = torch.Generator().manual_seed(5)
    honest = torch.ones(6, 8, dtype=F64) + 0.1 * torch.randn(6, 8, generator=gen, dtype=F64)
    byz = torch.stack([-20 * torch.ones(8, dtype=F64), 30 * torch.randn(8, generator=gen, dtype=F64)])
    G = torch.cat([byz[:1], honest[:3], byz[1:], honest[3:]])   # Byzantine at positions 0 and 4
    pick = krum(G, f=2)
    assert any(torch.equal(pick, h) for h in honest)
    assert krum_scores(G, f=2)[[0, 4]].min() > 10 * krum_scores(G, f=2)[[1, 2, 3, 5, 6, 7]].max()
    _close(multi_krum(G, f=2), honest.mean(0), 1e-12)


def test_flag_irls_objective_decreases_and_flag_mean_is_the_svd():
    G = _random_grads(p=6, d=20, seed=7)
    G[5] = 8 * torch.randn(20, generator=torch.Generator().manual_seed(8), dtype=F64)    # an outlier
    _, info = flag_aggregate(G, iters=30, return_info=True)
    obj = torch.tensor(info.objective)
    assert info.iterations >= 2 and (obj[1:] <= obj[:-1] + 1e-12).all(), obj
    assert obj[-1] < obj[0] - 1.0                             # from a random subspace the objective drops a lot
    X = G / G.norm(dim=1, keepdim=True)
    for r in (1, 2):
        Y = torch.linalg.svd(X.T, full_matrices=False)[0][:, :r]   # the flag mean (w ≡ 1)
        _close(flag_aggregate(G, r=r, iters=0, init="flag_mean"), Y @ (Y.T @ X.sum(0)) / r, 1e-12)


def _explicit_irls_step(G, Y, lam, eps=1e-7):
    """One IRLS step as the official code writes it: stack the weighted columns, take the top-r left singular
    vectors (an independent check of the implicit Gram/eigen formulation)."""
    X = G / G.norm(dim=1, keepdim=True)
    p, r = X.shape[0], Y.shape[1]
    cols = [(abs(1 - (Y.T @ x).pow(2).sum()) + eps) ** -0.25 * x for x in X]
    for i in range(p):
        for j in range(p):
            if i != j:
                dx = X[i] - X[j]
                cols.append((abs(1 - (Y.T @ dx).pow(2).sum()) + eps) ** -0.25 * lam / (p * (p - 1)) * dx)
    Y1 = torch.linalg.svd(torch.stack(cols, 1), full_matrices=False)[0][:, :r]
    return Y1 @ (Y1.T @ X.sum(0)) / r


def test_flag_implicit_eigen_step_matches_the_explicit_columns():
    G = _random_grads(p=5, d=12, seed=9)
    Y0 = torch.linalg.qr(torch.randn(12, 2, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    for lam in (0.0, 0.3, 5.0):
        out, info = flag_aggregate(G, r=2, lam=lam, iters=1, init=Y0, return_info=True)
        assert not info.returned_previous
        _close(out, _explicit_irls_step(G, Y0, lam), 1e-10)
    # official default: a seeded random subspace, global RNG untouched
    state = torch.get_rng_state()
    a, b = flag_aggregate(G), flag_aggregate(G)
    assert torch.equal(a, b) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(flag_aggregate(G, seed=2), a)


def test_flag_float32_and_list_input_keep_shape_and_dtype():
    gs = [t.float() for t in _random_grads(p=5, d=12).reshape(5, 3, 4)]
    out = flag_aggregate(gs, r=2, iters=3)
    assert out.shape == (3, 4) and out.dtype == torch.float32
    _close(out.double(), flag_aggregate(torch.stack(gs).double(), r=2, iters=3), 1e-5)


# ------------------------------------------------------------------------------------------------ parameter server

TASK = LeastSquaresTask(d=10, n_workers=7, rows=32, batch=8, seed=0)
ATTACKS = {"sign_flip": 10.0, "scale": 100.0, "random": 10.0}


def _dist(rule, attack, f=2, **kw):
    x = simulate_parameter_server(TASK, rule, f=f, attack=attack, attack_scale=ATTACKS.get(attack, 1.0),
                                  lr=0.05, steps=150, **kw)
    return (x - TASK.x_star).norm().item()


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_byzantine_least_squares_robust_rules_converge_and_the_mean_fails(attack):
    torch.set_num_threads(1)
    start = TASK.x_star.norm().item()                           # ≈ 2.81 (x0 = 0)
    mean = _dist("mean", attack)
    assert not mean < 1.0, mean                                 # diverges (inf/nan/huge) or stalls far away
    assert _dist("flag", attack, scale="median_norm") < 1e-3 * start
    assert _dist("median", attack) < 0.05 * start
    assert _dist("krum", attack) < 0.03 * start                 # one worker's batch gradient: slower
    assert _dist("multi_krum", attack) < 0.01 * start


def test_parameter_server_without_attack_and_momentum():
    torch.set_num_threads(1)
    assert _dist("mean", "none", f=0) < 0.01                    # the task is solvable by plain SGD (0.0063)
    x = torch.zeros(3, dtype=F64)
    ps = ParameterServer(x, "median", lr=0.5, momentum=0.9)
    ps.step(CARD)
    ps.step(CARD)
    _close(x, [-0.5 * (1 + 1.9), 0, 0], 1e-12)                  # v1 = m, v2 = 0.9 m + m
    h = torch.ones(2, 3)
    assert torch.equal(byzantine_gradients(h, "sign_flip", 4.0), -4 * h)
    assert byzantine_gradients(h, "random", 2.0, torch.Generator().manual_seed(0)).std() > 1


# ------------------------------------------------------------------------------------------------ DDP comm hook

HOOK_RULES = {"flag-mean-init": ("flag", {"init": "flag_mean", "iters": 5}),
              "flag-official": ("flag", {}), "median": ("median", {})}


def _hook_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _hook_batch(rank):
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(5, 6, generator=g), torch.randn(5, 3, generator=g)


def _recording_hook(record):
    """robust_comm_hook, also recording this rank's bucket buffer (DDP's layout) and the hook's result."""
    def hook(state, bucket):
        record.append({"buffer": bucket.buffer().clone(),
                       "params": torch.cat([p.grad.reshape(-1) if p.grad is not None else p.new_zeros(0)
                                            for p in bucket.parameters()])})
        return robust_comm_hook(state, bucket).then(lambda fut: record[-1].setdefault("out", fut.value()))
    return hook


def _hook_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    x, y = _hook_batch(rank)
    local = _hook_model()                                       # this rank's own gradient, no DDP
    torch.nn.functional.mse_loss(local(x), y).backward()
    mine = torch.cat([p.grad.reshape(-1) for p in local.parameters()])
    results = {"gathered": _gather(mine, world)}
    for name, (rule, opts) in HOOK_RULES.items():
        ddp = torch.nn.parallel.DistributedDataParallel(_hook_model(), bucket_cap_mb=100)
        record = []
        ddp.register_comm_hook(RobustHookState(rule, f=0, options=opts), _recording_hook(record))
        torch.nn.functional.mse_loss(ddp(x), y).backward()
        assert len(record) == 1                                 # one bucket: the whole gradient at once
        results[name] = {"grads": _gather(torch.cat([p.grad.reshape(-1) for p in ddp.parameters()]), world),
                         "buffers": _gather(record[0]["buffer"], world), "out": record[0]["out"]}
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def _gather(t, world):
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return torch.stack(out)


def test_ddp_comm_hook_equals_the_pure_rule_on_the_gathered_gradients():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        # fork, not spawn: a spawned child re-imports torch + torchstep (~9 s each on this 2-core machine)
        mp.start_processes(_hook_worker, args=(2, init_file, out_file), nprocs=2, join=True, start_method="fork")
        res = torch.load(out_file, weights_only=True)
    G = res["gathered"]
    assert not torch.allclose(G[0], G[1])                       # the ranks really had different gradients
    for name, (rule, opts) in HOOK_RULES.items():
        r = res[name]
        assert torch.equal(r["grads"][0], r["grads"][1]), name  # every rank got the same aggregate, bitwise
        # the hook's result is the pure rule applied to the ranks' gathered buckets (DDP's bucket layout)
        torch.testing.assert_close(r["out"], robust_aggregate(r["buffers"], rule, **opts), rtol=1e-6, atol=1e-7)
        assert torch.equal(r["buffers"].sort(1).values, G.sort(1).values)   # the buckets hold the local grads
    # coordinate-wise rules and the flag_mean-initialised FA do not depend on the bucket's coordinate order
    torch.testing.assert_close(res["median"]["grads"][0], G.mean(0), rtol=1e-6, atol=1e-7)   # p = 2: = mean
    torch.testing.assert_close(res["flag-mean-init"]["grads"][0], flag_aggregate(G, init="flag_mean", iters=5),
                               rtol=1e-5, atol=1e-6)
