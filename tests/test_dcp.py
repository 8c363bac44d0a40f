"""``torch.distributed.checkpoint`` (DCP) with every registered optimizer under FSDP2 (gloo, 2 CPU processes).

The 2-rank part runs inside test_fsdp's single ``mp.spawn`` (one spawn for both files); per optimizer:
(a) ``get_optimizer_state_dict`` on a fresh optimizer runs DCP's initialisation step (zero gradients, lr = 0):
    the parameters must stay bitwise unchanged;
(b) train K steps, ``dcp.save`` model + optimizer, train N more; a fresh model/optimizer (other init) that
    ``dcp.load``s the checkpoint and trains the same N steps ends bitwise equal; Python state (ints, bools,
    floats: FRUGAL's ``active`` / ``reset_step``, schedule-free's weight sums) survives the round trip;
(c) reshard: the parent loads the 2-rank checkpoint into a plain single-process model/optimizer and continues
    the same N steps on the global batch — equal to the 2-rank run (1e-5).
"""
import copy
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

import torchstep
from fixtures import FIXTURES
from test_fsdp import _loss, _model, _shard, spawn_results

# both files share one 2-rank spawn: keep them on one xdist worker (README: --dist loadgroup)
pytestmark = pytest.mark.xdist_group("fsdp-spawn")

K, N = 2, 2          # steps before the checkpoint, steps after it
NAMES = torchstep.list_optimizers()
# configurations whose state is not shaped like the parameter (index sets, bases, row/group accumulators)
EXTRA = {"frugal[coordinate]": ("frugal", {"projection": "coordinate"}),
         "frugal[svd]": ("frugal", {"projection": "svd"}),
         "adadagrad[row]": ("adadagrad", {"accumulator": "row"}),
         "adadagrad-norm[group]": ("adadagrad-norm", {"accumulator": "group"})}
CASES = {**{name: (name, {}) for name in NAMES}, **EXTRA}
XFAIL: dict[str, str] = {}


def _optimizer(name, model, kw=None):
    fixture = FIXTURES[name]
    return fixture.cls(model.parameters(), **{**fixture.base_kwargs, "lr": 1e-2, **(kw or {})})


def _steps(model, opt, steps, shard=None):
    for step in steps:
        opt.zero_grad()
        _loss(model, step, shard).backward()
        opt.step()


def _python_state(opt):
    """Per parameter (by position): the state entries that are not tensors."""
    params = [p for g in opt.param_groups for p in g["params"]]
    return {i: {k: v for k, v in opt.state.get(p, {}).items() if not torch.is_tensor(v)} for i, p in enumerate(params)}


def _local(model):
    return [p.to_local().detach().clone() for p in model.parameters()]


def _full(model):
    return [p.full_tensor().detach().clone() for p in model.parameters()]


def dcp_work(rank, root):
    """This rank's part of every DCP case (run inside test_fsdp's one spawn); checkpoints go under ``root``."""
    out = {}
    for label, (name, kw) in CASES.items():
        try:
            res = {}
            # (b) save after K steps, continue N; load into a fresh model/optimizer, continue N
            model = _shard(_model())
            opt = _optimizer(name, model, kw)
            _steps(model, opt, range(K), rank)
            path = os.path.join(root, label)
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=path)
            saved_python = _python_state(opt)
            _steps(model, opt, range(K, K + N), rank)
            res["continued"] = _full(model)
            fresh = _shard(_model(seed=1))
            opt2 = _optimizer(name, fresh, kw)
            before = _local(fresh)
            state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, opt2)}
            # (a) get_optimizer_state_dict on the fresh optimizer ran DCP's zero-gradient, lr = 0 step
            res["init_moved"] = [i for i, (a, b) in enumerate(zip(before, _local(fresh))) if not torch.equal(a, b)]
            dcp.load(state, checkpoint_id=path)
            set_model_state_dict(fresh, state["model"])
            set_optimizer_state_dict(fresh, opt2, state["optim"])
            res["python_state"] = (saved_python, _python_state(opt2))
            _steps(fresh, opt2, range(K, K + N), rank)
            res["resumed"] = _full(fresh)
            res["error"] = None
        except (Exception, CheckpointException) as err:   # reported per case in the parent
            res = {"error": f"{type(err).__name__}: {err}"[:400]}
        out[label] = res
    return out


