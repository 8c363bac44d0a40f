"""Benchmark harness: tasks, protocol, statistics, store, resume after kill, CLI errors."""
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from torchstep.bench import arms, corpus, stats, store, sweep
from torchstep.bench.gpt import GPT, GPTConfig
from torchstep.bench.runner import resolve, run_trial
from torchstep.bench.tasks import TASKS
from torchstep.optim import AdamW

pytest.importorskip("scipy")


def test_corpus_snapshot_hash_split_and_licence():
    train, val = corpus.load()
    assert len(train) + len(val) == 4_698_388 and (len(train), len(val)) == (4_284_864, 413_524)
    from importlib import resources
    notice = (resources.files("torchstep.bench") / "data" / corpus.LICENSE).read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" in notice


@pytest.mark.parametrize("norm", ["pre", "post", "peri", "mix"])
def test_gpt_norm_placements_qk_norm_and_z_loss(norm):
    cfg = GPTConfig(width=32, depth=4, heads=4, context=16, norm=norm, qk_norm=True, z_loss=1e-4)
    model = GPT(cfg)
    x = torch.randint(0, 256, (2, 16))
    loss = model.loss(x, x)
    plain = model.loss(x, x, train=False)
    assert torch.isfinite(loss) and loss > plain     # z-loss adds a positive term in training
    assert abs(plain.item() - math.log(256)) < 0.1    # near-uniform at init
    kinds = [b.placement for b in model.blocks]
    assert kinds == {"pre": ["pre"] * 4, "post": ["post"] * 4, "peri": ["peri"] * 4,
                     "mix": ["post", "pre", "pre", "pre"]}[norm]
    with pytest.raises(ValueError, match="norm"):
        GPT(GPTConfig(norm="sandwich"))


def test_known_optima():
    from torchstep.bench.tasks import _least_squares_data, _logreg_data
    p = TASKS["quadratic"].problem(0)
    A, b, _ = _least_squares_data(256, 4096, 1e3)
    with torch.no_grad():
        p.model.x.copy_(torch.linalg.lstsq(A.double(), b.double().unsqueeze(1)).solution.squeeze(1))
    assert abs(p.evaluate()["val"]) < 1e-5                 # gap 0 at the least-squares solution
    with torch.no_grad():
        p.model.x.add_(1e-2)
    assert p.evaluate()["val"] > 1e-6
    X, y, f_star = _logreg_data(100, 10_000)
    w = torch.zeros(100, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.2)
    for _ in range(300):                                   # a full-batch run approaches f* from above
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X.double() @ w, y.double())
        loss.backward()
        opt.step()
    assert -1e-9 < loss.item() - f_star < 2e-2


def test_data_order_is_paired_across_arms_and_seeds_differ():
    a, b = TASKS["digits-mlp"].problem(3), TASKS["digits-mlp"].problem(3)
    assert torch.equal(a.train_loss(7), b.train_loss(7))
    c = TASKS["digits-mlp"].problem(4)
    assert not torch.equal(a.train_loss(7), c.train_loss(7))


def test_trial_records_curve_cost_and_state_bytes(tmp_path):
    db = tmp_path / "r.sqlite"
    row = run_trial(resolve("quadratic", "adamw", 3e-2, 0, 60, "tune"), str(db))
    assert row["final_val"] < row["init_val"] and not row["diverged"]
    assert row["state_bytes"] == 2 * 256 * 4 + 4              # exp_avg, exp_avg_sq (fp32) + step
    assert 0 < row["opt_cpu_s"] < row["cpu_s"]
    assert row["trial_id"] in store.finished_ids(db)
    curve = store.curves(db)[row["trial_id"]]
    assert curve[0][0] == 0 and curve[-1][0] == 60 and len(curve) == 21
    assert not store.write_trial(db, row, [])                 # same trial id: no duplicate


def test_diverged_run_is_recorded_not_raised(tmp_path):
    row = run_trial(resolve("quadratic", "sgd", 1e3, 0, 50, "tune"), str(tmp_path / "r.sqlite"))
    assert row["diverged"] == 1 and row["final_val"] == row["init_val"]


