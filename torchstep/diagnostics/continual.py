"""Continual-evaluation metrics: min-ACC, WC-ACC, windowed forgetting WF^w and plasticity WP^w.

De Lange, van de Ven, Tuytelaars, "Continual evaluation for lifelong learning: Identifying the stability gap"
(ICLR 2023, arXiv 2205.13452); official code Mattdl/ContinualEvaluation (commit 7ffa368,
``src/eval/continual_eval_metrics.py``), read, not run.  The semantics below are the official code's.

Input, for every function: an accuracy trace ``acc`` of shape ``(N, K)`` — row n is the evaluation after
training iteration n (``A(E_i, f_n)``), column i is task i; NaN where a task was not evaluated — and
``task_of`` (length N): the task being trained at row n.  Each task is trained in one contiguous run of rows;
a task is *seen* at row n once its run has started, and unseen tasks are never evaluated or averaged (values
in their columns before that are ignored, as the official ``skip_unseen_tasks=True``).  ``t`` is the row the
metric is reported at (default −1: the last).

* min-ACC at t: the mean over previous tasks i (run ended before t) of ``min_{end_i < n ≤ t} A(E_i, f_n)``;
* WC-ACC at t = ``(1/k)·A(E_cur, f_t) + (1 − 1/k)·min-ACC`` with k seen tasks (the plain mean of the current
  task's accuracy and the previous tasks' minima, as the code; = ``A(E_1, f_t)`` for k = 1);
* WF^w of task i: the largest drop ``A_m − A_n`` over pairs m < n of its evaluations at most w − 1
  evaluations apart, up to t, floored at 0 (the code's running max, from 0, over a sliding window of the task's
  last w evaluations); WP^w: the largest rise ``A_n − A_m``.  Averaged unweighted over tasks.

Cost: O(N·K·w), negligible next to the evaluations themselves (k·≤1,000 samples every iteration in the paper).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from ..optim._base import check_choice

SCOPES = ("all", "previous")


def _setup(acc, task_of: Sequence[int], t: int):
    A = torch.as_tensor(acc, dtype=torch.float64)
    if A.dim() != 2:
        raise ValueError(f"Invalid acc: shape {tuple(A.shape)} (valid range: (N evaluations, K tasks))")
    N, K = A.shape
    tasks = [int(x) for x in task_of]
    if len(tasks) != N:
        raise ValueError(f"Invalid task_of: length {len(tasks)} (valid range: one task per row, {N})")
    if not -N <= t < N:
        raise ValueError(f"Invalid t: {t} (valid range: [-{N}, {N}))")
    t = t % N
    start: dict[int, int] = {}
    end: dict[int, int] = {}
    for n, k in enumerate(tasks):
        if not 0 <= k < K:
            raise ValueError(f"Invalid task_of[{n}]: {k} (valid range: [0, {K}))")
        if k in end and end[k] != n - 1:
            raise ValueError(f"Invalid task_of: task {k} is trained in more than one run of rows")
        start.setdefault(k, n)
        end[k] = n
    return A, tasks, t, start, end


def _mean(values) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


def min_acc_per_task(acc, task_of: Sequence[int], t: int = -1) -> dict[int, float]:
    """``{task: min_{end_i < n ≤ t} A(E_i, f_n)}`` for every task whose run ended before row t.

    Arguments as the module docstring.  A task with no evaluation in that range is left out.
    """
    A, tasks, t, start, end = _setup(acc, task_of, t)
    out = {}
    for i in sorted(end, key=start.get):
        if end[i] < t:
            col = A[end[i] + 1:t + 1, i]
            col = col[~torch.isnan(col)]
            if col.numel():
                out[i] = float(col.min())
    return out


def min_acc(acc, task_of: Sequence[int], t: int = -1) -> float:
    """min-ACC at row t: the mean of :func:`min_acc_per_task` (arXiv 2205.13452); NaN while no task has ended.

    Non-increasing in t for a fixed set of previous tasks; evaluating less often can only raise it.
    """
    return _mean(min_acc_per_task(acc, task_of, t).values())


def wc_acc(acc, task_of: Sequence[int], t: int = -1) -> float:
    """Worst-case accuracy at row t: ``(1/k)·A(E_cur, f_t) + (1 − 1/k)·min-ACC`` (arXiv 2205.13452).

    Computed as the official code does, the plain mean of the current task's accuracy and the previous tasks'
    minima (identical when every previous task has a minimum).  ≤ :func:`average_accuracy` at t.
    """
    A, tasks, t, _, _ = _setup(acc, task_of, t)
    return _mean([float(A[t, tasks[t]]), *min_acc_per_task(acc, task_of, t).values()])


def average_accuracy(acc, task_of: Sequence[int], t: int = -1) -> float:
    """Mean accuracy over the tasks seen at row t (the standard ACC when t is a task's last iteration)."""
    A, tasks, t, start, _ = _setup(acc, task_of, t)
    return _mean(float(A[t, i]) for i in start if start[i] <= t)


def _windowed(acc, task_of, w: int, t: int, scope: str, sign: float) -> dict[int, float]:
    if not isinstance(w, int) or w < 1:
        raise ValueError(f"Invalid w: {w!r} (valid range: an int >= 1)")
    check_choice("scope", scope, SCOPES)
    A, tasks, t, start, end = _setup(acc, task_of, t)
    out = {}
    for i in sorted(start, key=start.get):
        if start[i] > t or (scope == "previous" and end[i] >= t):
            continue
        col = A[start[i]:t + 1, i]
        a = col[~torch.isnan(col)] * sign
        best = 0.0
        for lag in range(1, min(w, a.numel())):
            best = max(best, float((a[:-lag] - a[lag:]).max()))
        out[i] = best
    return out


def windowed_forgetting_per_task(acc, task_of: Sequence[int], w: int, t: int = -1,
                                 scope: str = "all") -> dict[int, float]:
    """``{task: WF^w}``: the largest accuracy drop within w consecutive evaluations of the task, up to row t.

    ``WF^w_i = max(0, max_{m < n, n − m < w} A(E_i, f_m) − A(E_i, f_n))`` over the task's evaluations (rows
    with a value, from its first training row) — the official code's sliding window and running max from 0.

    Args:
        acc, task_of, t: as the module docstring.
        w: window length in evaluations (the paper uses 10 and 100); w = 1 gives 0.
        scope: ``"all"`` (default, the official code: every seen task, including the one being trained) or
            ``"previous"`` (only tasks whose run ended before t; the paper's aggregation is unverified).
    """
    return _windowed(acc, task_of, w, t, scope, 1.0)


def windowed_plasticity_per_task(acc, task_of: Sequence[int], w: int, t: int = -1,
                                 scope: str = "all") -> dict[int, float]:
    """``{task: WP^w}``: the largest accuracy *rise* within w consecutive evaluations; otherwise as WF^w."""
    return _windowed(acc, task_of, w, t, scope, -1.0)


def windowed_forgetting(acc, task_of: Sequence[int], w: int, t: int = -1, scope: str = "all") -> float:
    """WF^w (arXiv 2205.13452): the unweighted task mean of :func:`windowed_forgetting_per_task`.

    Per task non-decreasing in t and in w (the mean can drop when a new task, at 0, joins it).
    """
    return _mean(windowed_forgetting_per_task(acc, task_of, w, t, scope).values())


def windowed_plasticity(acc, task_of: Sequence[int], w: int, t: int = -1, scope: str = "all") -> float:
    """WP^w (arXiv 2205.13452): the unweighted task mean of :func:`windowed_plasticity_per_task`."""
    return _mean(windowed_plasticity_per_task(acc, task_of, w, t, scope).values())


__all__ = ["min_acc_per_task", "min_acc", "wc_acc", "average_accuracy", "windowed_forgetting_per_task",
           "windowed_plasticity_per_task", "windowed_forgetting", "windowed_plasticity"]
