"""``torchstep report DIR``: report.md + figures/*.png + CSV from ``DIR/results.sqlite``.

The numbers come from :func:`.analysis.analyse`, the plots from :mod:`.figures`; this module only writes.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from . import eos, method_report
from .analysis import analyse
from .figures import state_points, write_figures
from .stats import paired_p, pareto_front
from .tasks import TASKS


def _fmt(x: float) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.4g}"


def verdict_table(a: dict[str, Any]) -> str:
    """The markdown verdict table (one row per task) of analysis ``a``: printed by ``torchstep bench``."""
    lines = ["| task | winner | mean ± 95% CI | runner-up | paired p | verdict |", "|---|---|---|---|---|---|"]
    for task, v in a["verdicts"].items():
        if v["winner"] is None:
            lines.append(f"| {task} | – | – | – | – | {v['text']} |")
            continue
        e = a["summary"][task][v["winner"]]
        lines.append(f"| {task} | {v['winner']} | {_fmt(e['mean'])} ± {_fmt(e['ci'])} | {v['runner_up'] or '–'} | "
                     f"{_fmt(v.get('p'))} | {v['text']} |")
    return "\n".join(lines)


def write(out: str | Path, analysis: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``figures/``, ``runs.csv`` and ``summary.csv`` into ``out``; returns report.md's path.

    ``analysis`` is :func:`.analysis.analyse` of ``out/results.sqlite``; pass it when you already have it
    (``torchstep bench`` does, to print its verdict table), else it is computed here.  Raises
    ``FileNotFoundError`` when there is no database.
    """
    out = Path(out)
    db = out / "results.sqlite"
    if not db.exists():
        raise FileNotFoundError(f"no results database at {db}; run `torchstep bench --out {out}` first")
    a = analyse(db) if analysis is None else analysis
    figures = write_figures(a, out / "figures")
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
    schedules = " / ".join(sorted({json.loads(r["config"])["schedule"] for r in a["rows"]})) or "schedule ?"
    md = ["# torchstep benchmark report", "",
          f"Protocol `{json.loads(a['rows'][0]['config'])['protocol'] if a['rows'] else '?'}`: per-arm lr search "
          f"(4 half-decade points, edge-extended), {schedules} at each run's own budget, matched "
          "routing (non-matrix tensors on AdamW at a shared lr for every arm), paired seeds, final metrics only, "
          "paired t-test (α = 0.05) before a winner is named.", "",
          f"Environment: torch {env.get('torch')}, numpy {env.get('numpy')}, Python {env.get('python')}, "
          f"CPU {env.get('cpu')}, {env.get('nproc')} cores, 1 torch thread per run, code {env.get('revision')}.", "",
          "## Verdict", "", verdict_table(a), "",
          "## Per task (best lr, final val mean ± 95 % CI over seeds, time to AdamW's target)", ""]
    for task, per_arm in a["summary"].items():
        md += [f"### {task}", "", TASKS[task].description + (f"; target {a['targets'][task]:.4g}"
                                                             if task in a["targets"] else ""), "",
               "| arm | best lr | edge | seeds | final val | paired p vs adamw | steps→target | CPU-s→target | "
               "state bytes | opt ms/step | diverged grid lrs |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        reference = per_arm.get("adamw", {}).get("finals")
        for arm, e in sorted(per_arm.items(), key=lambda kv: kv[1].get("mean", math.inf)):
            p_vs = (_fmt(paired_p(e["finals"], reference)) if reference and arm != "adamw"
                    and len(set(e["finals"]) & set(reference)) >= 2 else "")
            md.append(f"| {arm} | {_fmt(e['lr'])} | {'yes' if e['edge'] else ''} | {len(e['finals'])} | "
                      f"{_fmt(e.get('mean'))} ± {_fmt(e.get('ci'))} | {p_vs} | {_fmt(e.get('steps_to_target'))} | "
                      f"{_fmt(e.get('cpu_to_target'))} | {e.get('state_bytes', '–')} | {_fmt(e.get('opt_ms'))} | "
                      f"{', '.join(f'{x:g}' for x in e['grid_diverged']) or ''} |")
        md += ["", f"![{task}](figures/{task}.png)", ""]
    md += ["## Cost and profile", "", "![state memory](figures/state_memory.png)", "",
           "![step time](figures/step_time.png)", "", "### Loss vs optimizer-state memory", ""]
    for task, per_arm in a["summary"].items():
        points = state_points(per_arm)
        front = ", ".join(f"{arm} ({points[arm][0]:,} B, {points[arm][1]:.4g})" for arm in pareto_front(points))
        md.append(f"- {task}: Pareto front (no arm has less state and a lower loss): {front or '–'}")
    md += ["", "![loss vs state memory](figures/state_pareto.png)", ""]
    if "performance_profile.png" in figures:
        md += ["![performance profile](figures/performance_profile.png)", ""]
    methods = method_report.table(a)
    if methods:
        method_report.write_figures(db, a, out / "figures")
        md += ["## Method tasks (RL objectives, fine-tuning methods)", ""] + methods
    stability = eos.table(db, a)
    if stability:
        eos.write_figures(db, a, out / "figures")
        md += ["## Edge of stability (`--monitor sharpness`)", "", eos.__doc__.split("\n\n")[1].replace("\n", " "),
               ""] + stability + ["Every lr of the grid (seed 0):", ""] + eos.grid_table(db) + [""]
    warnings = [f"- {task}/{arm}: best lr {e['lr']:g} is on the grid edge after extension" for task, per in
                a["summary"].items() for arm, e in per.items() if e["edge"] and e["lr"] is not None]
    warnings += [f"- {task}/{arm}: every grid point diverged" for task, per in a["summary"].items()
                 for arm, e in per.items() if e["lr"] is None]
    md += ["## Warnings", ""] + (warnings or ["- none"]) + [""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    return path