def test_matched_routing_puts_non_matrix_tensors_on_the_same_fallback_for_every_arm():
    p = TASKS["gpt-bytes"].problem(0)
    seen = {}
    for name in ("adamw", "lion", "muon", "torch-muon"):
        opt = arms.ArmOptimizer(arms.ARMS[name], p, 1e-3, 10)
        fallback = opt.optimizers[1]
        # torchstep's AdamW rule: the same code the adamw arm and every hybrid's fallback run
        assert isinstance(fallback, AdamW) and fallback.param_groups[0]["initial_lr"] == arms.FALLBACK_LR
        seen[name] = {id(q) for g in fallback.param_groups for q in g["params"]}
    assert seen["adamw"] == seen["lion"] == seen["muon"] == seen["torch-muon"]
    assert id(p.model.embed.weight) in seen["adamw"] and id(p.model.head.weight) in seen["adamw"]


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_schedule_warms_up_and_ends_at_zero():
    p = TASKS["quadratic"].problem(0)
    opt = arms.ArmOptimizer(arms.ARMS["adamw"], p, 1.0, 100)
    lrs = []
    for step in range(100):
        lrs.append(opt.rule.param_groups[0]["lr"])
        opt.after_step(step)
    assert lrs[0] == pytest.approx(0.2) and max(lrs) == pytest.approx(1.0) and lrs[-1] < 1e-3


def test_grid_and_edge_extension():
    grid = arms.lr_grid(1e-3)
    assert grid == [1e-4, 3.162e-4, 1e-3, 3.162e-3]
    assert arms.extend(grid, 3.162e-3, 1e-3)[-2:] == [1e-2, 3.162e-2]
    assert arms.extend(grid, 1e-4, 1e-3)[:2] == [1e-5, 3.162e-5]
    assert arms.extend(arms.extend(grid, 3.162e-3, 1e-3), 3.162e-2, 1e-3)[-2:] == [0.1, 0.3162]


def test_plan_extends_edges_then_adds_paired_final_seeds():
    suite = sweep.Suite(("quadratic",), ("adamw",), seeds=3, steps={"quadratic": 10})
    pending, _ = sweep.plan(suite, {})
    assert [c["lr"] for c in pending] == arms.lr_grid(arms.ARMS["adamw"].default_lr)
    fake = {}
    for c in pending:  # best at the top edge → two more points, then finals
        fake[store.trial_id(c)] = {"final_val": -c["lr"], "diverged": 0}
    pending, status = sweep.plan(suite, fake)
    assert [c["lr"] for c in pending] == [3e-2, 9.487e-2]
    for c in pending:
        fake[store.trial_id(c)] = {"final_val": 1.0, "diverged": 0}  # worse: best stays interior
    pending, status = sweep.plan(suite, fake)
    assert [(c["seed"], c["lr"], c["phase"]) for c in pending] == [(1, 9.487e-3, "final"), (2, 9.487e-3, "final")]


def test_statistics():
    mean, ci = stats.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and ci == pytest.approx(4.302652729911275 / math.sqrt(3))
    assert stats.paired_p({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.1, 1: 2.11, 2: 3.1}) < 0.01
    assert stats.paired_p({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0}) == 1.0
    assert stats.time_to_target([(0, 5.0, 0.0), (10, 1.0, 0.5), (20, 0.5, 1.0)], 0.9) == (20.0, 1.0)
    taus = np.array([1.0, 2.0, 4.0])
    prof = stats.performance_profile({"t1": {"a": 10, "b": 20}, "t2": {"a": 40, "b": 10}}, taus)
    assert prof["a"].tolist() == [0.5, 0.5, 1.0] and prof["b"].tolist() == [0.5, 1.0, 1.0]
    v = stats.verdict({"a": {"mean": 1.0, "finals": {0: 1.0, 1: 1.1, 2: 0.9}, "diverged": False},
                       "b": {"mean": 1.01, "finals": {0: 1.2, 1: 0.8, 2: 1.03}, "diverged": False}})
    assert v["winner"] == "a" and not v["significant"] and "no significant difference" in v["text"]
    tied = {"a": {"mean": 1.0, "finals": {0: 1.0, 1: 1.1, 2: 0.9}, "diverged": False},
            "a2": {"mean": 1.0, "finals": {0: 1.0, 1: 1.1, 2: 0.9}, "diverged": False},
            "c": {"mean": 2.0, "finals": {0: 2.0, 1: 2.11, 2: 1.9}, "diverged": False}}
    v = stats.verdict(tied)
    assert v["significant"] and v["leaders"] == ["a", "a2"] and "tied with a2" in v["text"]


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torchstep.cli", *args], capture_output=True, text=True, env=env, **kw)


