"""The sweep: learning-rate search per arm, edge extension, paired final seeds — resumable.

Protocol per (task, arm):

1. tuning: the arm's log grid (4 half-decade points around its default) with seed 0;
2. if the best non-diverged point is on an edge, add two points beyond it (at most twice) — every arm
   gets the same number of initial trials and the same extension rule;
3. final: seeds 1…S−1 at the best lr (seed 0 is reused: the same trial), so each arm has S paired runs
   (same initialisation and data order per seed across arms).

The plan is a pure function of the results already in the database, so re-running the same command
recomputes it, skips finished trials and continues.  Trials run in a pool of worker processes with one
torch thread each (one pool per sweep; the plan is re-read as trials finish); each worker commits
its own trial to SQLite.
"""
from __future__ import annotations

import os
import signal
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Callable

from .arms import ARMS, FINETUNE_ARMS, MEMORY_ARMS, RL_ARMS, applicable, extend, lr_grid
from .runner import resolve, run_trial
from .stats import best_lr
from .store import connect, trial_id, trials
from .tasks import TASKS

MAX_EXTENSIONS = 2
MAX_WORKER_DEATHS = 3


@dataclass(frozen=True)
class Suite:
    tasks: tuple[str, ...]
    arms: tuple[str, ...]
    seeds: int = 3
    steps: dict[str, int] | None = None    # task → budget override
    grid_points: int = 4
    options: dict[str, dict] | None = None  # task → option overrides (e.g. gpt-bytes width / norm)
    schedule: str = "cosine"                # the harness' lr schedule for every arm (bench/arms.py: SCHEDULES)
    monitor: dict | None = None             # {"name": "sharpness", "every": k} (runner.MONITORS), or None

    def budget(self, task: str) -> int:
        return (self.steps or {}).get(task, TASKS[task].steps)


def plan(suite: Suite, done: dict[str, dict]) -> tuple[list[dict], dict[tuple[str, str], dict]]:
    """Trials still needed given finished ones (``trial_id → row``), and per-(task, arm) search status."""
    pending, status = [], {}
    for task in suite.tasks:
        steps = suite.budget(task)
        for arm in suite.arms:
            if not applicable(ARMS[arm], TASKS[task]):
                continue
            grid, extensions = lr_grid(ARMS[arm].default_lr, suite.grid_points), 0
            while True:
                opts = (suite.options or {}).get(task, {})
                configs = {lr: resolve(task, arm, lr, 0, steps, "tune", opts, schedule=suite.schedule,
                                       monitor=suite.monitor) for lr in grid}
                missing = [c for c in configs.values() if trial_id(c) not in done]
                if missing:
                    pending += missing
                    status[(task, arm)] = {"grid": grid, "best": None, "edge": False}
                    break
                best = best_lr({lr: done[trial_id(c)] for lr, c in configs.items()})
                # a one-point grid is a fixed lr (the ``rl`` suite: the card's lr), never extended
                on_edge = len(grid) > 1 and best is not None and best in (grid[0], grid[-1])
                if on_edge and extensions < MAX_EXTENSIONS:
                    grid, extensions = extend(grid, best, ARMS[arm].default_lr), extensions + 1
                    continue
                status[(task, arm)] = {"grid": grid, "best": best, "edge": on_edge}
                if best is not None:
                    finals = [resolve(task, arm, best, s, steps, "final", opts, schedule=suite.schedule,
                                      monitor=suite.monitor)
                              for s in range(1, suite.seeds)]
                    pending += [c for c in finals if trial_id(c) not in done]
                break
    return pending, status


def _worker_init() -> None:
    # one torch thread per trial is set by run_trial itself (torch.set_num_threads(1))
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the main process decides; finished trials are committed


def _run(config: dict, db: str) -> str:
    run_trial(config, db)
    return trial_id(config)


def _name(c: dict) -> str:
    return f"{c['task']}/{c['arm']}@{c['lr']:g}#{c['seed']}"


