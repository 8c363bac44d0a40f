"""Checkpoints written by torchstep 0.1.0 (before the core redesign) load with ``weights_only=True`` and resume.

``tests/data/checkpoints_v0_1_0.pt`` holds, for every optimizer and configuration 0.1.0 registered, its
state_dict after 5 steps and the parameters 3 steps later (made by ``tests/data/make_checkpoints_v0_1_0.py``
at commit 7f3e45b).  Resuming must reproduce those 3 steps **bit for bit**, except where an audit fix
changed the rule on purpose (listed below with the fix); those must still load and step finitely.
"""
import copy
import pathlib

import pytest
import torch

from helpers import clone_params, run_steps
from torchstep.registry import SPECS

DATA = pathlib.Path(__file__).parent / "data" / "checkpoints_v0_1_0.pt"
SAVED = torch.load(DATA, weights_only=True)

_LANTON = ("§3.6: default noise estimator is now the previous gradient", {"noise_estimator": "innovation"})
_SWAN = ("§3.8: the paper's rescale is on by default", {"rescale": False})
#: configurations whose update changed on purpose: (why, the keyword that restores the 0.1.0 rule or None)
CHANGED = {
    "classp-default threshold": ("§3.10: the paper's accumulator charges every coordinate", None),
    "muonpp-convergent NS fp32": ("§3.1: the convergent preset is the card's quintic (2, −1.5, 0.5)", None),
    "lanton-spectral, nuclear": _LANTON, "lanton-frobenius noise": _LANTON, "lanton-sign LMO": _LANTON,
    "lanton-nesterov + wd": _LANTON, "swan-default": _SWAN, "swan-5 NS steps": _SWAN,
}


def _resume(entry, **override):
    entry = copy.deepcopy(entry)       # load_state_dict adopts same-dtype state tensors without copying
    params = clone_params(entry["params"])
    opt = SPECS[entry["name"]].cls(params, **entry["kwargs"])
    opt.load_state_dict(entry["state_dict"])
    for group in opt.param_groups:
        group.update(override)
    run_steps(opt, params, 3, start=5)
    return [p.detach() for p in params]


@pytest.mark.parametrize("cid", sorted(SAVED))
def test_v0_1_0_checkpoint_loads_and_resumes_bit_exactly(cid):
    entry = SAVED[cid]
    resumed = _resume(entry)
    if cid in CHANGED:
        assert all(torch.isfinite(p).all() for p in resumed)
        assert any(not torch.equal(p, q) for p, q in zip(resumed, entry["params_after"])), "listed as changed"
        _, restore = CHANGED[cid]
        if restore is None:
            return
        resumed = _resume(entry, **restore)       # the 0.1.0 rule is still available, bit for bit
    for p, q in zip(resumed, entry["params_after"]):
        assert torch.equal(p, q), f"{cid}: resumed trajectory differs from 0.1.0's"


def test_the_saved_checkpoints_cover_every_optimizer_of_0_1_0():
    after_0_1_0 = {"adamw", "galore", "fira", "frugal", "gradnormlorp",       # registered after 0.1.0
                   "schedulefree-adamw", "schedulefree-sgd", "adadagrad", "adadagrad-norm"}
    assert {e["name"] for e in SAVED.values()} == set(SPECS) - after_0_1_0
