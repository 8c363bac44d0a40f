"""Benchmark tasks.  All data is generated, shipped in the package, or bundled with a package.

Every task builds, for a seed, a :class:`Problem`: a module to optimise (initialised from the seed),
``train_loss(step)`` drawing the step's batch from a generator seeded by the seed (so the data order is
the same for every optimizer — paired seeds), and ``evaluate()`` returning metrics where ``val`` is
lower-is-better: the sub-optimality gap ``f(x) − f*`` on tasks with a known optimum, the held-out
cross-entropy otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import corpus
from .gpt import GPT, GPTConfig


@dataclass
class Problem:
    model: nn.Module
    train_loss: Callable[[int], torch.Tensor]
    evaluate: Callable[[], dict[str, float]]
    #: logits of a training batch (classification / LM) for Sophia-G's GNB estimator, else None
    logits: Callable[[int], torch.Tensor] | None = None
    routed: bool = True          # model with embeddings/norms/biases → matched routing applies
    tokens: int = 1              # examples (tokens) per step: Sophia-G's ``bs``
    #: μP width multiplier m of the hidden matrices (all share one fan-in multiplier); 1 = standard
    #: parametrisation.  The harness then scales the hidden matrices' lr by ``arms.mup_lr_factor`` (μP's table)
    mup_width_mult: float = 1.0
    #: the shared fallback (embeddings, head, norms) at the arm's lr instead of the fixed FALLBACK_LR: one lr for
    #: the whole model, as an lr-transfer study needs (μP keeps it unchanged on these vector-like tensors)
    tied_fallback: bool = False
    #: a fixed training batch ``(inputs, targets)`` and ``loss_fn(outputs, targets)`` for diagnostics monitors
    #: (``torchstep bench --monitor``, ``torchstep diagnose``); None where a task has no model-on-inputs form
    probe: tuple | None = None
    loss_fn: Callable | None = None
    #: classification tasks: ``(train inputs, train targets, val inputs, val targets)`` (``torchstep diagnose``)
    data: tuple | None = None
    #: RL / fine-tuning tasks: receives the arm's spec (``Arm.objective`` / ``Arm.adapter``) before training
    configure: Callable[[dict], None] | None = None
    #: fine-tuning methods that act on the optimizer (ALLoRA wraps it, MGPO reads its momentum, HFT manages its
    #: state): called with the arm's optimizer, returns the one to step
    with_optimizer: Callable | None = None
    #: methods that need the backward inside their own context (MGPO's perturbation): replaces ``loss.backward()``
    backward: Callable | None = None


@dataclass(frozen=True)
class Task:
    name: str
    build: Callable[[int, dict], Problem]
    steps: int
    description: str
    known_optimum: bool
    options: dict = field(default_factory=dict)
    matrices: bool = True        # has 2-D weights (matrix-only methods such as Muon apply)
    #: valid options left out of a trial's configuration at their default (added later: old trial ids stay)
    extra_options: dict = field(default_factory=dict)
    #: "supervised": optimizer arms; "rl": objective arms (``Arm.objective``: an RL preset with a fixed optimizer);
    #: "finetune": adapter arms (``Arm.adapter``)
    kind: str = "supervised"

    @property
    def valid_options(self) -> dict:
        """Every option and its default."""
        return {**self.options, **self.extra_options}

    def problem(self, seed: int, **options) -> Problem:
        return self.build(seed, {**self.valid_options, **options})


class Vector(nn.Module):
    """Wraps raw parameters of a synthetic problem."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        for name, t in tensors.items():
            self.register_parameter(name, nn.Parameter(t))


