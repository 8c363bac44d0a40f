"""``torchstep diagnose``: the curvature, data-score and intrinsic-dimension diagnostics on the harness' tasks.

Each command builds the task's problem (seed 0), optionally trains it first (``train_steps`` of an arm at an lr,
the harness' routing and schedule), runs one diagnostic and writes ``<kind>.csv`` and ``<kind>.png`` into the
output directory; it returns the rows it wrote.  Curvature runs on the task's probe batch (one training batch),
data scores and intrinsic dimension on its training / validation split (classification tasks only).
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..diagnostics import (CurvatureOperator, hutchinson_trace, lanczos_eigenvalues, plot_spectral_density,
                           spectral_density)
from ..diagnostics.data import data_scores
from ..diagnostics.subspace import intrinsic_dimension, subspace_train_fn
from .arms import ARMS, ArmOptimizer
from .tasks import PROBED, TASKS

KINDS = ("hessian", "density", "el2n", "intrinsic-dim")


def problem(task: str, options: dict | None = None, arm: str = "adamw", lr: float | None = None,
            train_steps: int = 0):
    """The task's problem at seed 0, trained ``train_steps`` steps of ``arm`` at ``lr`` (default its grid centre)."""
    if task not in PROBED:
        raise ValueError(f"Invalid task: {task!r} (valid range: one of {PROBED})")
    torch.manual_seed(0)
    prob = TASKS[task].problem(0, **(options or {}))
    if train_steps:
        from .runner import _train
        opt = ArmOptimizer(ARMS[arm], prob, ARMS[arm].default_lr if lr is None else lr, train_steps)
        _train(prob, opt, train_steps, evals=1)
    return prob


def _write(out: Path, name: str, header: tuple[str, ...], rows: list[tuple]) -> list[tuple]:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return rows


def _figure():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def hessian(prob, out: Path, k: int = 5, trace_samples: int = 30) -> list[tuple]:
    """Top-``k`` Hessian eigenvalues (Lanczos, largest algebraic) and the Hutchinson trace with its 95 % CI."""
    op = CurvatureOperator(prob.model, prob.loss_fn, prob.probe)
    eig = lanczos_eigenvalues(op, k, generator=torch.Generator().manual_seed(0))
    tr = hutchinson_trace(op, trace_samples, generator=torch.Generator().manual_seed(1))
    rows = [("eigenvalue", i + 1, float(v), "") for i, v in enumerate(eig.values)]
    rows.append(("trace", 0, tr.value, tr.halfwidth))
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(range(1, k + 1), [float(v) for v in eig.values])
    ax.set(xlabel="rank", ylabel="eigenvalue", title=f"top-{k} Hessian eigenvalues; tr H = {tr.value:.4g} ± "
           f"{tr.halfwidth:.2g}")
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / "hessian.png", dpi=100)
    plt.close(fig)
    return _write(out, "hessian", ("kind", "rank", "value", "ci95_halfwidth"), rows)


def density(prob, out: Path, steps: int = 60, runs: int = 2) -> list[tuple]:
    """Stochastic Lanczos quadrature spectral density of the Hessian (``runs`` probe vectors)."""
    op = CurvatureOperator(prob.model, prob.loss_fn, prob.probe)
    result = spectral_density(op, steps, runs, generator=torch.Generator().manual_seed(0))
    out.mkdir(parents=True, exist_ok=True)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    plot_spectral_density(result, ax)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=100)
    plt.close(fig)
    return _write(out, "density", ("eigenvalue", "density"),
                  [(float(x), float(y)) for x, y in zip(result.grid, result.density)])


def el2n(prob, out: Path) -> list[tuple]:
    """EL2N and GraNd of every training example, in dataset order."""
    if prob.data is None:
        raise ValueError("Invalid task: data scores need a classification task (digits-mlp, mnist1d)")
    scores = data_scores(prob.model, (prob.data[0], prob.data[1]), prob.loss_fn)
    out.mkdir(parents=True, exist_ok=True)
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.3))
    for ax, key in zip(axes, ("el2n", "grand")):
        ax.hist(scores[key].numpy(), bins=40)
        ax.set(xlabel=key, ylabel="examples")
    fig.tight_layout()
    fig.savefig(out / "el2n.png", dpi=100)
    plt.close(fig)
    return _write(out, "el2n", ("index", "el2n", "grand"),
                  [(i, float(a), float(b)) for i, (a, b) in enumerate(zip(scores["el2n"], scores["grand"]))])


def intrinsic(prob, out: Path, dims: tuple[int, ...] = (10, 30, 100, 300, 1000), steps: int = 300,
              projection: str = "fastfood", lr: float = 1e-2) -> list[tuple]:
    """Validation accuracy of subspace training at each ``d`` (and direct training); d_int90 both ways.  θ0 is
    ``prob.model``'s current weights: pass an untrained problem (the definition trains from initialisation)."""
    if prob.data is None:
        raise ValueError("Invalid task: intrinsic dimension needs a classification task (digits-mlp, mnist1d)")
    Xtr, ytr, Xva, yva = prob.data
    init = {k: v.detach().clone() for k, v in prob.model.state_dict().items()}

    def make_model(seed):
        import copy
        model = copy.deepcopy(prob.model)
        model.load_state_dict(init)
        return model
    train = subspace_train_fn(make_model, prob.loss_fn, (Xtr, ytr), (Xva, yva), steps=steps, lr=lr,
                              projection=projection, batch_size=128)
    done: dict = {}

    def train_fn(d):                      # each d trained once for both conventions
        if d not in done:
            done[d] = train(d)
        return done[d]
    rel = intrinsic_dimension(train_fn, dims, 0.9, relative=True, exhaustive=True)
    ab = intrinsic_dimension(train_fn, dims, 0.9, relative=False, exhaustive=True)
    curve = sorted(rel.curve.items())
    out.mkdir(parents=True, exist_ok=True)
    plt = _figure()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([d for d, _ in curve], [v for _, v in curve], "o-", label="subspace")
    ax.axhline(rel.baseline, color="black", lw=1, label=f"direct ({rel.baseline:.3f})")
    ax.axhline(0.9 * rel.baseline, color="grey", ls="--", lw=1, label="90 % of direct")
    ax.set(xscale="log", xlabel="d", ylabel="val accuracy",
           title=f"d_int90: relative {rel.d_int}, absolute {ab.d_int}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "intrinsic-dim.png", dpi=100)
    plt.close(fig)
    rows = [(d, v) for d, v in curve] + [("direct", rel.baseline), ("d_int90_relative", rel.d_int),
                                         ("d_int90_absolute", ab.d_int)]
    return _write(out, "intrinsic-dim", ("d", "val_accuracy"), rows)


__all__ = ["KINDS", "problem", "hessian", "density", "el2n", "intrinsic"]
