"""The report's RL section (tasks with ``kind == "rl"``, e.g. ``rl-arith``): per objective arm the held-out greedy
accuracy, its gain over the SFT start, the fraction of rollouts in zero-variance groups and the step cost, with a
paired t-test against GRPO; and per task a figure of accuracy, training loss and zero-variance fraction vs step.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .stats import mean_ci, paired_p
from .store import curves
from .tasks import TASKS

REFERENCE = "grpo"
CURVES = (("accuracy", "held-out greedy accuracy"), ("train_loss", "training loss (surrogate)"),
          ("zero_var_frac", "rollouts in zero-variance groups (cumulative)"))


def _rl_tasks(a: dict[str, Any]) -> list[str]:
    return [t for t in a["summary"] if TASKS[t].kind == "rl"]


def _finals(a: dict[str, Any], task: str, arm: str) -> dict[int, dict[str, float]]:
    """seed → final metrics (plus ``sft_accuracy``) of the arm's trials at its best lr."""
    ids = set(a["summary"][task][arm]["trial_ids"].values())
    out = {}
    for r in a["rows"]:
        if r["trial_id"] in ids and not r["diverged"]:
            m = json.loads(r["final_metrics"])
            out[r["seed"]] = {**m, "sft_accuracy": 1.0 - r["init_val"], "ms_per_step": 1e3 * r["cpu_s"] / r["steps"]}
    return out


def table(a: dict[str, Any]) -> list[str]:
    """Markdown lines of the RL section (empty when no RL task ran)."""
    md = []
    for task in _rl_tasks(a):
        md += [f"### {task}: objectives", "",
               f"Final held-out greedy accuracy (mean ± 95 % CI over seeds), gain over the SFT start, rollouts in "
               f"zero-variance groups and mean rollout reward over training, CPU ms per RL step (rollouts + update), "
               f"paired t-test on accuracy against {REFERENCE}.", "",
               "| arm | lr | seeds | accuracy | Δ accuracy vs SFT | zero-var rollouts | train reward | ms/step | "
               f"paired p vs {REFERENCE} |", "|---|---|---|---|---|---|---|---|---|"]
        per_arm = {arm: _finals(a, task, arm) for arm in a["summary"][task]}
        ref = {s: m["accuracy"] for s, m in per_arm.get(REFERENCE, {}).items()}
        rows = []
        for arm, finals in per_arm.items():
            if not finals:
                continue
            acc = {s: m["accuracy"] for s, m in finals.items()}
            mean, ci = mean_ci(list(acc.values()))
            gain = mean_ci([m["accuracy"] - m["sft_accuracy"] for m in finals.values()])
            p = paired_p(acc, ref) if ref and arm != REFERENCE else math.nan
            avg = {k: float(np.mean([m.get(k, math.nan) for m in finals.values()]))
                   for k in ("zero_var_frac", "train_reward", "ms_per_step")}
            rows.append((mean, f"| {arm} | {a['summary'][task][arm]['lr']:g} | {len(finals)} | {mean:.3f} ± {ci:.3f} | "
                               f"{gain[0]:+.3f} ± {gain[1]:.3f} | {avg['zero_var_frac']:.3f} | "
                               f"{avg['train_reward']:.3f} | {avg['ms_per_step']:.0f} | "
                               f"{'' if math.isnan(p) else f'{p:.3g}'} |"))
        md += [line for _, line in sorted(rows, key=lambda r: -r[0])]
        md += ["", f"![{task} objectives](figures/{task}-rl.png)", ""]
    return md


def write_figures(db: str | Path, a: dict[str, Any], fig_dir: str | Path) -> list[str]:
    """``TASK-rl.png`` per RL task: the :data:`CURVES` metrics vs step (mean over seeds, min–max band)."""
    tasks = _rl_tasks(a)
    if not tasks:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .figures import colour
    series = {name: curves(db, name) for name, _ in CURVES}
    made = []
    for task in tasks:
        fig, axes = plt.subplots(1, len(CURVES), figsize=(16, 4.2))
        for arm, e in a["summary"][task].items():
            for ax, (name, label) in zip(axes, CURVES):
                runs = [series[name].get(t, []) for t in e["trial_ids"].values()]
                runs = [c for c in runs if c]
                if not runs:
                    continue
                n = min(len(c) for c in runs)
                x = np.array([p[0] for p in runs[0][:n]])
                v = np.array([[p[1] for p in c[:n]] for c in runs])
                ax.plot(x, v.mean(0), color=colour(arm), label=arm)
                ax.fill_between(x, v.min(0), v.max(0), color=colour(arm), alpha=0.15)
                ax.set_title(label, fontsize=10)
                ax.set_xlabel("RL step")
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{task}-rl.png"
        fig.savefig(Path(fig_dir) / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made
