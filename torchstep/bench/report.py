"""``torchstep report DIR``: report.md + figures/*.png + CSV from ``DIR/results.sqlite``."""
from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .arms import ARMS
from .stats import R_MAX, performance_profile, summarise, time_to_target, verdict
from .store import curves, trials
from .tasks import TASKS


def status_from_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Best tuning lr per (task, arm) from the seed-0 grid, and whether it sits on the grid's edge."""
    grid = defaultdict(dict)
    for r in rows:
        if r["seed"] == 0:
            grid[(r["task"], r["arm"])][r["lr"]] = r
    out = {}
    for key, points in grid.items():
        ok = {lr: r for lr, r in points.items() if not r["diverged"]}
        best = min(ok, key=lambda lr: ok[lr]["final_val"]) if ok else None
        out[key] = {"best": best, "edge": best is not None and best in (min(points), max(points))}
    return out


def _colour(arm: str):
    import matplotlib
    names = list(ARMS)
    return matplotlib.colormaps["tab20"](names.index(arm) % 20 if arm in names else 19)


def analyse(db: Path) -> dict[str, Any]:
    rows = trials(db)
    summary = summarise(rows, status_from_rows(rows))
    val_curves = curves(db, "val")
    verdicts, targets, ttt = {}, {}, {}
    for task, per_arm in summary.items():
        verdicts[task] = verdict(per_arm)
        adamw = per_arm.get("adamw", {})
        if adamw.get("finals"):
            targets[task] = float(np.median(list(adamw["finals"].values())))
            ttt[task] = {}
            for arm, e in per_arm.items():
                hits = [time_to_target(val_curves.get(tid, []), targets[task]) for tid in e["trial_ids"].values()]
                # median over seeds: finite when most seeds reach the target (AdamW's own median does)
                e["steps_to_target"] = float(np.median([h[0] for h in hits])) if hits else math.inf
                e["cpu_to_target"] = float(np.median([h[1] for h in hits])) if hits else math.inf
                ttt[task][arm] = e["steps_to_target"]
    return {"rows": rows, "summary": summary, "verdicts": verdicts, "targets": targets, "ttt": ttt,
            "curves": val_curves}