def _batches(seed: int, n: int, batch: int) -> Callable[[int], torch.Tensor]:
    def indices(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.randint(0, n, (batch,), generator=g)
    return indices


# ----------------------------------------------------------------------------- synthetic, known optimum
@lru_cache(maxsize=2)
def _least_squares_data(d: int, n: int, condition: float):
    g = torch.Generator().manual_seed(12345)
    scales = torch.logspace(0, -math.log10(condition), d, dtype=torch.float64)
    A = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    b = A @ torch.randn(d, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    x_star = torch.linalg.lstsq(A, b.unsqueeze(1)).solution.squeeze(1)
    f_star = 0.5 * ((A @ x_star - b) ** 2).mean().item()
    return A.float(), b.float(), f_star


def quadratic(seed: int, o: dict) -> Problem:
    A, b, f_star = _least_squares_data(o["d"], o["n"], o["condition"])
    model = Vector(x=torch.zeros(o["d"]))
    idx = _batches(seed, len(b), o["batch"])
    x = model.x

    def train_loss(step):
        i = idx(step)
        return 0.5 * ((A[i] @ x - b[i]) ** 2).mean()

    def evaluate():
        with torch.no_grad():
            return {"val": 0.5 * ((A.double() @ x.double() - b.double()) ** 2).mean().item() - f_star}
    return Problem(model, train_loss, evaluate, routed=False)


@lru_cache(maxsize=2)
def _logreg_data(d: int, n: int):
    g = torch.Generator().manual_seed(54321)
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * scales
    w = torch.randn(d, generator=g, dtype=torch.float64) / scales.sqrt()
    y = (torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(X @ w)).double()
    f_star = _newton_logreg_optimum(X, y)
    return X.float(), y.float(), f_star


def _newton_logreg_optimum(X: torch.Tensor, y: torch.Tensor, iters: int = 50) -> float:
    """f* of mean logistic loss by damped Newton in float64 (converges quadratically; ms for d=100)."""
    w = torch.zeros(X.shape[1], dtype=torch.float64)
    loss = lambda v: F.binary_cross_entropy_with_logits(X @ v, y).item()  # noqa: E731
    for _ in range(iters):
        p = torch.sigmoid(X @ w)
        grad = X.T @ (p - y) / len(y)
        hess = (X.T * (p * (1 - p))) @ X / len(y)
        step = torch.linalg.solve(hess + 1e-12 * torch.eye(len(w), dtype=w.dtype), grad)
        t, f0 = 1.0, loss(w)
        while loss(w - t * step) > f0 - 0.25 * t * (grad @ step).item() and t > 1e-8:
            t *= 0.5
        w = w - t * step
        if grad.abs().max() < 1e-12:
            break
    return loss(w)


def logreg(seed: int, o: dict) -> Problem:
    X, y, f_star = _logreg_data(o["d"], o["n"])
    model = Vector(w=torch.zeros(o["d"]))
    idx = _batches(seed, len(y), o["batch"])
    w = model.w

    def train_loss(step):
        i = idx(step)
        return F.binary_cross_entropy_with_logits(X[i] @ w, y[i])

    def evaluate():
        with torch.no_grad():
            full = F.binary_cross_entropy_with_logits(X.double() @ w.double(), y.double()).item()
            return {"val": full - f_star}
    return Problem(model, train_loss, evaluate, routed=False)


def rosenbrock(seed: int, o: dict) -> Problem:
    g = torch.Generator().manual_seed(seed)
    model = Vector(x=torch.tensor([-1.5, 2.0]) + 0.1 * torch.randn(2, generator=g))
    x = model.x

    def f():
        return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2

    def evaluate():
        with torch.no_grad():
            return {"val": f().item()}
    return Problem(model, lambda step: f(), evaluate, routed=False)


@lru_cache(maxsize=2)
def _sensing_data(size: int, rank: int, measurements: int):
    g = torch.Generator().manual_seed(777)
    M = torch.randn(size, rank, generator=g) @ torch.randn(rank, size, generator=g) / math.sqrt(rank)
    A = torch.randn(measurements, size, size, generator=g) / size
    return A, (A * M).sum((1, 2)), M


def matrix_sensing(seed: int, o: dict) -> Problem:
    A, y, M = _sensing_data(o["size"], o["rank"], o["measurements"])
    g = torch.Generator().manual_seed(seed)
    r = o["factor_rank"]
    model = Vector(U=1e-2 * torch.randn(o["size"], r, generator=g), V=1e-2 * torch.randn(o["size"], r, generator=g))
    idx = _batches(seed, len(y), o["batch"])

    def residual(i=None):
        X = model.U @ model.V.T
        AA, yy = (A, y) if i is None else (A[i], y[i])
        return (AA * X).sum((1, 2)) - yy

    def evaluate():
        with torch.no_grad():
            X = model.U @ model.V.T
            return {"val": 0.5 * residual().square().mean().item(),
                    "rel_error": ((X - M).norm() / M.norm()).item()}
    return Problem(model, lambda step: 0.5 * residual(idx(step)).square().mean(), evaluate, routed=False)


# ----------------------------------------------------------------------------- classifiers
def _classifier(seed, o, Xtr, ytr, Xva, yva, layers) -> Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(*[m for a, b in zip(layers[:-1], layers[1:]) for m in (nn.Linear(a, b), nn.GELU())][:-1])
    idx = _batches(seed, len(ytr), o["batch"])

    def train_loss(step):
        i = idx(step)
        return F.cross_entropy(model(Xtr[i]), ytr[i])

    def evaluate():
        with torch.no_grad():
            logits = model(Xva)
            return {"val": F.cross_entropy(logits, yva).item(),
                    "accuracy": (logits.argmax(-1) == yva).float().mean().item(),
                    "train": F.cross_entropy(model(Xtr), ytr).item()}
    probe = idx(0)
    return Problem(model, train_loss, evaluate, logits=lambda step: model(Xtr[idx(step)]), tokens=o["batch"],
                   probe=(Xtr[probe], ytr[probe]), loss_fn=F.cross_entropy, data=(Xtr, ytr, Xva, yva))


@lru_cache(maxsize=1)
def _digits():
    from sklearn.datasets import load_digits   # bundled with scikit-learn, no download
    data = load_digits()
    X = torch.tensor(data.data, dtype=torch.float32)
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[:1437], perm[1437:]
    return X[tr], y[tr], X[va], y[va]


def digits_mlp(seed: int, o: dict) -> Problem:
    return _classifier(seed, o, *_digits(), [64, o["hidden"], o["hidden"], 10])


@lru_cache(maxsize=1)
def _mnist1d(samples: int):
    from mnist1d.data import get_dataset_args, make_dataset   # generated locally; never downloaded
    args = get_dataset_args()
    args.num_samples = samples
    data = make_dataset(args)
    X, Xt = (torch.tensor(np.asarray(data[k]), dtype=torch.float32) for k in ("x", "x_test"))
    mean, std = X.mean(), X.std()
    return ((X - mean) / std, torch.tensor(np.asarray(data["y"])), (Xt - mean) / std,
            torch.tensor(np.asarray(data["y_test"])))


def mnist1d_mlp(seed: int, o: dict) -> Problem:
    return _classifier(seed, o, *_mnist1d(o["samples"]), [40, o["hidden"], o["hidden"], 10])


# ----------------------------------------------------------------------------- language model
def byte_windows(source: torch.Tensor, context: int, batch: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``source`` drawn with ``g``: ``(inputs, next-byte targets)``, each ``(batch, context)``."""
    start = torch.randint(0, len(source) - context - 1, (batch,), generator=g)
    chunk = torch.stack([source[s:s + context + 1] for s in start.tolist()]).long()
    return chunk[:, :-1], chunk[:, 1:]


def gpt_bytes(seed: int, o: dict) -> Problem:
    train, val = corpus.load()
    cfg = GPTConfig(context=o["context"], width=o["width"], depth=o["depth"], heads=o["heads"], norm=o["norm"],
                    qk_norm=o["qk_norm"], z_loss=o["z_loss"], mup_base_width=o["mup_base_width"])
    torch.manual_seed(seed)
    model = GPT(cfg)
    T, B = cfg.context, o["batch"]

    def batch(source, g):
        return byte_windows(source, T, B, g)

    def train_batch(step):
        return batch(train, torch.Generator().manual_seed(seed * 1_000_003 + step))

    val_batches = [batch(val, torch.Generator().manual_seed(10_000 + i)) for i in range(o["val_batches"])]

    def evaluate():
        with torch.no_grad():
            return {"val": sum(model.loss(x, y, train=False).item() for x, y in val_batches) / len(val_batches)}
    return Problem(model, lambda step: model.loss(*train_batch(step)), evaluate,
                   logits=lambda step: model(train_batch(step)[0]), tokens=B * T, mup_width_mult=cfg.width_mult,
                   tied_fallback=o["tied_fallback"], probe=train_batch(0),
                   loss_fn=lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten()))


# ----------------------------------------------------------------------------- RL post-training
def rl_arith(seed: int, o: dict) -> Problem:
    from .rl_arith import ArithRL       # imports torchstep.objectives only when the RL task is built
    rl = ArithRL(seed, o)
    return Problem(rl.model, rl.train_loss, rl.evaluate, routed=False, configure=rl.set_objective)


# ----------------------------------------------------------------------------- fine-tuning
def finetune_bytes(seed: int, o: dict) -> Problem:
    from .finetune import FineTune
    ft = FineTune(seed, o)
    return Problem(ft.model, ft.train_loss, ft.evaluate, routed=False, configure=ft.configure,
                   with_optimizer=ft.with_optimizer, backward=ft.backward)


#: tasks whose Problem has a probe batch and loss_fn (monitors, ``torchstep diagnose``)
PROBED = ("digits-mlp", "mnist1d", "gpt-bytes")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("quadratic", quadratic, 500, "least squares, d=256, n=4096, condition 1e3; val = f − f*", True,
         dict(d=256, n=4096, condition=1e3, batch=128), matrices=False),
    Task("logreg", logreg, 1000, "logistic regression, d=100, n=10k, feature scales 1…1e-2; val = f − f*", True,
         dict(d=100, n=10_000, batch=256), matrices=False),
    Task("rosenbrock", rosenbrock, 2000, "2-D Rosenbrock from (−1.5, 2); val = f (f* = 0)", True, {},
         matrices=False),
    Task("matrix-sensing", matrix_sensing, 1000,
         "40×40 rank-3 recovery from 800 Gaussian measurements, factors of rank 10; val = f (f* = 0)", True,
         dict(size=40, rank=3, measurements=800, factor_rank=10, batch=100)),
    Task("digits-mlp", digits_mlp, 500, "scikit-learn digits, MLP 64-256-256-10; val = held-out CE", False,
         dict(hidden=256, batch=128)),
    Task("mnist1d", mnist1d_mlp, 1500, "MNIST-1D (8k generated), MLP 40-256-256-10; val = held-out CE", False,
         dict(samples=8000, hidden=256, batch=128)),
    Task("gpt-bytes", gpt_bytes, 300, "byte GPT (default d128 L4 h4, ctx 128, batch 32, 0.87M parameters) on the "
         "frozen stdlib snapshot; val = nats/byte on 8 fixed held-out batches", False,
         dict(context=128, width=128, depth=4, heads=4, norm="pre", qk_norm=False, z_loss=0.0, batch=32,
              val_batches=8), extra_options=dict(mup_base_width=0, tied_fallback=False)),
    Task("rl-arith", rl_arith, 500, "RL on 2-digit addition: 2-layer 101k-parameter GPT, SFT warm start, 16 prompts × "
         "8 rollouts per step, exact-match reward; val = 1 − greedy accuracy on 512 held-out problems", False,
         dict(prompts=16, group=8, pool=1000, held_out=512, sft_problems=2000, sft_target=0.25, sft_max_steps=3000,
              temperature=1.0), kind="rl"),
    Task("finetune-bytes", finetune_bytes, 300, "adapt a stdlib-pretrained byte GPT (d64 L2 h4, ctx 64, 0.14M "
         "parameters, 600 steps) to Python's language-reference topics; val = held-out nats/byte on the new domain",
         False, dict(context=64, width=64, depth=2, heads=4, pretrain_steps=600, pretrain_lr=3e-3, batch=16,
                     val_batches=8), kind="finetune"),
]}
