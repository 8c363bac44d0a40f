"""Data-parallel correctness under torch.distributed (gloo, 2 CPU processes)."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fixtures import FIXTURES as SPECS

STEPS = 4


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)


def _train(name, model, shard=None, **extra):
    spec = SPECS[name]
    opt = spec.cls(model.parameters(), **{**spec.base_kwargs, "lr": 1e-2, **extra})
    for step in range(STEPS):
        x, y = _batch(step)
        if shard is not None:               # this rank's half of the global batch
            rank, world = shard
            x, y = x[rank::world], y[rank::world]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {}
    for name in SPECS:   # DDP averages the two half-batch gradients = the global-batch gradient
        results[name] = _train(name, torch.nn.parallel.DistributedDataParallel(_model()), shard=(rank, world))
    results["muon-split"] = _train("muon", torch.nn.parallel.DistributedDataParallel(_model()),
                                   shard=(rank, world), split_across_ranks=True)
    # NS split across ranks equals the unsplit computation
    from torchstep.ops.newton_schulz import newton_schulz_many, newton_schulz_many_split
    g = torch.Generator().manual_seed(7)
    mats = [torch.randn(16, 24, generator=g) for _ in range(5)] + [torch.randn(40, 8, generator=g) for _ in range(3)]
    split = newton_schulz_many_split(mats, compute_dtype=torch.float32)
    results["ns_split_equal"] = all(torch.equal(a, b) for a, b in
                                    zip(split, newton_schulz_many(mats, compute_dtype=torch.float32)))
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_matches_single_process_training_on_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(2, init_file, out_file), nprocs=2, join=True)
        results = torch.load(out_file, weights_only=True)
    assert results["ns_split_equal"]
    diffs = [(a - b).abs().max().item() for a, b in zip(results["muon-split"], results["muon"])]
    assert max(diffs) == 0.0, diffs   # split ≡ unsplit
    for name in SPECS:
        single = _train(name, _model())
        for p, q in zip(results[name], single):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{name}: DDP differs")