def _figures(a: dict[str, Any], fig_dir: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for task, per_arm in a["summary"].items():
        fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
        for arm, e in per_arm.items():
            seeds = [a["curves"].get(t, []) for t in e.get("trial_ids", {}).values()]
            seeds = [c for c in seeds if c]
            if seeds:
                n = min(len(c) for c in seeds)
                steps = np.array([p[0] for p in seeds[0][:n]])
                vals = np.array([[p[1] for p in c[:n]] for c in seeds])
                cpu = np.mean([[p[2] for p in c[:n]] for c in seeds], axis=0)
                for ax, x in ((axes[0], steps), (axes[1], cpu)):
                    ax.plot(x, vals.mean(0), color=_colour(arm), label=f"{arm} (lr {e['lr']:g})")
                    ax.fill_between(x, vals.min(0), vals.max(0), color=_colour(arm), alpha=0.2)
            grid = e["grid"]
            if grid:
                lrs, finals = zip(*grid)
                axes[2].plot(lrs, finals, "o-", color=_colour(arm), label=arm)
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
                   color=[_colour(arm) for arm in arms])
            ax.set_xticks(range(len(arms)), arms, rotation=70, fontsize=7)
            ax.set_title(task, fontsize=9)
        axes[0][0].set_ylabel(label)
        fig.tight_layout()
        fig.savefig(fig_dir / fname, dpi=110)
        plt.close(fig)
        made.append(fname)
    if a["ttt"]:
        taus = np.linspace(1, R_MAX, 61)
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, rho in performance_profile(a["ttt"], taus).items():
            ax.step(taus, rho, where="post", color=_colour(arm), label=arm)
        ax.set_xlabel("τ (steps-to-target ratio to the best arm)")
        ax.set_ylabel("fraction of tasks")
        ax.set_title("Performance profile (target = tuned AdamW's median final val)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(fig_dir / "performance_profile.png", dpi=110)
        plt.close(fig)
        made.append("performance_profile.png")
    return made


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def verdict_table(a: dict[str, Any]) -> str:
    lines = ["| task | winner | mean ± 95% CI | runner-up | paired p | verdict |", "|---|---|---|---|---|---|"]
    for task, v in a["verdicts"].items():
        if v["winner"] is None:
            lines.append(f"| {task} | – | – | – | – | {v['text']} |")
            continue
        e = a["summary"][task][v["winner"]]
        lines.append(f"| {task} | {v['winner']} | {_fmt(e['mean'])} ± {_fmt(e['ci'])} | {v['runner_up'] or '–'} | "
                     f"{_fmt(v.get('p'))} | {v['text']} |")
    return "\n".join(lines)


def write(out: str | Path) -> Path:
    """Analyse ``out/results.sqlite`` and write ``report.md``, ``figures/``, ``runs.csv``, ``summary.csv``."""
    out = Path(out)
    db = out / "results.sqlite"
    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run `torchstep bench --out {out}` first")
    a = analyse(db)
    figures = _figures(a, out / "figures")
    with open(out / "runs.csv", "w", newline="") as fh:
        cols = [c for c in a["rows"][0] if c not in ("config", "env")] if a["rows"] else []
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(a["rows"])
    summary_rows = []
    for task, per_arm in a["summary"].items():
        for arm, e in per_arm.items():
            summary_rows.append({"task": task, "arm": arm, "best_lr": e["lr"], "lr_on_grid_edge": e["edge"],
                                 "seeds": len(e["finals"]), "mean": e.get("mean"), "ci95": e.get("ci"),
                                 "diverged": e["diverged"], "steps_to_target": e.get("steps_to_target"),
                                 "cpu_s_to_target": e.get("cpu_to_target"), "state_bytes": e.get("state_bytes"),
                                 "opt_step_ms": e.get("opt_ms"), "step_ms": e.get("step_ms")})
    with open(out / "summary.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(summary_rows[0]) if summary_rows else ["task"])
        w.writeheader()
        w.writerows(summary_rows)
    env = json.loads(a["rows"][0]["env"]) if a["rows"] else {}
    md = ["# torchstep benchmark report", "",
          f"Protocol `{json.loads(a['rows'][0]['config'])['protocol'] if a['rows'] else '?'}`: per-arm lr search "
          "(4 half-decade points, edge-extended), warm-up 5 % + cosine to 0 at each run's own budget, matched "
          "routing (non-matrix tensors on AdamW at a shared lr for every arm), paired seeds, final metrics only, "
          "paired t-test (α = 0.05) before a winner is named.", "",
          f"Environment: torch {env.get('torch')}, numpy {env.get('numpy')}, Python {env.get('python')}, "
          f"CPU {env.get('cpu')}, {env.get('nproc')} cores, 1 torch thread per run, code {env.get('revision')}.", "",
          "## Verdict", "", verdict_table(a), "",
          "## Per task (best lr, final val mean ± 95 % CI over seeds, time to AdamW's target)", ""]
    for task, per_arm in a["summary"].items():
        md += [f"### {task}", "", TASKS[task].description + (f"; target {a['targets'][task]:.4g}"
                                                             if task in a["targets"] else ""), "",
               "| arm | best lr | edge | seeds | final val | steps→target | CPU-s→target | state bytes | "
               "opt ms/step | diverged grid lrs |", "|---|---|---|---|---|---|---|---|---|---|"]
        for arm, e in sorted(per_arm.items(), key=lambda kv: kv[1].get("mean", math.inf)):
            md.append(f"| {arm} | {_fmt(e['lr'])} | {'yes' if e['edge'] else ''} | {len(e['finals'])} | "
                      f"{_fmt(e.get('mean'))} ± {_fmt(e.get('ci'))} | {_fmt(e.get('steps_to_target'))} | "
                      f"{_fmt(e.get('cpu_to_target'))} | {e.get('state_bytes', '–')} | {_fmt(e.get('opt_ms'))} | "
                      f"{', '.join(f'{x:g}' for x in e['grid_diverged']) or ''} |")
        md += ["", f"![{task}](figures/{task}.png)", ""]
    md += ["## Cost and profile", "", "![state memory](figures/state_memory.png)", "",
           "![step time](figures/step_time.png)", ""]
    if "performance_profile.png" in figures:
        md += ["![performance profile](figures/performance_profile.png)", ""]
    warnings = [f"- {task}/{arm}: best lr {e['lr']:g} is on the grid edge after extension" for task, per in
                a["summary"].items() for arm, e in per.items() if e["edge"] and e["lr"] is not None]
    warnings += [f"- {task}/{arm}: every grid point diverged" for task, per in a["summary"].items()
                 for arm, e in per.items() if e["lr"] is None]
    md += ["## Warnings", ""] + (warnings or ["- none"]) + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
