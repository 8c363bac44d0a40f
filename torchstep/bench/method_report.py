"""The report's sections for tasks whose arms are methods rather than optimizers (``Task.kind`` ``"rl"`` /
``"finetune"``): per arm the task's own final metrics (mean ± 95 % CI over seeds) with a paired t-test against the
kind's reference arm, and per task a figure of those metrics' curves vs step.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .stats import mean_ci, paired_p
from .store import curves
from .tasks import TASKS


@dataclass(frozen=True)
class KindReport:
    title: str
    intro: str
    reference: str                      # arm the paired test compares against
    test_metric: str                    # final metric of the paired test
    columns: tuple[tuple[str, str, bool], ...]   # (metric, header, with CI)
    curves: tuple[tuple[str, str], ...]          # (metric, panel title)


KINDS = {
    "rl": KindReport(
        "objectives", "Final held-out greedy accuracy, its gain over the SFT start, rollouts in zero-variance groups "
        "and mean rollout reward over training, CPU ms per RL step (rollouts + update + evaluations), paired t-test "
        "on accuracy against grpo.", "grpo", "accuracy",
        (("accuracy", "accuracy", True), ("gain", "Δ accuracy vs SFT", True), ("zero_var_frac", "zero-var rollouts",
                                                                              False),
         ("train_reward", "train reward", False), ("ms_per_step", "ms/step", False)),
        (("accuracy", "held-out greedy accuracy"), ("train_loss", "training loss (surrogate)"),
         ("zero_var_frac", "rollouts in zero-variance groups (cumulative)"))),
    "finetune": KindReport(
        "fine-tuning methods", "Held-out loss on the new domain (nats/byte), forgetting (loss increase on the "
        "pretraining domain's validation batches), trainable parameters, optimizer-state bytes, CPU ms per step "
        "(incl. evaluations); paired t-test on the new-domain loss against lora.", "lora", "val",
        (("val", "new-domain loss", True), ("forgetting", "forgetting", True), ("trainable", "trainable params", False),
         ("state_bytes", "state bytes", False), ("ms_per_step", "ms/step", False)),
        (("val", "held-out loss, new domain"), ("original", "loss on the pretraining domain"),
         ("train_loss", "training loss"))),
}


def _tasks(a: dict[str, Any]) -> list[str]:
    return [t for t in a["summary"] if TASKS[t].kind in KINDS]


def _finals(a: dict[str, Any], task: str, arm: str) -> dict[int, dict[str, float]]:
    """seed → final metrics of the arm's trials at its best lr, plus ``gain`` (RL: accuracy − the start's),
    ``ms_per_step`` and ``state_bytes``."""
    ids = set(a["summary"][task][arm]["trial_ids"].values())
    out = {}
    for r in a["rows"]:
        if r["trial_id"] in ids and not r["diverged"]:
            m = json.loads(r["final_metrics"])
            if "accuracy" in m:
                m["gain"] = m["accuracy"] - (1.0 - r["init_val"])
            out[r["seed"]] = {**m, "ms_per_step": 1e3 * r["cpu_s"] / r["steps"], "state_bytes": r["state_bytes"]}
    return out


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}" if abs(x) >= 10 else f"{x:.3f}"


def table(a: dict[str, Any]) -> list[str]:
    """Markdown lines of the method sections (empty when no such task ran)."""
    md = []
    for task in _tasks(a):
        k = KINDS[TASKS[task].kind]
        md += [f"### {task}: {k.title}", "", k.intro, "",
               "| arm | lr | seeds | " + " | ".join(h for _, h, _ in k.columns) + f" | paired p vs {k.reference} |",
               "|---" * (len(k.columns) + 4) + "|"]
        per_arm = {arm: _finals(a, task, arm) for arm in a["summary"][task]}
        ref = {s: m[k.test_metric] for s, m in per_arm.get(k.reference, {}).items()}
        rows = []
        for arm, finals in per_arm.items():
            if not finals:
                continue
            cells = []
            for metric, _, with_ci in k.columns:
                values = [m.get(metric, math.nan) for m in finals.values()]
                mean, ci = mean_ci(values) if with_ci else (float(np.mean(values)), None)
                cells.append(_fmt(mean) + (f" ± {_fmt(ci)}" if ci is not None else ""))
            p = paired_p({s: m[k.test_metric] for s, m in finals.items()}, ref) if ref and arm != k.reference \
                else math.nan
            key = float(np.mean([m[k.test_metric] for m in finals.values()]))
            rows.append((-key if k.test_metric == "accuracy" else key,
                         f"| {arm} | {a['summary'][task][arm]['lr']:g} | {len(finals)} | " + " | ".join(cells) +
                         f" | {'' if math.isnan(p) else f'{p:.3g}'} |"))
        md += [line for _, line in sorted(rows)] + ["", f"![{task} methods](figures/{task}-methods.png)", ""]
    return md


def write_figures(db: str | Path, a: dict[str, Any], fig_dir: str | Path) -> list[str]:
    """``TASK-methods.png`` per task: its kind's curves vs step (mean over seeds, min–max band)."""
    tasks = _tasks(a)
    if not tasks:
        return []
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .figures import colour, seed_band
    made = []
    for task in tasks:
        k = KINDS[TASKS[task].kind]
        series = {name: curves(db, name) for name, _ in k.curves}
        fig, axes = plt.subplots(1, len(k.curves), figsize=(16, 4.2))
        for arm, e in a["summary"][task].items():
            for ax, (name, label) in zip(axes, k.curves):
                runs = [c for c in (series[name].get(t, []) for t in e["trial_ids"].values()) if c]
                if not runs:
                    continue
                seed_band(ax, runs, colour(arm), f"{arm} (lr {e['lr']:g})", alpha=0.15)
                ax.set_title(label, fontsize=10)
                ax.set_xlabel("step")
        axes[0].legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{task}-methods.png"
        fig.savefig(Path(fig_dir) / name, dpi=110)
        plt.close(fig)
        made.append(name)
    return made
