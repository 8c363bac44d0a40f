"""Optimizer-state memory of one training step of a GPT, per method: exact bytes, and measured peaks.

For each arm (matched routing as in the sweep: the arm's rule on the partitioner's ``matrix`` group, AdamW on
embeddings/head/norms), one fresh process builds the byte GPT of :mod:`torchstep.bench.gpt` at the requested
size, runs one forward/backward/step and reports

* ``state`` – :func:`torchstep.state_bytes` of the arm and of the shared fallback (exact);
* ``cuda peak`` – ``torch.cuda.max_memory_allocated`` over the step when a CUDA device is present;
* ``RSS peak`` – the process's peak resident set (``ru_maxrss``) on CPU, a coarse whole-process figure.

Run: ``torchstep bench memory [--width 768 --depth 12 --optimizers ...] [--out FILE]`` (the default is a
~85M-parameter model: 12 layers of width 768).  Each arm runs in its own process so peaks do not mix.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
from typing import Any

import torch

from ..memory import state_bytes
from .arms import ARMS, ArmOptimizer
from .gpt import GPT, GPTConfig
from .tasks import Problem

DEFAULT_ARMS = ("adamw", "galore", "fira", "frugal", "gradnormlorp", "torch-adafactor", "muon-fp32")


def _one(arm_name: str, width: int, depth: int, context: int, batch: int, device: str, queue) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(GPTConfig(context=context, width=width, depth=depth, heads=max(1, width // 64))).to(device)
    idx = torch.randint(0, 256, (batch, context + 1), generator=torch.Generator().manual_seed(0)).to(device)
    problem = Problem(model, lambda step: model.loss(idx[:, :-1], idx[:, 1:]), lambda: {})
    opt = ArmOptimizer(ARMS[arm_name], problem, ARMS[arm_name].default_lr, total_steps=1)   # the sweep's routing
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    problem.train_loss(0).backward()
    opt.step()
    queue.put({
        "arm": arm_name, "params": sum(p.numel() for p in model.parameters()),
        "matrix_params": sum(p.numel() for g in opt.rule.param_groups for p in g["params"]),
        "state": state_bytes(opt.rule), "fallback_state": sum(state_bytes(o) for o in opt.optimizers[1:]),
        "cuda_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    })


def measure(arms=DEFAULT_ARMS, width: int = 768, depth: int = 12, context: int = 64, batch: int = 1,
            device: str | None = None) -> list[dict[str, Any]]:
    """One row per arm (see the module docstring); each arm in a fresh ``spawn`` process."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    ctx = mp.get_context("spawn")
    rows = []
    for name in arms:
        queue = ctx.Queue()
        proc = ctx.Process(target=_one, args=(name, width, depth, context, batch, device, queue))
        proc.start()
        rows.append(queue.get())
        proc.join()
    return rows


def table(rows: list[dict[str, Any]], width: int, depth: int, device: str) -> str:
    """Markdown: state of the rule group against AdamW's, the fallback's, and the peaks."""
    from tabulate import tabulate
    base = next((r["state"] for r in rows if r["arm"] == "adamw"), None)
    body = []
    for r in rows:
        saving = f"{100 * (1 - r['state'] / base):.1f} %" if base else "–"
        body.append([r["arm"], f"{r['state'] / 2**20:.1f}", saving, f"{r['fallback_state'] / 2**20:.1f}",
                     f"{r['cuda_peak'] / 2**20:.0f}" if r["cuda_peak"] is not None else "no GPU",
                     f"{r['rss_peak'] / 2**20:.0f}"])
    head = (f"GPT width {width}, depth {depth}: {rows[0]['params'] / 1e6:.1f}M parameters, "
            f"{rows[0]['matrix_params'] / 1e6:.1f}M in hidden matrices (device: {device}, fp32 state)\n\n")
    return head + tabulate(body, headers=["arm", "matrix-group state (MiB)", "vs AdamW", "fallback state (MiB)",
                                          "CUDA peak (MiB)", "process RSS peak (MiB)"], tablefmt="github")


def main(optimizers=None, width: int = 768, depth: int = 12, out: str | None = None) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = measure(optimizers or DEFAULT_ARMS, width, depth, device=device)
    text = table(rows, width, depth, device)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(f"Produced by `torchstep bench memory --width {width} --depth {depth}"
                    f"{' --optimizers ' + ' '.join(optimizers) if optimizers else ''}`.\n\n" + text + "\n\n"
                    "Rows as JSON:\n\n```json\n" + json.dumps(rows, indent=1) + "\n```\n")
    return text


__all__ = ["measure", "table", "main", "DEFAULT_ARMS"]