@pytest.fixture(scope="module")
def dcp_results():
    spawned = spawn_results()
    root, results = spawned["dcp_root"], spawned["dcp"]
    torch.set_num_threads(1)
    for label, (name, kw) in CASES.items():   # (c) here (no process group): load the 2-rank checkpoint
        if results[label]["error"] is not None:
            continue
        try:
            model = _model(seed=1)
            opt = _optimizer(name, model, kw)
            state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
            dcp.load(state, checkpoint_id=os.path.join(root, label))
            set_model_state_dict(model, state["model"])
            set_optimizer_state_dict(model, opt, state["optim"])
            _steps(model, opt, range(K, K + N))
            results[label]["single"] = [p.detach().clone() for p in model.parameters()]
        except (Exception, CheckpointException) as err:
            results[label]["single"] = f"{type(err).__name__}: {err}"[:400]
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_dcp_roundtrip(dcp_results, name):
    if name in XFAIL:
        pytest.xfail(XFAIL[name])
    res = dcp_results[name]
    assert res["error"] is None, res["error"]
    assert res["init_moved"] == [], f"DCP's lr=0 initialisation step moved parameters {res['init_moved']}"
    saved, loaded = res["python_state"]
    assert loaded == saved, "Python (non-tensor) state did not survive DCP"
    for i, (a, b) in enumerate(zip(res["continued"], res["resumed"])):
        assert torch.equal(a, b), f"{name}: parameter {i} differs after resume ({(a - b).abs().max():.2e})"
    single = res["single"]
    assert not isinstance(single, str), single
    for i, (a, b) in enumerate(zip(res["continued"], single)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5, msg=f"{name}: parameter {i} after 2 → 1 reshard")


def test_frugal_block_state_after_a_refresh_needs_the_saved_structure(tmp_path):
    """FRUGAL (block) keeps Adam moments only for the active blocks; after a refresh that changes the active
    set, a fresh optimizer's DCP template (the lr = 0 initialisation step: refresh 0's active set) lacks the
    keys — ``dcp.load`` refuses (documented limitation).  ``set_optimizer_state_dict`` with the state dict
    itself (e.g. ``full_state_dict=True`` saved with ``torch.save``) replaces the state wholesale and resumes
    bit-exactly."""
    torch.set_num_threads(1)
    k = 4                       # update_gap 3: the refresh at step 4 swaps the active block
    model = _model()
    opt = _optimizer("frugal", model)
    _steps(model, opt, range(k))
    assert [opt.state[p]["active"] for p in (model[0].weight, model[2].weight)] == [True, False]
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path / "ckpt"))
    torch.save(get_optimizer_state_dict(model, opt), tmp_path / "full.pt")
    weights = copy.deepcopy(model.state_dict())
    _steps(model, opt, range(k, k + N))
    fresh = _model()
    opt2 = _optimizer("frugal", fresh)
    template = {"optim": get_optimizer_state_dict(fresh, opt2)}
    with pytest.raises(CheckpointException, match="Missing key"):
        dcp.load(template, checkpoint_id=str(tmp_path / "ckpt"))
    fresh = _model(seed=1)
    fresh.load_state_dict(weights)
    opt2 = _optimizer("frugal", fresh)
    set_optimizer_state_dict(fresh, opt2, torch.load(tmp_path / "full.pt", weights_only=True))
    assert [opt2.state[p]["active"] for p in (fresh[0].weight, fresh[2].weight)] == [True, False]
    _steps(fresh, opt2, range(k, k + N))
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
