"""Measured traffic and Newton–Schulz work of the Muon family's owner exchange on 2 gloo ranks (CPU).

``python -m torchstep.bench.distributed_owner`` spawns W = 2 processes, trains a small GPT-shaped model
(``gpt-tiny`` of :data:`torchstep.ops.sharding.MODELS`: d = 128, 4 layers, fused c_attn, 4·d MLP; embedding,
head and norms go to the AdamW fallback) with :class:`~torchstep.optim.Muon` (fp32 NS) for a few steps under

* FSDP2 (``fully_shard`` per block and the root): :func:`torchstep.optim.matrix.owner_lmo`, counters
  :data:`torchstep.optim.matrix.OWNER_STATS`;
* DDP with ``split_across_ranks=True``: :func:`torchstep.ops.newton_schulz.newton_schulz_many_split`,
  counters :data:`torchstep.ops.newton_schulz.SPLIT_STATS`;

and prints, per rank and step, the measured bytes, collectives and NS FLOPs next to what
:func:`torchstep.ops.sharding.exchange_bytes` predicts, plus the final-parameter difference against
single-process training on the global batch (split by rule: the AdamW fallback's difference is dominated by
the key part of ``c_attn.bias``, whose exact gradient is 0 — softmax is invariant to it — so Adam turns
rounding noise of either run into ±lr steps).  Byte counts are payloads handed to the collectives (the wire
traffic of a ring/tree implementation differs by its own constant).  Takes ~1 minute on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile

import torch
from torch import nn

D, LAYERS, HEADS, VOCAB, SEQ, BATCH = 128, 4, 4, 256, 16, 4


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_proj(nn.functional.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList(Block(D) for _ in range(LAYERS))
        self.ln_f, self.lm_head = nn.LayerNorm(D), nn.Linear(D, VOCAB, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def _model() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT()


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
    return idx[:, :-1], idx[:, 1:]


def _train(model, steps: int, shard=None, scale: float = 1.0, **extra):
    from ..optim import Muon
    from ..partition import param_groups
    opt = Muon(param_groups(model), lr=0.02, ns_dtype="float32", fallback_lr=1e-3, **extra)
    for step in range(steps):
        x, y = _batch(step)
        if shard is not None:
            x, y = x[shard[0]::shard[1]], y[shard[0]::shard[1]]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss * scale).backward()
        opt.step()
    return opt


def _worker(rank: int, world: int, init_file: str, out_file: str, steps: int) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from ..ops.newton_schulz import SPLIT_STATS
    from ..optim.matrix import OWNER_STATS
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    for module in model.modules():       # gloo: sum-reduce and put the 1/W in the loss
        if hasattr(module, "set_force_sum_reduction_for_comms"):
            module.set_force_sum_reduction_for_comms(True)
    _train(model, steps, shard=(rank, world), scale=1 / world)
    fsdp = [p.full_tensor().detach() for p in model.parameters()]
    fsdp_stats = dict(OWNER_STATS)
    ddp = nn.parallel.DistributedDataParallel(_model())
    _train(ddp, steps, shard=(rank, world), split_across_ranks=True)
    split = [p.detach().clone() for p in ddp.module.parameters()]
    out = [None] * world
    dist.all_gather_object(out, {"fsdp": fsdp_stats, "ddp": dict(SPLIT_STATS)})
    if rank == 0:
        torch.save({"stats": out, "fsdp": fsdp, "ddp": split}, out_file)
    dist.barrier()
    dist.destroy_process_group()


def measure(steps: int = 2, world: int = 2) -> dict:
    """Run the measurement; returns per-rank counters (per step), predictions and parameter differences."""
    import torch.multiprocessing as mp

    from ..ops.newton_schulz import flops
    from ..ops.sharding import exchange_bytes, matrix_dims, owner_plan
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "out.pt")
        mp.spawn(_worker, args=(world, init_file, out_file, steps), nprocs=world, join=True)
        got = torch.load(out_file, weights_only=True)
    model = _model()
    shapes = [tuple(p.shape) for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() >= 2]
    torch.set_num_threads(1)
    _train(model, steps)
    names, single = zip(*model.named_parameters())
    plan = owner_plan(shapes, world)
    ns = [sum(flops(*matrix_dims(s)) for s, o in zip(shapes, plan) if o == r) for r in range(world)]
    return {
        "shapes": shapes, "steps": steps, "world": world, "ns_flops": ns,
        "predicted_fsdp_bytes": exchange_bytes(shapes, world, plan, 4, sharded=True),
        "predicted_ddp_bytes": exchange_bytes(shapes, world, plan, 4, sharded=False),
        "allgather_bytes": sum(math.prod(s) for s in shapes) * 4 * (world - 1) // world,
        "per_rank": [{k: {key: v / steps for key, v in d.items()} for k, d in s.items()} for s in got["stats"]],
        "fsdp_vs_single": _worst(got["fsdp"], single, names),
        "ddp_split_vs_single": _worst(got["ddp"], single, names),
    }


def _worst(got, want, names):
    """(max |Δθ| over the matrix-rule parameters, over the AdamW-fallback ones, name of the worst)."""
    diffs = {n: (a - b).abs().max().item() for n, a, b in zip(names, got, want)}
    matrix = {n: v for n, v in diffs.items() if n.startswith("blocks.") and n.endswith("weight") and ".ln" not in n}
    rest = {n: v for n, v in diffs.items() if n not in matrix}
    return max(matrix.values()), max(rest.values()), max(diffs, key=diffs.get)


def report(result: dict) -> str:
    w, lines = result["world"], []
    lines.append(f"gpt-tiny hidden matrices: {len(result['shapes'])} ({sorted(set(result['shapes']))}), "
                 f"W = {w}, fp32, per step (mean of {result['steps']})")
    lines.append("| rank | NS GFLOP (plan) | FSDP2 owner: bytes sent (measured / predicted) | received | "
                 "all_to_all calls | DDP split: bytes broadcast (measured / predicted) | received | broadcasts |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r, s in enumerate(result["per_rank"]):
        f, d = s["fsdp"], s["ddp"]
        lines.append(f"| {r} | {result['ns_flops'][r] / 1e9:.3f} | {f['bytes_sent']:.0f} / "
                     f"{result['predicted_fsdp_bytes'][r]} | {f['bytes_received']:.0f} | {2 * f['calls']:.0f} | "
                     f"{d['bytes_broadcast']:.0f} / {result['predicted_ddp_bytes'][r] // (w - 1)} | "
                     f"{d['bytes_received']:.0f} | {d['broadcasts']:.0f} |")
    lines.append(f"for scale: one all-gather of these matrices (what `full_tensor()` on every rank costs, "
                 f"plus W-fold NS work) receives {result['allgather_bytes']} bytes per rank.")
    for label, key in (("FSDP2", "fsdp_vs_single"), ("DDP split", "ddp_split_vs_single")):
        matrix, rest, worst = result[key]
        lines.append(f"{label}: max |θ − θ_single| after {result['steps']} steps: Muon matrices {matrix:.2e}, "
                     f"AdamW fallback {rest:.2e} (worst: {worst})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m torchstep.bench.distributed_owner",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args(argv)
    print(report(measure(args.steps)))


if __name__ == "__main__":
    main()
