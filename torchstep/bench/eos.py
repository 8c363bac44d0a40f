"""The edge-of-stability picture of a monitored sweep (``torchstep bench --monitor sharpness``).

Per task, for each arm at its best lr (mean over the paired seeds): the sharpness λ_max(H) of the probe batch
and the ratio to the arm's stability threshold — ``λ_max(D^½ H D^½)`` with ``D = η_g/c_g`` per tensor (GD:
c = 2, heavy ball: 2 + 2β, Nesterov, Adam-type: the preconditioned sharpness against (2 + 2β1)/(η(1 − β1)) =
38/η at β1 = 0.9; :mod:`torchstep.diagnostics.stability`).  Tensors on the shared AdamW fallback count with
η = 0, so the ratio is the arm's own rule's.  Ratio 1 is the edge: a quadratic model of the loss predicts
divergence above it; Cohen et al. find full-batch training hovering just at it.  Rules without a known
threshold (Lion, Muon, …) are measured against GD's 2/η and labelled so.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .store import curves

KEYS = ("sharpness", "ratio")


def threshold_rule(arm: str) -> str:
    """The stability rule the monitor applies to ``arm`` (detected after one step on a dummy tensor, so
    Adam-type state exists); ``gd*`` where no threshold is known and GD's 2/η stands in."""
    import torch

    from ..diagnostics.stability import detect_rule
    from .arms import ARMS
    p = torch.zeros(4, 4, requires_grad=True)
    opt = ARMS[arm].make([{"params": [p]}], 1e-3)
    p.grad = torch.ones_like(p)          # our own dummy tensor: a step to create the state
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rule = detect_rule(opt)
    return f"{rule}*" if caught else rule


def series(db: str | Path, analysis: dict[str, Any]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """task → arm → {"step", "sharpness", "ratio"} (means over the best lr's seeds); only monitored trials."""
    per_key = {k: curves(db, f"monitor/{k}") for k in KEYS}
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for task, per_arm in analysis["summary"].items():
        for arm, e in per_arm.items():
            tids = [t for t in e.get("trial_ids", {}).values() if t in per_key["sharpness"]]
            if not tids:
                continue
            n = min(len(per_key["sharpness"][t]) for t in tids)
            entry = {"step": np.array([p[0] for p in per_key["sharpness"][tids[0]][:n]])}
            for k in KEYS:
                values = [[np.nan if p[1] is None else p[1] for p in per_key[k][t][:n]] for t in tids]  # NaN: NULL
                with np.errstate(all="ignore"), warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)    # all-NaN columns (Adam before a step)
                    entry[k] = np.nanmean(np.array(values, dtype=float), axis=0)
            out.setdefault(task, {})[arm] = entry
    return out


def write_figures(db: str | Path, analysis: dict[str, Any], fig_dir: str | Path) -> list[str]:
    """``eos-TASK.png`` per monitored task; returns the file names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .figures import colour
    made = []
    for task, per_arm in series(db, analysis).items():
        fig, (ax_r, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
        for arm, e in per_arm.items():
            ax_r.plot(e["step"], e["ratio"], color=colour(arm), label=arm)
            ax_s.plot(e["step"], e["sharpness"], color=colour(arm), label=arm)
        ax_r.axhline(1.0, color="black", ls="--", lw=1, label="stability edge")
        ax_r.set(xlabel="step", ylabel="sharpness / threshold (ratio)", yscale="log",
                 title=f"{task}: edge of stability")
        ax_s.set(xlabel="step", ylabel="λ_max(H), probe batch", yscale="log", title="sharpness")
        ax_r.legend(fontsize=7)
        fig.tight_layout()
        name = f"eos-{task}.png"
        fig.savefig(Path(fig_dir) / name, dpi=100)
        plt.close(fig)
        made.append(name)
    return made


def grid_table(db: str | Path) -> list[str]:
    """Markdown lines: every monitored seed-0 trial (the whole lr grid), its max ratio and λ_max(H) and whether
    it diverged — where along the grid each rule meets its edge."""
    from .store import trials
    ratio, sharp = curves(db, "monitor/ratio"), curves(db, "monitor/sharpness")
    rows = [r for r in trials(db) if r["seed"] == 0 and r["trial_id"] in sharp]
    if not rows:
        return []
    lines = ["| task | arm | lr | max ratio | last ratio | max λ_max(H) | final val | diverged |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["arm"], r["lr"])):
        rs = [p[1] for p in ratio.get(r["trial_id"], []) if p[1] is not None]
        ss = [p[1] for p in sharp[r["trial_id"]] if p[1] is not None]
        lines.append(f"| {r['task']} | {r['arm']} | {r['lr']:g} | {max(rs) if rs else float('nan'):.3g} | "
                     f"{rs[-1] if rs else float('nan'):.3g} | {max(ss) if ss else float('nan'):.4g} | "
                     f"{r['final_val']:.4g} | {'yes' if r['diverged'] else ''} |")
    return lines


def table(db: str | Path, analysis: dict[str, Any]) -> list[str]:
    """Markdown lines: per task and arm, the ratio's max and its mean over the second half of training."""
    lines = []
    for task, per_arm in series(db, analysis).items():
        lines += [f"### {task}", "", "| arm | threshold rule | best lr | max ratio | mean ratio, 2nd half | "
                  "max λ_max(H) |", "|---|---|---|---|---|---|"]
        for arm, e in per_arm.items():
            half = e["ratio"][len(e["ratio"]) // 2:]
            lines.append(f"| {arm} | {threshold_rule(arm)} | {analysis['summary'][task][arm]['lr']:g} | "
                         f"{np.nanmax(e['ratio']):.3g} | "
                         f"{np.nanmean(half):.3g} | {np.nanmax(e['sharpness']):.4g} |")
        lines += ["", "(* no threshold known for the rule: GD's 2/η stands in)", "",
                  f"![eos {task}](figures/eos-{task}.png)", ""]
    return lines


__all__ = ["series", "write_figures", "table", "grid_table", "threshold_rule"]
