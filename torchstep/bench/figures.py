"""The report's figures (matplotlib, Agg backend): read an analysis from :func:`.analysis.analyse`."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .arms import ARMS
from .stats import R_MAX, pareto_front, performance_profile
from .tasks import TASKS


def colour(arm: str):
    """The arm's fixed colour (its place in :data:`.arms.ARMS`: tab20, then Dark2, then tab20b), the same in
    every figure."""
    import matplotlib
    names = list(ARMS)
    i = names.index(arm) if arm in names else 47
    if i < 20:
        return matplotlib.colormaps["tab20"](i)
    return matplotlib.colormaps["Dark2"](i - 20) if i < 28 else matplotlib.colormaps["tab20b"]((i - 28) % 20)


def seed_band(ax, runs: list[list[tuple]], color, label: str, x=None, alpha: float = 0.2) -> None:
    """Plot the mean over seeds of curves ``runs`` (``[(step, value, …), …]`` each, cut to the shortest) with a
    min–max band, against their steps or the given ``x``."""
    n = min(len(c) for c in runs)
    vals = np.array([[p[1] for p in c[:n]] for c in runs])
    x = np.array([p[0] for p in runs[0][:n]]) if x is None else x
    ax.plot(x, vals.mean(0), color=color, label=label)
    ax.fill_between(x, vals.min(0), vals.max(0), color=color, alpha=alpha)


def write_figures(a: dict[str, Any], fig_dir: str | Path) -> list[str]:
    """Write the figures for analysis ``a`` (see :func:`.analysis.analyse`) into ``fig_dir``; returns file names.

    Per task ``TASK.png`` (loss vs step, loss vs CPU time, lr sensitivity), ``state_memory.png``,
    ``step_time.png``, ``state_pareto.png`` (final loss vs optimizer-state bytes, Pareto front) and, when AdamW
    ran, ``performance_profile.png``.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir = Path(fig_dir)
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for task, per_arm in a["summary"].items():
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for arm, e in per_arm.items():
            seeds = [a["curves"].get(t, []) for t in e.get("trial_ids", {}).values()]
            seeds = [c for c in seeds if c]
            if seeds:
                n = min(len(c) for c in seeds)
                cpu = np.mean([[p[2] for p in c[:n]] for c in seeds], axis=0)
                for ax, x in ((axes[0], None), (axes[1], cpu)):
                    seed_band(ax, seeds, colour(arm), f"{arm} (lr {e['lr']:g})", x=x)
            grid = e["grid"]
            if grid:
                lrs, finals = zip(*grid)
                axes[2].plot(lrs, finals, "o-", color=colour(arm), label=arm)
                div = [lr for lr in e["grid_diverged"]]
                axes[2].plot(div, [dict(grid)[lr] for lr in div], "x", color="black", ms=9)
        for ax, xlabel in zip(axes, ("step", "CPU seconds (1 thread)", "learning rate (seed 0; x = diverged)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val (lower is better)")
            ax.set_yscale("log" if TASKS[task].known_optimum else "linear")
        axes[2].set_xscale("log")
        axes[0].set_title(f"{task}: loss vs step (mean, seed min–max band)")
        axes[1].set_title("loss vs CPU time")
        axes[2].set_title("LR sensitivity")
        axes[2].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{task}.png"
        fig.savefig(fig_dir / name, dpi=110)
        plt.close(fig)
        made.append(name)
    # memory and step-time bars: one panel per task
    tasks = list(a["summary"])
    for metric, label, fname in (("state_bytes", "optimizer state (bytes)", "state_memory.png"),
                                 ("opt_ms", "optimizer step (CPU ms, 1 thread)", "step_time.png")):
        fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.6), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            arms = [arm for arm, e in a["summary"][task].items() if metric in e]
            ax.bar(range(len(arms)), [a["summary"][task][arm][metric] for arm in arms],
                   color=[colour(arm) for arm in arms])
            ax.set_xticks(range(len(arms)), arms, rotation=70, fontsize=7)
            ax.set_title(task, fontsize=9)
        axes[0][0].set_ylabel(label)
        fig.tight_layout()
        fig.savefig(fig_dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    made.append(_state_pareto(a, fig_dir, plt))
    if a["ttt"]:
        taus = np.linspace(1, R_MAX, 61)
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, rho in performance_profile(a["ttt"], taus).items():
            ax.step(taus, rho, where="post", color=colour(arm), label=arm)
        ax.set_xlabel("τ (steps-to-target ratio to the best arm)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title("Performance profile (target = tuned AdamW's median final val)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(fig_dir / "performance_profile.png", dpi=110)
        plt.close(fig)
        made.append("performance_profile.png")
    return made


def state_points(per_arm: dict[str, Any]) -> dict[str, tuple[float, float]]:
    """arm → (optimizer-state bytes, mean final val) for arms with both."""
    return {arm: (e["state_bytes"], e["mean"]) for arm, e in per_arm.items()
            if e.get("state_bytes") is not None and e.get("mean") is not None and np.isfinite(e["mean"])}


def _state_pareto(a: dict[str, Any], fig_dir: Path, plt) -> str:
    """Final val (mean ± 95 % CI) against optimizer-state bytes, one panel per task; the Pareto front joined."""
    tasks = list(a["summary"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        per_arm = a["summary"][task]
        points = state_points(per_arm)
        for arm, (b, v) in points.items():
            ax.errorbar(b, v, yerr=per_arm[arm].get("ci") or 0, fmt="o", color=colour(arm), capsize=3)
            ax.annotate(arm, (b, v), textcoords="offset points", xytext=(4, 4), fontsize=7)
        front = pareto_front(points)
        ax.plot([points[f][0] for f in front], [points[f][1] for f in front], "--", color="grey", lw=1,
                label="Pareto front")
        ax.set_xscale("log")
        ax.set_xlabel("optimizer state (bytes, exact)")
        ax.set_ylabel("final val (lower is better)")
        ax.set_title(f"{task}: loss vs state memory", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(fig_dir / "state_pareto.png", dpi=110)
    plt.close(fig)
    return "state_pareto.png"

