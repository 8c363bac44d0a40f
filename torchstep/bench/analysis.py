"""Analysis of a results database: best lr per (task, arm), per-seed summaries, verdicts, time to target.

:func:`analyse` is the one pass over ``results.sqlite``; :mod:`.figures` and :mod:`.report` only read
its result, so ``torchstep bench`` analyses once and ``torchstep report DIR`` writes the same files.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .stats import best_lr, summarise, time_to_target, verdict
from .store import curves, trials


def status_from_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Best tuning lr per (task, arm) from the seed-0 grid, and whether it sits on the grid's edge."""
    grid = defaultdict(dict)
    for r in rows:
        if r["seed"] == 0:
            grid[(r["task"], r["arm"])][r["lr"]] = r
    out = {}
    for key, points in grid.items():
        best = best_lr(points)
        out[key] = {"best": best,   # a one-point grid is a fixed lr: no edge
                    "edge": len(points) > 1 and best is not None and best in (min(points), max(points))}
    return out


def analyse(db: str | Path) -> dict[str, Any]:
    """Everything the report needs from ``db``, in one pass.

    Keys: ``rows`` (every trial), ``summary`` (task → arm → entry, see :func:`.stats.summarise`, plus
    ``steps_to_target`` / ``cpu_to_target``), ``verdicts`` (task → :func:`.stats.verdict`), ``targets``
    (task → tuned AdamW's median final val), ``ttt`` (task → arm → steps to that target) and ``curves``
    (trial id → validation curve).
    """
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
