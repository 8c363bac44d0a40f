"""Launching examples/fsdp_train.py (FSDP2 + a torchstep optimizer) with torchrun and with Ray Train: the
2-rank run equals a single-process run on the global batch.

The Ray test starts a local Ray instance (slow: ~1.5 min on a busy 2-core machine) and only runs with
``TORCHSTEP_TEST_RAY=1``."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fsdp_train.py"
OPTIMIZER = "lion"       # a torchstep optimizer (torchstep.create), so the DTensor path of its step is exercised


def _example():
    spec = importlib.util.spec_from_file_location("fsdp_train_example", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _reference():
    """The single-process run (no FSDP, world size 1) on the same global batches, in this process."""
    threads = torch.get_num_threads()
    try:
        return _example().train_fn({"single": True, "optimizer": OPTIMIZER})
    finally:
        torch.set_num_threads(threads)


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = str(SCRIPT.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _assert_matches_reference(run):
    ref = _reference()
    assert run["world_size"] == 2 and ref["world_size"] == 1
    assert len(run["losses"]) == len(ref["losses"]) == 5
    torch.testing.assert_close(torch.tensor(run["losses"]), torch.tensor(ref["losses"]), rtol=0, atol=1e-5)
    assert run["losses"][-1] < run["losses"][0]                 # it trained
    assert run["params"].keys() == ref["params"].keys()
    for name in ref["params"]:
        torch.testing.assert_close(torch.tensor(run["params"][name]), torch.tensor(ref["params"][name]),
                                   rtol=0, atol=1e-5, msg=name)


def test_torchrun_fsdp2_two_ranks_equal_the_single_process_run(tmp_path):
    out = tmp_path / "run.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(SCRIPT), "--optimizer", OPTIMIZER, "--out", str(out)]   # --standalone: c10d on a free port
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_matches_reference(json.loads(out.read_text()))


@pytest.mark.skipif(os.environ.get("TORCHSTEP_TEST_RAY") != "1", reason="slow: set TORCHSTEP_TEST_RAY=1")
def test_ray_train_torchtrainer_two_workers_equal_the_single_process_run(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "run.json"
    cmd = [sys.executable, str(SCRIPT), "--ray", "--workers", "2", "--optimizer", OPTIMIZER, "--out", str(out)]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-4000:]
    _assert_matches_reference(json.loads(out.read_text()))
