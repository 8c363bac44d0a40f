"""Width sweep for μP's spectral condition: does ‖ΔW‖₂ and ‖W‖₂ stay Θ(√(d_out/d_in)) as width grows?

A 3-matrix MLP (d_in → w → w → d_out, ReLU, no biases) with the spectral-μP initialisation
``W ~ N(0, σ²), σ = min(1, √(d_out/d_in))/√d_in`` learns a fixed random teacher of the same input and
output size at every width.  Every matrix goes to the optimizer's matrix rule.  Per width we record, for
each matrix, ``‖ΔW_t‖₂/s`` and ``‖W_t‖₂/s`` with ``s = √(d_out/d_in)`` (max over matrices and steps),
the final loss, and the relative change of the last hidden features on a fixed batch — the quantity
μP keeps Θ(1) (feature learning at every width).

The optimizer is the caller's (``make_optimizer(matrices)``); the comparison in docs/width-sweep.md is
``torchstep.bench.arms.WIDTH_SWEEP_ARMS``, run by ``torchstep width-sweep``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class WidthResult:
    """One width's measurements (see the module docstring)."""
    width: int
    max_update_ratio: float     # max over matrices and steps of ‖ΔW‖₂ / √(d_out/d_in)
    max_weight_ratio: float     # max over matrices and steps of ‖W‖₂ / √(d_out/d_in)
    final_loss: float
    feature_change: float       # RMS(h_T − h_0) / RMS(h_0) for the last hidden layer, fixed batch


def _mlp(d_in: int, width: int, d_out: int, generator: torch.Generator) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(d_in, width, bias=False), nn.ReLU(), nn.Linear(width, width, bias=False),
                          nn.ReLU(), nn.Linear(width, d_out, bias=False))
    with torch.no_grad():
        for layer in model[::2]:
            fan_out, fan_in = layer.weight.shape
            layer.weight.normal_(0.0, min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in), generator=generator)
    return model


def run_width(make_optimizer: Callable[[list], torch.optim.Optimizer], width: int, steps: int = 100,
              d_in: int = 32, d_out: int = 8, batch: int = 128, seed: int = 0) -> WidthResult:
    """Train the MLP of hidden width ``width`` on the teacher for ``steps`` steps with
    ``make_optimizer(matrices)`` and return its spectral ratios, final loss and feature change."""
    g = torch.Generator().manual_seed(seed)
    teacher = _mlp(d_in, 64, d_out, torch.Generator().manual_seed(10_000 + seed))
    model = _mlp(d_in, width, d_out, g)
    matrices = [layer.weight for layer in model[::2]]
    scales = [math.sqrt(w.shape[0] / w.shape[1]) for w in matrices]
    opt = make_optimizer(matrices)
    probe = torch.randn(256, d_in, generator=torch.Generator().manual_seed(20_000 + seed))
    features = lambda: model[:4](probe)   # noqa: E731  (last hidden layer)
    with torch.no_grad():
        h0 = features()
    max_update = max_weight = 0.0
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = (model(x) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        before = [w.detach().clone() for w in matrices]
        opt.step()
        with torch.no_grad():
            for w, b, s in zip(matrices, before, scales):
                max_update = max(max_update, float(torch.linalg.matrix_norm(w - b, ord=2)) / s)
                max_weight = max(max_weight, float(torch.linalg.matrix_norm(w, ord=2)) / s)
    with torch.no_grad():
        h = features()
        x = torch.randn(1024, d_in, generator=torch.Generator().manual_seed(30_000 + seed))
        final = float((model(x) - teacher(x)).square().mean())
        change = float((h - h0).square().mean().sqrt() / h0.square().mean().sqrt())
    return WidthResult(width, max_update, max_weight, final, change)


def sweep(make_optimizer: Callable[[list], torch.optim.Optimizer], widths=(64, 128, 256, 512),
          **kwargs) -> list[WidthResult]:
    """:func:`run_width` at every width (``kwargs`` passed on)."""
    return [run_width(make_optimizer, w, **kwargs) for w in widths]

