"""Writes ``checkpoints_v0_1_0.pt``: optimizer checkpoints as torchstep 0.1.0 (commit 7f3e45b, before the
core redesign) wrote them, for every optimizer and configuration it registered, with the parameters at the
checkpoint and after 3 more steps.  ``tests/test_checkpoints.py`` loads them with the current code.

Run from a checkout of that commit (it uses that version's registry and test helpers)::

    git worktree add /tmp/v010 7f3e45b && cd /tmp/v010 && python /path/to/this/file OUT.pt
"""
import copy
import sys

import torch

sys.path.insert(0, "tests")
from helpers import all_configs, clone_params, make_params, run_steps  # noqa: E402

out = {}
for spec, kwargs, cid in all_configs():
    params = make_params()
    opt = spec.cls(params, **kwargs)
    run_steps(opt, params, 5)
    entry = {"name": spec.name, "kwargs": kwargs, "state_dict": copy.deepcopy(opt.state_dict()),
             "params": [p.detach().clone() for p in params]}
    run_steps(opt, params, 3, start=5)
    entry["params_after"] = [p.detach().clone() for p in params]
    out[cid] = entry
torch.save(out, sys.argv[1])
print(f"{len(out)} checkpoints")