def _cli_error(capsys, *args) -> str:
    """Run the CLI in-process; it must exit with status 2 and one stderr line, which is returned."""
    from torchstep import cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(args))
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1, err
    return err


def test_cli_bad_input_gets_one_line_errors(tmp_path, capsys):
    r = _cli("bench", "--tasks", "nope", "--out", str(tmp_path))    # the real process: status 2, one line
    assert r.returncode == 2 and "unknown task nope; valid: quadratic" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "unknown optimizer adam; valid: adamw, sgd, torch-muon" in _cli_error(
        capsys, "bench", "--optimizers", "adam", "--out", str(tmp_path))
    assert "invalid --seeds 0" in _cli_error(capsys, "bench", "--seeds", "0", "--out", str(tmp_path))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "not writable" in _cli_error(capsys, "bench", "--suite", "smoke", "--out", str(blocker / "sub"))
    assert "invalid --set 'gpt-bytes.widht=3'" in _cli_error(capsys, "bench", "--set", "gpt-bytes.widht=3",
                                                               "--out", str(tmp_path))
    assert "no results database" in _cli_error(capsys, "report", str(tmp_path / "empty"))


# A test-only sitecustomize for the sweep subprocess (its spawned workers inherit PYTHONPATH and import it too),
# so the kill tests strike at a known point instead of racing the sweep:
# * the first trial that any worker starts claims the hold (hold.json, created atomically, holds its pid, its
#   parent's pid and its trial id) and then blocks, before training and so before committing anything, until
#   the file `release` appears (or it is killed); every later trial, re-spawned workers' included, runs normally;
# * the SIGINT handler writes `interrupted` before raising KeyboardInterrupt, so a test knows the main process
#   has taken the interrupt.
# Files live next to this module.  The real run_trial is wrapped lazily when torchstep.bench.sweep is imported
# (that is where _run looks it up), so sys.path is complete by then; a sitecustomize this one shadows still runs.
HOLD_HOOK = r'''
import importlib.machinery, importlib.util, json, os, signal, sys, time

_here = os.path.dirname(os.path.abspath(__file__))
_hold, _release = os.path.join(_here, "hold.json"), os.path.join(_here, "release")


def _held(real, trial_id):
    def run_trial(config, db_path=None):
        import multiprocessing
        if multiprocessing.parent_process() is not None:          # only ever in a worker
            claim = f"{_hold}.{os.getpid()}"
            with open(claim, "w") as fh:
                json.dump({"pid": os.getpid(), "ppid": os.getppid(), "trial_id": trial_id(config)}, fh)
            try:
                os.link(claim, _hold)                             # atomic: exactly one trial claims the hold
                claimed = True
            except FileExistsError:
                claimed = False
            finally:
                os.unlink(claim)
            while claimed and not os.path.exists(_release):
                time.sleep(0.05)
        return real(config, db_path)
    return run_trial


class _Finder:
    def find_spec(self, name, path=None, target=None):
        if name != "torchstep.bench.sweep":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module):
            exec_module(module)
            module.run_trial = _held(module.run_trial, module.trial_id)
        spec.loader.exec_module = exec_and_wrap
        return spec


sys.meta_path.insert(0, _Finder())


def _on_sigint(signum, frame):
    open(os.path.join(_here, "interrupted"), "w").close()
    signal.default_int_handler(signum, frame)


signal.signal(signal.SIGINT, _on_sigint)

_shadowed = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
if _shadowed is not None:
    _shadowed.loader.exec_module(importlib.util.module_from_spec(_shadowed))
'''

