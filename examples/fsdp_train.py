"""Train a tiny MLP with FSDP2 (``fully_shard``) and a torchstep optimizer — under torchrun or Ray Train.

torchstep has no launcher of its own: the same ``train_fn(config)`` runs

* under torchrun (one process per rank; the process group is created here from the env:// variables)::

      torchrun --standalone --nproc-per-node 2 examples/fsdp_train.py --out /tmp/fsdp.json

* as a Ray Train ``TorchTrainer`` on a local Ray instance (Ray creates the gloo process group)::

      python examples/fsdp_train.py --ray --workers 2 --out /tmp/fsdp.json

* in a single process (world size 1, no FSDP) — the reference the tests compare against::

      python examples/fsdp_train.py --single --out /tmp/ref.json

Every rank trains on its slice ``x[rank::world]`` of a global batch that depends only on the step; FSDP2
averages the gradients over ranks, so the run equals single-process training on the global batch.  Rank 0
writes ``{"losses": [...], "params": {name: nested list}}`` (global-batch losses, full unsharded parameters)
to ``--out``.  CPU and gloo by default; on GPUs pass ``--backend nccl`` (not exercised by the tests).
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

DEFAULTS = {"optimizer": "lion", "lr": 1e-3, "steps": 5, "batch": 16, "seed": 0, "backend": "gloo", "out": None}


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def make_optimizer(name: str, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """``adamw`` → ``torch.optim.AdamW``; any other name → ``torchstep.create(name, model, lr=lr)``."""
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    import torchstep
    return torchstep.create(name, model, lr=lr)


def global_batch(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(batch, 16, generator=g), torch.randn(batch, 8, generator=g)


def train_fn(config: dict) -> dict:
    """Train and return ``{"losses", "params"}`` (on every rank); rank 0 also writes it to ``config["out"]``.

    Uses the existing process group (torchrun after init, Ray Train) or creates one from env:// when the
    script was launched by torchrun; with ``config["single"]`` it runs world size 1 without FSDP.
    """
    cfg = {**DEFAULTS, **config}
    torch.set_num_threads(1)
    single = bool(cfg.get("single"))
    if not single and not dist.is_initialized():
        dist.init_process_group(cfg["backend"])             # env:// (torchrun sets RANK, WORLD_SIZE, MASTER_*)
    rank, world = (0, 1) if single else (dist.get_rank(), dist.get_world_size())
    if cfg["batch"] % world:
        raise ValueError(f"batch {cfg['batch']} is not divisible by the world size {world}")

    model = make_model(cfg["seed"])
    if not single:
        from torch.distributed.fsdp import fully_shard
        for m in model:
            if isinstance(m, torch.nn.Linear):
                fully_shard(m)
        fully_shard(model)
    opt = make_optimizer(cfg["optimizer"], model, cfg["lr"])

    losses = []
    for step in range(cfg["steps"]):
        x, y = global_batch(step, cfg["batch"])
        x, y = x[rank::world], y[rank::world]
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()                                     # FSDP2 reduce-scatters the mean gradient
        opt.step()
        loss = loss.detach().clone()
        if not single:
            dist.all_reduce(loss)                           # mean of equal-size slices = global-batch loss
            loss /= world
        losses.append(loss.item())

    params = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p    # DTensor shard → full (a collective)
        params[name] = full.detach().tolist()
    result = {"losses": losses, "params": params, "world_size": world}
    if rank == 0 and cfg["out"]:
        with open(cfg["out"], "w") as fh:
            json.dump(result, fh)
    return result


def run_ray(config: dict, workers: int) -> None:
    """Run ``train_fn`` as a Ray Train ``TorchTrainer`` on a local Ray instance (``workers`` CPU workers)."""
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ray.init(num_cpus=max(workers, 1), include_dashboard=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        with tempfile.TemporaryDirectory() as storage:
            # train_fn must take exactly one *required* argument: Ray calls a function whose only parameter
            # has a default with no arguments (train_loop_config silently dropped)
            trainer = TorchTrainer(train_fn, train_loop_config=config,
                                   torch_config=TorchConfig(backend=config.get("backend", "gloo")),
                                   scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
                                   run_config=RunConfig(storage_path=storage, name="fsdp_train"))
            result = trainer.fit()
            if getattr(result, "error", None) is not None:
                raise RuntimeError("Ray Train run failed") from result.error
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizer", default=DEFAULTS["optimizer"], help="torchstep method name, or 'adamw'")
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"], help="global batch size")
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--backend", default=DEFAULTS["backend"])
    ap.add_argument("--out", default=None, help="JSON written by rank 0")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--ray", action="store_true", help="run as a Ray Train TorchTrainer (local Ray)")
    mode.add_argument("--single", action="store_true", help="one process, no FSDP (the reference run)")
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (with --ray)")
    args = ap.parse_args(argv)
    config = {k: getattr(args, k) for k in DEFAULTS}
    if args.out:
        config["out"] = os.path.abspath(args.out)
    if args.ray:
        run_ray(config, args.workers)
        return
    config["single"] = args.single
    train_fn(config)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
