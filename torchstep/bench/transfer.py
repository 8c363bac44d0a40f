"""Does the best learning rate transfer across widths?  Standard parametrisation vs μP on ``gpt-bytes``.

One harness sweep (the usual lr search with edge extension, paired seeds) per (parametrisation, width): ``sp``
is the task as it is; ``mup`` sets ``mup_base_width`` to the smallest width, so the hidden matrices of an
element-wise arm run at lr/m and the model gets the μP readout, init and attention scale
(:mod:`torchstep.scaling.mup`).  Every tensor trains at the arm's lr (``tied_fallback``: the harness' usual
fixed-lr AdamW fallback for embeddings, head and norms would hide the lr's effect), so "lr" is one global lr,
divided by m on the hidden matrices under μP.  The report gives, per arm and parametrisation, each width's best lr and loss,
the spread of the best lr across widths (in half-decades: the grid's unit), and the *transfer regret* — the
loss at the base width's best lr minus the width's own best — which μP should keep near zero.

Run by ``torchstep bench transfer`` (docs/mup.md quotes its output; docs/results/lr-transfer keeps the run).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .stats import best_lr
from .store import trials
from .sweep import Suite, sweep

PARAMETRISATIONS = ("sp", "mup")


def suites(arms: tuple[str, ...], widths: tuple[int, ...], steps: int, seeds: int, grid_points: int,
           options: dict, schedule: str = "cosine") -> dict[tuple[str, int], Suite]:
    """(parametrisation, width) → the sweep of ``gpt-bytes`` at that width."""
    base = min(widths)
    return {(p, w): Suite(("gpt-bytes",), arms, seeds=seeds, steps={"gpt-bytes": steps}, grid_points=grid_points,
                          options={"gpt-bytes": {**options, "width": w, "mup_base_width": base if p == "mup" else 0,
                                                 "tied_fallback": True}},
                          schedule=schedule)
            for p in PARAMETRISATIONS for w in sorted(widths)}


def _rows_by(db: Path, plan: dict[tuple[str, int], Suite]) -> dict[tuple[str, int, str], dict[float, dict]]:
    """(parametrisation, width, arm) → lr → the seed-0 row of exactly this plan's configuration (same options,
    budget and schedule: a database re-used with other settings contributes nothing)."""
    from .runner import resolve
    wanted = {}
    for key, suite in plan.items():
        for arm in suite.arms:
            c = resolve("gpt-bytes", arm, 1.0, 0, suite.budget("gpt-bytes"), "tune", suite.options["gpt-bytes"],
                        schedule=suite.schedule)
            wanted[(arm, json.dumps(c["task_options"], sort_keys=True), c["steps"], c["schedule"])] = key
    out: dict[tuple[str, int, str], dict[float, dict]] = {}
    for row in trials(db):
        c = json.loads(row["config"])
        key = wanted.get((row["arm"], json.dumps(c["task_options"], sort_keys=True), c["steps"], c["schedule"]))
        if row["seed"] == 0 and key is not None:
            out.setdefault((*key, row["arm"]), {})[row["lr"]] = row
    return out


def write_csv(db: Path, plan: dict[tuple[str, int], Suite], path: Path) -> None:
    """Every seed-0 trial of the plan: arm, parametrisation, width, lr, final val, diverged."""
    import csv
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("arm", "param", "width", "lr", "final_val", "diverged"))
        for (p, width, arm), runs in sorted(_rows_by(db, plan).items()):
            for lr, row in sorted(runs.items()):
                w.writerow((arm, p, width, lr, row["final_val"], row["diverged"]))


def summary(db: Path, plan: dict[tuple[str, int], Suite]) -> list[dict]:
    """One row per (arm, parametrisation, width): best lr, its loss, and the regret of the base width's lr."""
    rows_by = _rows_by(db, plan)
    out = []
    for arm in sorted({a for (_, _, a) in rows_by}):
        for p in PARAMETRISATIONS:
            widths = sorted(w for (q, w, a) in rows_by if q == p and a == arm)
            if not widths:
                continue
            base_lr = best_lr(rows_by[(p, widths[0], arm)])
            for w in widths:
                runs = rows_by[(p, w, arm)]
                lr = best_lr(runs)
                at_base = runs.get(base_lr)
                out.append({"arm": arm, "param": p, "width": w, "best_lr": lr,
                            "best_val": None if lr is None else runs[lr]["final_val"],
                            "regret": None if lr is None or at_base is None or at_base["diverged"]
                            else at_base["final_val"] - runs[lr]["final_val"]})
    return out


def spread(rows: list[dict], arm: str, param: str) -> float:
    """max − min of log10(best lr) across widths, in half-decades."""
    lrs = [r["best_lr"] for r in rows if r["arm"] == arm and r["param"] == param and r["best_lr"]]
    return 2 * (math.log10(max(lrs)) - math.log10(min(lrs))) if lrs else float("nan")


def figure(db: Path, plan: dict[tuple[str, int], Suite], path: Path) -> None:
    """Final validation loss vs lr, one line per width; one panel per (arm, parametrisation)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows_by = _rows_by(db, plan)
    panels = sorted({(a, p) for (p, _, a) in rows_by}, key=lambda k: (k[0], PARAMETRISATIONS.index(k[1])))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, (arm, p) in zip(axes[0], panels):
        for (q, w, a), runs in sorted(rows_by.items(), key=lambda kv: kv[0][1]):
            if (a, q) != (arm, p):
                continue
            lrs = sorted(lr for lr in runs if not runs[lr]["diverged"])
            ax.plot(lrs, [runs[lr]["final_val"] for lr in lrs], marker="o", label=f"width {w}")
        ax.set(xscale="log", xlabel="lr (hidden matrices: lr/m under μP)", title=f"{arm}, {p}")
    axes[0][0].set_ylabel("final val (nats/byte)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(out: str | Path, arms: tuple[str, ...] = ("adamw",), widths: tuple[int, ...] = (32, 64, 128, 256),
        steps: int = 300, seeds: int = 1, grid_points: int = 6, options: dict | None = None,
        workers: int | None = None, progress: bool = True) -> tuple[Path, list[dict]]:
    """Sweep every (parametrisation, width) into ``out/results.sqlite``; write the figure and ``lr-transfer.csv``
    (every seed-0 trial); return the summary."""
    plan = suites(arms, widths, steps, seeds, grid_points, options or {})
    db = sweep(list(plan.values()), out, workers=workers, progress=progress)
    figure(db, plan, Path(out) / "lr-transfer.png")
    write_csv(db, plan, Path(out) / "lr-transfer.csv")
    return db, summary(db, plan)


__all__ = ["PARAMETRISATIONS", "suites", "summary", "spread", "figure", "write_csv", "run"]