SMOKE = ["bench", "--suite", "smoke", "--tasks", "quadratic", "--optimizers", "adamw", "lion", "--workers", "2",
         "--quiet"]
SMOKE_SUITE = sweep.Suite(("quadratic",), ("adamw", "lion"), seeds=3, steps=sweep.SUITES["smoke"].steps)


def _finished(db):
    try:
        return store.finished_ids(db) if db.exists() else set()
    except sqlite3.OperationalError:   # the database is being created
        return set()


class HeldSweep:
    """``torchstep bench`` (SMOKE) in its own process group, with HOLD_HOOK loaded into it and its workers."""

    def __init__(self, tmp_path):
        self.hook, self.out = tmp_path / "hook", tmp_path / "run"
        self.db = self.out / "results.sqlite"
        self.hook.mkdir()
        (self.hook / "sitecustomize.py").write_text(HOLD_HOOK)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(self.hook), os.environ.get("PYTHONPATH")]))}
        self.stdout, self.stderr = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.stdout, "w") as out, open(self.stderr, "w") as err:   # files, not pipes: nothing can fill up
            self.proc = subprocess.Popen([sys.executable, "-m", "torchstep.cli", *SMOKE, "--out", str(self.out)],
                                         stdout=out, stderr=err, env=env, start_new_session=True)

    def wait_for(self, condition, what, timeout=120):
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"sweep exited ({self.proc.returncode}) before {what}:\n" \
                                             f"{self.stderr.read_text()}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s"
            time.sleep(0.05)

    def held(self):
        """Wait until a worker is blocked inside its first trial; {pid, ppid, trial_id} of that trial."""
        self.wait_for((self.hook / "hold.json").exists, "worker holding a trial")
        held = json.loads((self.hook / "hold.json").read_text())
        assert held["ppid"] == self.proc.pid             # a worker of this sweep
        assert held["trial_id"] not in _finished(self.db)  # blocked before training: still owed to the sweep
        return held

    def finish(self, timeout=300):
        """Wait for the sweep to exit; (returncode, stdout, stderr)."""
        rc = self.proc.wait(timeout=timeout)
        return rc, self.stdout.read_text(), self.stderr.read_text()

    def close(self):
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)     # whatever is left of the group, held worker included
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def held_sweep(tmp_path):
    run = HeldSweep(tmp_path)
    yield run
    run.close()


def test_sweep_killed_with_sigkill_resumes_without_loss_or_duplicates(held_sweep):
    out, db = held_sweep.out, held_sweep.db
    held = held_sweep.held()
    held_sweep.wait_for(lambda: len(_finished(db)) >= 3, "three committed trials")  # the other worker's
    os.killpg(held_sweep.proc.pid, signal.SIGKILL)       # main process and its workers, mid-sweep
    held_sweep.proc.wait()
    snapshot = {r["trial_id"]: r["final_val"] for r in store.trials(db)}
    assert len(snapshot) >= 3 and held["trial_id"] not in snapshot
    assert sweep.plan(SMOKE_SUITE, {r["trial_id"]: r for r in store.trials(db)})[0]   # work was left over
    r = _cli(*SMOKE, "--out", str(out))                   # resume, without the hook
    assert r.returncode == 0, r.stderr
    rows = store.trials(db)
    ids = [row["trial_id"] for row in rows]
    assert len(ids) == len(set(ids))                       # no duplicates
    assert all(tid in ids for tid in snapshot)             # nothing finished was lost
    assert all(row["final_val"] == snapshot[row["trial_id"]] for row in rows if row["trial_id"] in snapshot)
    assert held["trial_id"] in ids                         # the trial cut off by the kill was run again
    expected, _ = sweep.plan(SMOKE_SUITE, {})
    assert len(rows) >= len(expected) + 2                  # full grids plus paired finals for both arms
    assert not sweep.plan(SMOKE_SUITE, {row["trial_id"]: row for row in rows})[0]
    assert "report: " in r.stdout and (out / "report.md").exists() and (out / "figures" / "quadratic.png").exists()
    again = _cli(*SMOKE, "--out", str(out))                 # a third run finds nothing to do
    assert again.returncode == 0 and len(store.trials(db)) == len(rows)


