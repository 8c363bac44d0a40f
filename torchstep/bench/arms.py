"""Optimizer arms of the benchmark: torch peers plus every registered torchstep optimizer.

Matched routing: on tasks with a real model (``Problem.routed``) every arm applies its rule with its
searched lr to the weight matrices (the partitioner's ``matrix`` group), while embeddings, the output
head, norms and biases go to AdamW at the task's fixed ``fallback_lr`` **for every arm, AdamW
included** — so routing cannot explain a difference between arms.  On synthetic problems the arm
gets every parameter.  Weight decay is 0 for every arm (known-optimum tasks need the unregularised
objective; decay is not tuned in protocol v1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..ops import gnb_sampled_loss
from ..optim import Spectra
from ..partition import param_groups
from ..registry import SPECS
from .tasks import Problem

FALLBACK_LR = 3e-3
HESSIAN_PERIOD = 10


@dataclass(frozen=True)
class Arm:
    name: str
    make: Callable[[list[dict[str, Any]], float], torch.optim.Optimizer]
    default_lr: float
    matrix_only: bool = False           # rule defined only for 2-D weights (Muon)
    hessian: str | None = None          # "gnb" | "hutchinson": periodic Sophia refresh
    kwargs: dict = field(default_factory=dict)


MATRIX_FAMILIES = ("orthogonalized", "stateless")   # hybrids whose own rule needs ≥ 2-D tensors


def _ours(spec) -> Arm:
    kwargs = spec.bench_kwargs
    return Arm(spec.name, lambda groups, lr: spec.cls(groups, lr=lr, **kwargs), spec.bench_lr,
               matrix_only=spec.family in MATRIX_FAMILIES, hessian=spec.hessian, kwargs=kwargs)


# torch peers, then every registered torchstep optimizer (the registry holds their benchmark defaults)
ARMS: dict[str, Arm] = {a.name: a for a in [
    Arm("adamw", lambda g, lr: torch.optim.AdamW(g, lr=lr, weight_decay=0.0), 3e-3),
    Arm("sgd", lambda g, lr: torch.optim.SGD(g, lr=lr, momentum=0.9), 3e-2, kwargs={"momentum": 0.9}),
    Arm("torch-muon", lambda g, lr: torch.optim.Muon(g, lr=lr, weight_decay=0.0, adjust_lr_fn="match_rms_adamw"), 3e-3,
        matrix_only=True, kwargs={"adjust_lr_fn": "match_rms_adamw"}),
    *(_ours(spec) for spec in SPECS.values()),
    # the SPECTRA wrapper over torch AdamW (c = 5: the paper's 160M recipe; matrices only)
    Arm("spectra-adamw", lambda g, lr: Spectra(torch.optim.AdamW(g, lr=lr, weight_decay=0.0), c=5.0), 3e-3,
        kwargs={"c": 5.0}),
]}



def lr_grid(default_lr: float, points: int = 4, offsets: list[int] | None = None) -> list[float]:
    """Half-decade log grid: ``default × 10^(k/2)``; by default k = −2, −1, 0, 1 (4 points)."""
    ks = offsets if offsets is not None else list(range(-(points // 2), points - points // 2))
    return [round_lr(default_lr * 10 ** (k / 2)) for k in ks]


def round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


def extend(grid: list[float], lr: float, default_lr: float) -> list[float]:
    """The grid plus two more half-decade points beyond the edge that ``lr`` sits on."""
    ks = [round(2 * math.log10(x / default_lr)) for x in grid]
    ks = [ks[0] - 2, ks[0] - 1] + ks if lr == grid[0] else ks + [ks[-1] + 1, ks[-1] + 2]
    return lr_grid(default_lr, offsets=ks)


def applicable(arm: Arm, task) -> bool:
    return task.matrices or not arm.matrix_only


class ArmOptimizer:
    """The arm's optimizer on the rule group plus the shared AdamW fallback: one ``step``."""

    def __init__(self, arm: Arm, problem: Problem, lr: float, total_steps: int, warmup_fraction: float = 0.05):
        self.arm, self.problem = arm, problem
        if problem.routed:
            groups = param_groups(problem.model)
            rule = [g for g in groups if g["name"] == "matrix"]
            rest = [g for g in groups if g["name"] != "matrix"]
        else:
            rule = [{"params": [p for p in problem.model.parameters()], "name": "all"}]
            rest = []
        if arm.matrix_only:   # 2-D only (conv weights would be reshaped; none in our tasks)
            rest += [{"params": [p for g in rule for p in g["params"] if p.dim() != 2], "name": "non-2d"}]
            rule = [{**g, "params": [p for p in g["params"] if p.dim() == 2]} for g in rule]
        strip = lambda gs: [{"params": g["params"]} for g in gs if g["params"]]  # noqa: E731
        self.rule = arm.make(strip(rule), lr)
        if arm.hessian == "gnb":
            for g in self.rule.param_groups:
                g["bs"] = problem.tokens
        self.optimizers = [self.rule]
        if any(g["params"] for g in rest):
            self.optimizers.append(torch.optim.AdamW(strip(rest), lr=FALLBACK_LR, weight_decay=0.0))
        warmup = max(1, int(warmup_fraction * total_steps))

        def factor(step: int) -> float:   # warm-up, then cosine to 0 at this run's own budget
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in self.optimizers]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def after_step(self, step: int) -> None:
        for s in self.schedulers:
            s.step()
        if self.arm.hessian and step % HESSIAN_PERIOD == HESSIAN_PERIOD - 1:
            self.zero_grad()
            if self.arm.hessian == "gnb":
                if self.problem.logits is None:      # GNB needs a likelihood over classes
                    return
                gnb_sampled_loss(self.problem.logits(step)).backward()
                self.rule.update_hessian()
            else:   # Hutchinson needs double backward: CPU flash attention has none, the math kernel does
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    self.rule.update_hessian(lambda: self.problem.train_loss(step))
            self.zero_grad()

    def state_bytes(self) -> int:
        """Exact optimizer-state bytes (tensors in ``state``; per-step CPU counters included)."""
        return sum(v.numel() * v.element_size() for o in self.optimizers for s in o.state.values()
                   for v in s.values() if torch.is_tensor(v))