def run_local(next_pending: Callable[[], list[dict]], db: str, workers: int,
              on_done: Callable[[str, list[str]], None]) -> None:
    """Run trials in one pool until ``next_pending()`` has nothing new and nothing is in flight.

    The plan is re-read after every finished trial, so a finished grid starts its extension or its final
    seeds at once, in the same workers (one spawn per sweep instead of one per stage)."""
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        futures: dict = {}
        try:
            while True:
                flying = {trial_id(c) for c, _ in futures.values()}
                for c in next_pending():
                    if trial_id(c) not in flying:             # also a config two suites both plan
                        flying.add(trial_id(c))
                        futures[pool.submit(_run, c, db)] = (c, _name(c))
                if not futures:
                    return
                finished, _ = wait(futures, return_when=FIRST_COMPLETED)
                for f in finished:
                    _, name = futures.pop(f)
                    f.result()
                    on_done(name, [n for _, n in futures.values()][:workers])
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def run_ray(configs: list[dict], db: str, address: str | None, on_done: Callable[[str, list[str]], None]) -> None:
    import ray
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    remote = ray.remote(num_cpus=1)(_run)
    refs = {remote.remote(c, db): _name(c) for c in configs}
    while refs:
        ready, _ = ray.wait(list(refs), num_returns=1)
        for ref in ready:
            name = refs.pop(ref)
            ray.get(ref)
            on_done(name, list(refs.values())[:4])


def sweep(suite: Suite | list[Suite], out: str | Path, workers: int | None = None, backend: str = "local",
          address: str | None = None, progress: bool = True) -> Path:
    """Run (or resume) the suite — or several into one database, in one pool; returns the database path."""
    suites = [suite] if isinstance(suite, Suite) else list(suite)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    db = out / "results.sqlite"
    connect(db).close()
    workers = workers or os.cpu_count() or 1
    bar = current = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(desc="sweep", unit="trial", file=sys.stderr, position=0)
        current = tqdm(bar_format="{desc}", file=sys.stderr, position=1)

    def on_done(name: str, running: list[str]) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"last {name}")
            current.set_description_str("running: " + ", ".join(running))

    def next_pending() -> list[dict]:
        done = {row["trial_id"]: row for row in trials(db)}
        pending = [c for s in suites for c in plan(s, done)[0]]
        if bar is not None:
            bar.total = len(done) + len(pending)
            bar.n = len(done)
            bar.refresh()
        return pending

    deaths = 0
    try:
        while True:
            if backend == "ray":
                pending = next_pending()
                if not pending:
                    break
                run_ray(pending, str(db), address, on_done)
                continue
            try:
                run_local(next_pending, str(db), workers, on_done)
                break
            except BrokenProcessPool:   # a worker was killed: its trial never committed, so re-plan
                deaths += 1
                print(f"torchstep: a worker process died ({deaths}/{MAX_WORKER_DEATHS}); resuming",
                      file=sys.stderr)
                if deaths >= MAX_WORKER_DEATHS:
                    raise
    finally:
        if bar is not None:
            current.close()
            bar.close()
    return db


ALL_ARMS = tuple(ARMS)
DEFAULT_ARMS = tuple(a for a in ARMS if a not in MEMORY_ARMS and ARMS[a].kind == "supervised")
RL_ARM_NAMES = tuple(a.name for a in RL_ARMS)
FINETUNE_ARM_NAMES = tuple(a.name for a in FINETUNE_ARMS)
SUITES: dict[str, Suite] = {
    # CI-sized: two known-optimum tasks, short budgets, three arms
    "smoke": Suite(("quadratic", "logreg"), ("adamw", "sgd", "lion"), seeds=3,
                   steps={"quadratic": 150, "logreg": 150}),
    # `torchstep bench`: every arm but the memory comparison's on the six cheap tasks
    "default": Suite(("quadratic", "logreg", "rosenbrock", "matrix-sensing", "digits-mlp", "mnist1d"), DEFAULT_ARMS,
                     seeds=3, steps={"mnist1d": 1000}),
    # `torchstep bench --suite rl`: every objective preset on rl-arith at the card's protocol (AdamW lr 3e-4
    # constant, 500 steps, 3 paired seeds; no lr search)
    "rl": Suite(("rl-arith",), RL_ARM_NAMES, seeds=3, grid_points=1, schedule="none"),
    # `torchstep bench --suite finetune`: every fine-tuning method on finetune-bytes, lr searched, 3 paired seeds
    "finetune": Suite(("finetune-bytes",), FINETUNE_ARM_NAMES, seeds=3),
    # every task × every applicable arm (rl-arith: the objective arms, with the lr search)
    "full": Suite(tuple(TASKS), ALL_ARMS, seeds=5),
}
