"""A small, honest demo: every registered optimizer vs torch AdamW on an offline task.

Task: a 2-layer MLP on a fixed synthetic classification problem (generated from a seed, no
downloads).  Each method gets the same 5-point log learning-rate grid (shifted for sign and SGD methods) and
the best mean final training loss over 2 seeds is reported; ``*`` marks a best lr on the grid edge.  A smoke demo until ``torchstep bench`` lands.
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from .ops import gnb_sampled_loss
from .registry import SPECS, create

GRID = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LR_GRIDS = {"lion": tuple(x / 10 for x in GRID), "sophiag": tuple(x / 10 for x in GRID),
            "sophiah": tuple(x / 10 for x in GRID), "sgdp": tuple(x * 10 for x in GRID),
            "classp": tuple(x * 3 for x in GRID)}


def _data(seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = (X @ teacher + 0.5 * torch.randn(1024, 10, generator=g)).argmax(-1)
    return X, y


def train(name: str, lr: float, seed: int, steps: int = 200) -> float:
    X, y = _data(0)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 10))
    extra = {"momentum": 0.9} if name == "sgdp" else {}
    extra.update({"threshold": 0.0} if name == "classp" else {})
    extra.update({"bs": 128} if name == "sophiag" else {})
    if name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    else:
        opt = create(name, model, lr=lr, **extra)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(X), (128,), generator=g)
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0 and name in ("sophiag", "sophiah"):   # Hessian refresh every k = 10 steps
            opt.zero_grad(set_to_none=True)
            if name == "sophiag":
                gnb_sampled_loss(model(X[idx]), generator=g).backward()
                opt.update_hessian()
            else:
                opt.update_hessian(F.cross_entropy(model(X[idx]), y[idx]), generator=g)
    with torch.no_grad():
        return F.cross_entropy(model(X), y).item()


def run(seeds: int = 2, steps: int = 200) -> list[tuple[str, float, float, float]]:
    torch.set_num_threads(1)
    rows = []
    for name in ["adamw", *SPECS]:
        start = time.process_time()
        best = min(((statistics.mean(train(name, lr, s, steps) for s in range(seeds))), lr)
                   for lr in LR_GRIDS.get(name, GRID))
        rows.append((name, best[0], best[1], time.process_time() - start))
    return rows


def main(seeds: int = 2, steps: int = 200) -> None:
    rows = run(seeds, steps)
    base = rows[0][1]
    print(f"{'optimizer':12s} {'final loss':>10s} {'vs AdamW':>9s} {'best lr':>8s} {'cpu-s':>6s}")
    for name, loss, lr, cpu in rows:
        grid = LR_GRIDS.get(name, GRID)
        edge = "*" if lr in (grid[0], grid[-1]) else " "
        print(f"{name:12s} {loss:10.4f} {loss / base:9.3f} {lr:8.0e}{edge}{cpu:6.1f}")
    print(f"(MLP 32-64-10 on a seeded synthetic task, {steps} steps, batch 128, mean of {seeds} seeds, "
          "best of a 5-point lr grid; a smoke demo — statistical comparisons come with `torchstep bench`)")
