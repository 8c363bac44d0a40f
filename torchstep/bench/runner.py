"""Run one trial: train an arm on a task for its budget and record everything the report needs."""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
import warnings
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..diagnostics.stability import SharpnessMonitor
from ..schedules.refined import GradNormRecorder, refined_schedule
from .arms import ARMS, SCHEDULES, SGD_TYPE, ArmOptimizer, applicable, schedule_for
from .store import trial_id, write_trial
from .tasks import PROBED, TASKS

PROTOCOL = "torchstep-bench/1"
DIVERGENCE_FACTOR = 10.0   # val above 10× its initial value (or non-finite) ⇒ diverged


def resolve(task: str, arm: str, lr: float, seed: int, steps: int, phase: str, options: dict | None = None,
            evals: int = 20, schedule: str = "cosine", monitor: dict | None = None) -> dict[str, Any]:
    """The full configuration a trial is hashed from (``monitor``: ``{"name": …, "every": k}`` or None; only
    present when set, so unmonitored trials keep their ids)."""
    t, a = TASKS[task], ARMS[arm]
    if not applicable(a, t):
        raise ValueError(f"arm {arm!r} does not apply to task {task!r} (objective arms run on RL tasks, adapter arms "
                         "on fine-tuning tasks, optimizer arms on the rest; matrix-only rules need 2-D weights)")
    valid = t.valid_options
    unknown = set(options or {}) - set(valid)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for task {task}; valid: {', '.join(valid) or 'none'}")
    chosen = {k: v for k, v in (options or {}).items() if not (k in t.extra_options and v == t.extra_options[k])}
    return {"protocol": PROTOCOL, "task": task, "task_options": {**t.options, **chosen}, "arm": arm,
            "arm_kwargs": a.kwargs,
            "lr": lr, "seed": seed, "steps": steps, "phase": phase, "evals": evals,
            "schedule": SCHEDULES[schedule_for(arm, schedule)][0], "weight_decay": 0.0,
            **({"objective": a.objective} if a.objective else {}),
            **({"adapter": a.adapter} if a.adapter else {}),
            **({"monitor": _check_monitor(monitor, t)} if monitor else {})}


#: harness monitors (``torchstep bench --monitor``): name → factory(every) and the record keys kept as metrics
MONITORS = {"sharpness": (lambda every: SharpnessMonitor(every, preconditioned=True, trace_samples=0),
                          ("sharpness", "ratio", "threshold", "precond_sharpness", "lr", "converged"))}


def _check_monitor(monitor: dict, task) -> dict:
    if monitor.get("name") not in MONITORS or not isinstance(monitor.get("every"), int) or monitor["every"] < 1:
        raise ValueError(f"invalid monitor {monitor!r}; valid: name one of {', '.join(MONITORS)}, every >= 1")
    return {"name": monitor["name"], "every": monitor["every"]}


@lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(__file__), timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"torchstep": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "cpu": cpu, "nproc": os.cpu_count(), "revision": rev}


def _train(problem, opt: ArmOptimizer, steps: int, evals: int, recorder: GradNormRecorder | None = None,
           monitor: dict | None = None) -> dict:
    """The training loop: evaluations at ``evals`` evenly spaced steps, divergence check; optional norm record;
    an optional monitor measured on the problem's probe batch before every k-th step (k, 2k, …), its records stored as
    ``monitor/<key>`` metrics and its CPU time left out of the trial's timings."""
    init_val = problem.evaluate()["val"]
    eval_at = set(np.linspace(0, steps, evals + 1).round().astype(int).tolist()[1:])
    curve = [(0, "val", init_val, 0.0, 0.0)]
    cpu0, wall0, opt_cpu, diverged = time.process_time(), time.perf_counter(), 0.0, False
    watch = keys = None
    if monitor is not None:
        if problem.probe is None:
            raise ValueError(f"this task has no probe batch; monitors run on {', '.join(PROBED)}")
        factory, keys = MONITORS[monitor["name"]]
        watch = factory(monitor["every"])
    for step in range(steps):
        if watch is not None and step and step % watch.every == 0:   # from step k: Adam-type state exists
            t0, w0 = time.process_time(), time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)   # "no threshold known": recorded as such
                rec = watch(step, model=problem.model, optimizer=opt.rule, loss_fn=problem.loss_fn,
                            batch=problem.probe)
            curve += [(step, f"monitor/{k}", rec[k], 0.0, 0.0) for k in keys]
            cpu0 += time.process_time() - t0
            wall0 += time.perf_counter() - w0
        loss = problem.train_loss(step)
        opt.zero_grad()
        (problem.backward or torch.Tensor.backward)(loss)
        if recorder is not None:
            recorder.record()
        t0 = time.process_time()
        opt.step()
        opt_cpu += time.process_time() - t0
        opt.after_step(step)
        if (step + 1) in eval_at or not math.isfinite(loss.item()):
            metrics = problem.evaluate()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            curve += [(step + 1, name, value, cpu, wall) for name, value in metrics.items()]
            curve.append((step + 1, "train_loss", loss.item(), cpu, wall))
            if not math.isfinite(metrics["val"]) or metrics["val"] > DIVERGENCE_FACTOR * max(abs(init_val), 1e-12):
                diverged = True
                break
    final = problem.evaluate() if not diverged else {"val": float("nan")}
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    return {"init_val": init_val, "final": final, "diverged": diverged, "curve": curve, "opt_cpu": opt_cpu,
            "cpu_s": cpu, "wall_s": wall, "state_bytes": opt.state_bytes()}