def test_sweep_interrupted_with_sigint_keeps_finished_trials(held_sweep):
    db = held_sweep.db
    held_sweep.held()
    held_sweep.wait_for(lambda: len(_finished(db)) >= 2, "two committed trials")
    held_sweep.proc.send_signal(signal.SIGINT)
    held_sweep.wait_for((held_sweep.hook / "interrupted").exists, "SIGINT taken by the sweep")
    (held_sweep.hook / "release").touch()                # the held trial may finish now; nothing new may start
    rc, _, stderr = held_sweep.finish(timeout=60)
    assert rc != 0 and "KeyboardInterrupt" in stderr, stderr
    kept = store.finished_ids(db)
    assert len(kept) >= 2
    assert sweep.plan(SMOKE_SUITE, {r["trial_id"]: r for r in store.trials(db)})[0]   # it stopped short
    r = _cli(*SMOKE, "--out", str(held_sweep.out))
    assert r.returncode == 0 and kept <= store.finished_ids(db), r.stderr
    assert not sweep.plan(SMOKE_SUITE, {row["trial_id"]: row for row in store.trials(db)})[0]


def test_ray_backend_matches_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray")
    suite = sweep.Suite(("quadratic",), ("adamw",), seeds=2, steps={"quadratic": 40})
    local = sweep.sweep(suite, tmp_path / "local", workers=2, progress=False)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)   # a local Ray instance
    try:
        remote = sweep.sweep(suite, tmp_path / "ray", backend="ray", progress=False)
    finally:
        ray.shutdown()
    a = {r["trial_id"]: r["final_val"] for r in store.trials(local)}
    b = {r["trial_id"]: r["final_val"] for r in store.trials(remote)}
    assert a == b and len(a) >= 5                           # same trials, bit-identical results


