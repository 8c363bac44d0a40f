"""Statistics for the sweep and the report: best lr, paired seeds, confidence intervals, tests,
time-to-target, profiles.

SciPy is imported where a test needs it, so the sweep's worker processes (which import :func:`best_lr`
through ``sweep``) do not pay for it."""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import numpy as np

ALPHA = 0.05
R_MAX = 4.0


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval (0 for a single value)."""
    from scipy import stats as sps
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return float(x.mean()), 0.0
    return float(x.mean()), float(sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def paired_p(a: dict[int, float], b: dict[int, float]) -> float:
    """Two-sided paired t-test over the seeds both arms have (NaN if fewer than 2 pairs)."""
    from scipy import stats as sps
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return float("nan")
    x, y = np.array([a[s] for s in seeds]), np.array([b[s] for s in seeds])
    if np.allclose(x - y, 0):
        return 1.0
    return float(sps.ttest_rel(x, y).pvalue)


def best_lr(results: dict[float, dict[str, Any]]) -> float | None:
    """The lr whose non-diverged run has the lowest ``final_val`` (``lr → row``); None if every run diverged."""
    ok = {lr: r for lr, r in results.items() if not r["diverged"]}
    return min(ok, key=lambda lr: ok[lr]["final_val"]) if ok else None


def summarise(rows: list[dict[str, Any]], status: dict) -> dict[str, dict[str, dict[str, Any]]]:
    """task → arm → {lr, finals{seed: val}, mean, ci, diverged, edge, state_bytes, opt_ms, cpu_s}."""
    out: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    by = defaultdict(list)
    for r in rows:
        by[(r["task"], r["arm"])].append(r)
    for (task, arm), rs in by.items():
        best = status.get((task, arm), {}).get("best")
        finals = {r["seed"]: r for r in rs if r["lr"] == best}
        entry = {"lr": best, "edge": status.get((task, arm), {}).get("edge", False),
                 "grid": sorted({r["lr"]: r["final_val"] for r in rs if r["seed"] == 0}.items()),
                 "grid_diverged": sorted(r["lr"] for r in rs if r["seed"] == 0 and r["diverged"]),
                 "finals": {s: r["final_val"] for s, r in finals.items()},
                 "trial_ids": {s: r["trial_id"] for s, r in finals.items()},
                 "diverged": any(r["diverged"] for r in finals.values())}
        if finals:
            entry["mean"], entry["ci"] = mean_ci(list(entry["finals"].values()))
            f = list(finals.values())
            entry["state_bytes"] = int(np.mean([r["state_bytes"] for r in f]))
            entry["opt_ms"] = 1e3 * float(np.mean([r["opt_cpu_s"] / r["steps"] for r in f]))
            entry["step_ms"] = 1e3 * float(np.mean([r["cpu_s"] / r["steps"] for r in f]))
        out[task][arm] = entry
    return out


def verdict(task_summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Leaders = the best arm by mean plus every arm a paired t-test cannot separate from it (p ≥ α).

    A winner is named only when the leaders are significantly ahead of every other arm; if the test cannot
    separate the best arm from all others, the verdict is "no significant difference".
    """
    ranked = sorted((a for a, e in task_summary.items() if "mean" in e and not e["diverged"]),
                    key=lambda a: task_summary[a]["mean"])
    if not ranked:
        return {"winner": None, "text": "no arm finished"}
    best = ranked[0]
    p_values = {a: paired_p(task_summary[best]["finals"], task_summary[a]["finals"]) for a in ranked[1:]}
    leaders = [best] + [a for a in ranked[1:] if not p_values[a] < ALPHA]
    res = {"winner": best, "runner_up": ranked[1] if len(ranked) > 1 else None, "leaders": leaders,
           "p": p_values.get(ranked[1], float("nan")) if len(ranked) > 1 else float("nan")}
    if len(ranked) == 1:
        res.update(significant=False, text=f"{best} (only arm)")
    elif len(leaders) == len(ranked):
        res.update(significant=False, text=f"no significant difference ({best} ≈ {ranked[1]})")
    else:
        trailing = len(ranked) - len(leaders)
        others = leaders[1:4] + ([f"{len(leaders) - 4} more"] if len(leaders) > 4 else [])
        tie = f" (tied with {', '.join(others)})" if len(leaders) > 1 else ""
        res.update(significant=True, text=f"{best}{tie}: ahead of the other {trailing} arm(s), paired p < {ALPHA}")
    if "adamw" in task_summary and best != "adamw":
        res["p_vs_adamw"] = p_values.get("adamw", float("nan"))
    return res


def time_to_target(curve: list[tuple[int, float, float]], target: float) -> tuple[float, float]:
    """(steps, CPU-s) of the first evaluation at or below ``target``; (inf, inf) if never reached."""
    for step, value, cpu in curve:
        if value <= target:
            return float(step), float(cpu)
    return math.inf, math.inf


def performance_profile(steps_to_target: dict[str, dict[str, float]], taus: np.ndarray) -> dict[str, np.ndarray]:
    """AlgoPerf-style: ρ_arm(τ) = share of tasks where arm's steps ≤ τ × the best arm's (r_max = 4)."""
    arms = sorted({a for per_task in steps_to_target.values() for a in per_task})
    ratios = defaultdict(list)
    for per_task in steps_to_target.values():
        best = min(per_task.values())
        for arm in arms:
            value = per_task.get(arm, math.inf)
            ratios[arm].append(value / best if math.isfinite(best) and best > 0 else math.inf)
    n = max(1, len(steps_to_target))
    return {arm: np.array([sum(r <= t for r in ratios[arm]) / n for t in taus]) for arm in arms}


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Arms not dominated in (state bytes, final val), both lower-is-better: no other arm has at most the
    bytes and at most the loss with one of them strictly lower.  Sorted by bytes."""
    front = [a for a, (b, v) in points.items()
             if not any((b2 <= b and v2 <= v) and (b2 < b or v2 < v) for a2, (b2, v2) in points.items() if a2 != a)]
    return sorted(front, key=lambda a: points[a])