def _problem(config: dict, task, arm):
    """The trial's problem from its seed and options, configured with the arm's objective / adapter spec."""
    torch.manual_seed(config["seed"])
    problem = task.problem(config["seed"], **config["task_options"])
    if arm.spec is not None:
        problem.configure(arm.spec)
    return problem


def _refined_pass(config: dict, task, arm) -> dict:
    """``--schedule refined``, pass 1: a linear-decay run at the same lr, seed and data that records the gradient
    norm of every step (ℓ1 — the paper's choice for Adam-type rules — or ℓ2 for SGD-type arms).  Returns its
    ``_train`` result plus ``curve_fn``, pass 2's schedule (the refined one), or None if pass 1 diverged."""
    problem = _problem(config, task, arm)
    norm = "l2" if arm.name in SGD_TYPE else "l1"
    recorder = GradNormRecorder(problem.model, norm=norm)
    first = _train(problem, ArmOptimizer(arm, problem, config["lr"], config["steps"], schedule="linear"),
                   config["steps"], config["evals"], recorder)
    norms = recorder.norms()
    ok = not first["diverged"] and len(norms) >= 2 and all(math.isfinite(g) and g > 0 for g in norms)
    multipliers = refined_schedule(norms, config["steps"], norm=norm) if ok else None
    return {**first, "curve_fn": (lambda step, total, warmup: multipliers[min(step, len(multipliers) - 1)]) if ok else None}


def run_trial(config: dict[str, Any], db_path: str | None = None) -> dict[str, Any]:
    """Train, evaluate at ``evals`` evenly spaced points, write to ``db_path`` (if given), return the row."""
    torch.set_num_threads(1)
    task, arm = TASKS[config["task"]], ARMS[config["arm"]]
    if task.kind == "finetune" and db_path is not None:
        from .finetune import set_cache_dir
        set_cache_dir(os.path.dirname(os.path.abspath(db_path)))   # the pretrained base lives with the results
    steps = config["steps"]
    name = next(k for k, (description, _) in SCHEDULES.items() if description == config["schedule"])
    first = _refined_pass(config, task, arm) if name == "refined" else None
    problem = _problem(config, task, arm)
    if first is not None and first["curve_fn"] is None:        # pass 1 diverged: nothing to refine
        result = {**first, "curve": [(0, "val", first["init_val"], 0.0, 0.0)], "cpu_s": 0.0, "wall_s": 0.0,
                  "opt_cpu": 0.0}                                   # pass 1's time is added below, once
    else:
        opt = ArmOptimizer(arm, problem, config["lr"], steps, schedule="linear" if first else name,
                           curve=first and first["curve_fn"])
        result = _train(problem, opt, steps, config["evals"], monitor=config.get("monitor"))
    init_val, final, diverged, curve = result["init_val"], result["final"], result["diverged"], result["curve"]
    spent = {k: result[k] + (first[k] if first else 0.0) for k in ("cpu_s", "wall_s", "opt_cpu")}  # both passes
    row = {
        "trial_id": trial_id(config), "task": config["task"], "arm": config["arm"], "lr": config["lr"],
        "seed": config["seed"], "steps": steps, "phase": config["phase"], "config": json.dumps(config, sort_keys=True),
        "env": json.dumps({**environment(), "threads": torch.get_num_threads(), "load": os.getloadavg()}),
        "init_val": init_val, "final_val": init_val if diverged else final["val"], "diverged": int(diverged),
        "cpu_s": spent["cpu_s"], "wall_s": spent["wall_s"], "opt_cpu_s": spent["opt_cpu"],
        "state_bytes": result["state_bytes"], "final_metrics": json.dumps(final), "finished": time.time(),
    }
    if db_path is not None:
        write_trial(db_path, row, [(s, n, v, c, w) for s, n, v, c, w in curve])
    return row