def test_tensorboard_export_writes_every_trial(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torchstep.bench import export
    suite = sweep.Suite(("quadratic",), ("adamw",), seeds=1, steps={"quadratic": 20})
    db = sweep.sweep(suite, tmp_path, workers=1, progress=False)
    root = export.to_tensorboard(tmp_path)
    rows = store.trials(db)
    row = rows[0]
    acc = EventAccumulator(str(root / "quadratic" / "adamw" / f"lr{row['lr']:g}-seed0"))
    acc.Reload()
    vals = [e.value for e in acc.Scalars("val")]
    assert len(vals) == 21 and vals[-1] == pytest.approx(row["final_val"], rel=1e-6)


@pytest.mark.parametrize("arm", ["sophiah", "sophiag", "muon", "torch-muon", "sinkgd", "swan", "galore", "frugal",
                                 "gradnormlorp"])
def test_gpt_bytes_trial_with_options_runs_every_special_path(tmp_path, arm):
    opts = {"width": 32, "depth": 1, "heads": 2, "context": 32, "batch": 4, "norm": "peri", "qk_norm": True,
            "z_loss": 1e-4}
    row = run_trial(resolve("gpt-bytes", arm, 3e-3, 0, 20, "tune", opts))
    assert not row["diverged"] and row["final_val"] < row["init_val"]
    with pytest.raises(ValueError, match="unknown option"):
        resolve("gpt-bytes", arm, 3e-3, 0, 20, "tune", {"widht": 3})


def test_sigkill_of_a_worker_is_survived(held_sweep):
    held = held_sweep.held()                              # a worker provably inside a trial the sweep still needs
    os.kill(held["pid"], signal.SIGKILL)
    rc, stdout, stderr = held_sweep.finish()
    assert rc == 0, stderr
    assert stderr.count("worker process died") == 1 and "report: " in stdout, stderr
    rows = store.trials(held_sweep.db)
    assert len({r["trial_id"] for r in rows}) == len(rows)
    assert held["trial_id"] in {r["trial_id"] for r in rows}
    assert not sweep.plan(SMOKE_SUITE, {r["trial_id"]: r for r in rows})[0]


def test_mlflow_export_logs_one_run_per_trial_in_batches(tmp_path):
    mlflow = pytest.importorskip("mlflow")
    from torchstep.bench import export
    suite = sweep.Suite(("quadratic",), ("adamw",), seeds=1, steps={"quadratic": 20})
    db = sweep.sweep(suite, tmp_path, workers=1, progress=False)
    assert export.to_mlflow(tmp_path) == len(store.trials(db))
    client = mlflow.MlflowClient(f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    exp = client.get_experiment_by_name("torchstep-bench")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == len(store.trials(db))
    history = client.get_metric_history(runs[0].info.run_id, "val")
    assert len(history) == 21


def test_pareto_front_keeps_exactly_the_non_dominated_arms():
    points = {"adamw": (100, 2.0), "galore": (50, 2.1), "worse": (60, 2.2), "tie": (100, 2.0), "best": (200, 1.5)}
    assert stats.pareto_front(points) == ["galore", "adamw", "tie", "best"]


def test_bench_memory_state_is_exact_per_method():
    from torchstep.bench import memory
    class Rows(list):           # in-process (measure() spawns one process per arm; the same function runs)
        put = list.append
    rows, threads = Rows(), torch.get_num_threads()
    for arm in ("adamw", "galore"):
        memory._one(arm, 64, 1, 16, 1, "cpu", rows)
    torch.set_num_threads(threads)
    rows = {r["arm"]: r for r in rows}
    # hidden matrices of one block at width 64: qkv 192×64, proj 64×64, MLP 256×64 and 64×256 (rank 16 = 64/4)
    shapes = [(192, 64), (64, 64), (256, 64), (64, 256)]
    n = sum(m * k for m, k in shapes)
    assert rows["adamw"]["matrix_params"] == n
    assert rows["adamw"]["state"] == 2 * 4 * n + 4 * len(shapes)
    galore = sum(min(m, k) * 16 + 2 * max(m, k) * 16 for m, k in shapes)   # projector + moments (GaLore §7)
    assert rows["galore"]["state"] == 4 * galore + 4 * len(shapes)
    assert rows["adamw"]["fallback_state"] == rows["galore"]["fallback_state"]   # matched routing


@pytest.mark.parametrize("schedule", ["wsd", "linear", "power", "none"])
def test_harness_schedules_are_recorded_and_run(schedule):
    config = resolve("quadratic", "adamw", 3e-3, 0, 40, "tune", {"d": 16, "n": 256}, schedule=schedule)
    assert config["schedule"] == arms.SCHEDULES[schedule][0]
    assert resolve("quadratic", "adamw", 3e-3, 0, 40, "tune")["schedule"] == "warmup 5% + cosine to 0"  # v1 hash
    row = run_trial(config)
    assert not row["diverged"] and row["final_val"] < row["init_val"]
    curve = arms.SCHEDULES[schedule][1]
    values = [curve(t, 40, 2) for t in range(40)]
    assert values[0] == (1.0 if schedule == "none" else 0.5) and (schedule in ("none", "power") or values[-1] < 0.1)


def test_schedule_free_arms_run_with_their_own_warmup_and_no_external_schedule():
    config = resolve("quadratic", "schedulefree-adamw", 3e-3, 0, 40, "tune", {"d": 16, "n": 256}, schedule="wsd")
    assert config["schedule"] == arms.SCHEDULES["none"][0]
    row = run_trial(config)
    assert not row["diverged"] and row["final_val"] < row["init_val"]
