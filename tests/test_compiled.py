"""The compiled multi-tensor step (``compile=``) and the sync-free ``nonfinite="mask"`` policy.

Equality with the eager reference uses the ``aot_eager`` backend for every compilable optimizer (it traces
exactly what Inductor would get — same graph, same guards, no graph breaks under ``fullgraph=True`` — and
compiles in about a second) and Inductor itself for three rules that cover the kernel shapes: AdamW (pure
element-wise), AdamP (per-row and whole-tensor reductions selected with ``torch.where``) and SPAM-family
structural variants where available.
"""
import copy
import math
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from fixtures import FIXTURES
from helpers import assert_state_equal, roundtrip

SHAPES = [(8, 5), (5,), (3, 2, 4), (6, 6), ()]


def _compilable():
    out = []
    for name, fx in FIXTURES.items():
        rule = getattr(fx.cls, "rule", None)
        if rule is not None and getattr(rule, "compilable", False):
            out.append(name)
    return out


COMPILABLE = _compilable()


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]


#: settings that reach every structural variant (SPAM: clip, reset; Stable-SPAM: reset) within 12 steps
VARIANTS = {"spam": dict(reset_interval=5, warmup_steps=2, grad_accu_steps=2, threshold=3.0),
            "stablespam": dict(total_T=12, reset_interval=5, weight_decay=0.1),
            "schedulefree-adamw": dict(warmup_steps=5, r=1.0, weight_decay=0.1),
            "schedulefree-sgd": dict(warmup_steps=5, r=1.0, weight_decay=0.1)}


def _kwargs(name):
    return {**FIXTURES[name].base_kwargs, **VARIANTS.get(name, {})}


def _run(opt, params, steps, start=0, lr0=None, nan_at=None):
    """``steps`` steps with a new lr every step (a scheduler's pattern) and seeded gradients."""
    lr0 = lr0 if lr0 is not None else opt.param_groups[0]["lr"]
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + step)
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            if nan_at is not None and (step, i) == nan_at:
                p.grad.view(-1)[0] = math.nan
        opt.param_groups[0]["lr"] = lr0 * (1.0 - step / 100)
        opt.step()


def _graphs():
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", COMPILABLE)
def test_compiled_step_equals_eager_and_never_recompiles_when_lr_changes(name):
    kw = _kwargs(name)
    eager_params, compiled_params = _params(), _params()
    eager = FIXTURES[name].cls(eager_params, **kw)
    compiled = FIXTURES[name].cls(compiled_params, **kw, compile="aot_eager")
    _run(eager, eager_params, 12)
    before = _graphs()
    _run(compiled, compiled_params, 12)
    variants = _graphs() - before
    assert 1 <= variants <= 3, variants          # one graph per structural variant (SPAM: reset steps)
    with torch._dynamo.config.patch(error_on_recompile=True):   # every later lr / step reuses them
        _run(eager, eager_params, 12, start=12, lr0=kw.get("lr", eager.defaults["lr"]))
        _run(compiled, compiled_params, 12, start=12, lr0=kw.get("lr", compiled.defaults["lr"]))
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
    for p, q in zip(eager_params, compiled_params):
        for key, value in eager.state[p].items():
            if torch.is_tensor(value) and key != "step":
                torch.testing.assert_close(compiled.state[q][key], value, rtol=1e-5, atol=1e-6, msg=(name, key))


needs_compiler = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                                    reason="Inductor on CPU needs a C++ compiler")


@needs_compiler
@pytest.mark.parametrize("name", [n for n in ("adamw", "adamp", "spam") if n in COMPILABLE])
def test_inductor_step_equals_eager(name):
    """The real backend: Inductor's fused C++ kernels agree with the eager reference to fp32 rounding."""
    kw = _kwargs(name)
    eager_params, compiled_params = _params(), _params()
    eager = FIXTURES[name].cls(eager_params, **kw)
    compiled = FIXTURES[name].cls(compiled_params, **kw, compile=True)
    _run(eager, eager_params, 10)
    _run(compiled, compiled_params, 10)
    for p, q in zip(eager_params, compiled_params):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_compiled_checkpoint_resume_is_bit_exact_and_loads_into_eager():
    params, resumed_params = _params(), _params()
    opt = FIXTURES["adamw"].cls(params, compile="aot_eager", weight_decay=0.1)
    _run(opt, params, 5)
    saved = roundtrip(opt.state_dict())
    with torch.no_grad():
        for p, q in zip(resumed_params, params):
            p.copy_(q)
    resumed = FIXTURES["adamw"].cls(resumed_params, compile="aot_eager", weight_decay=0.1)
    resumed.load_state_dict(saved)
    _run(opt, params, 5, start=5, lr0=1e-3)
    _run(resumed, resumed_params, 5, start=5, lr0=1e-3)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    assert resumed.param_groups[0]["compile"] == "aot_eager"
    eager = FIXTURES["adamw"].cls(_params(), weight_decay=0.1)
    eager.load_state_dict(saved)                   # the checkpoint is the same plain data either way
    assert eager.param_groups[0]["compile"] == "aot_eager"


@pytest.mark.parametrize("compiled", [False, "aot_eager"])
def test_skip_policy_is_preserved_by_the_compiled_step(compiled):
    params = _params()
    opt = FIXTURES["adamw"].cls(params, compile=compiled)
    _run(opt, params, 3)
    snap = params[2].detach().clone(), copy.deepcopy(opt.state[params[2]])
    _run(opt, params, 1, start=3, nan_at=(3, 2))
    assert torch.equal(params[2], snap[0])
    assert_state_equal(opt.state[params[2]], snap[1])          # step counter included: it did not advance


def _config(name):
    return {**FIXTURES[name].base_kwargs, **FIXTURES[name].configs[0][0]}


def _maskable(name):
    opt = FIXTURES[name].cls(_params(), **_config(name))
    rule = opt.rule_for(opt.param_groups[0])
    return rule.maskable and not rule.batched


PER_TENSOR = [n for n in FIXTURES if _maskable(n)]


@pytest.mark.parametrize("name", PER_TENSOR)
@pytest.mark.parametrize("compiled", [False, "aot_eager"])
def test_mask_policy_keeps_parameter_and_state_without_reading_the_device(name, compiled, monkeypatch):
    """``nonfinite="mask"``: a NaN gradient leaves its parameter and tensor state as they were, the others
    step, and the step never reads a parameter, gradient or state tensor back to the host (CPU stand-in for
    ``torch.cuda.set_sync_debug_mode``: every ``Tensor.item/tolist/__bool__`` on them is counted)."""
    if compiled and name not in COMPILABLE:
        pytest.skip("no compiled formulation")
    params = _params()
    opt = FIXTURES[name].cls(params, **{**_config(name), "nonfinite": "mask"},
                             **({"compile": compiled} if compiled else {}))
    _run(opt, params, 3)
    snap = params[0].detach().clone(), {k: v.clone() for k, v in opt.state[params[0]].items()
                                        if torch.is_tensor(v) and k != "step"}
    healthy = params[1].detach().clone()
    watched = {id(t) for p in params for t in (p, p.grad)} | {
        id(v) for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"}
    reads = []
    for method in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, method)

        def spy(self, *a, _original=original, _method=method, **k):
            # the compiled step's counters: one host-side buffer per group (CPU by design, never a sync)
            counters = {id(cs._steps) for _, cs in opt.__dict__.get("_compiled_steps", {}).values()}
            if (id(self) in watched or self.numel() > 1) and id(self) not in counters:
                reads.append(_method)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, method, spy)
    _run(opt, params, 1, start=3, nan_at=(3, 0))
    monkeypatch.undo()
    assert reads == [], reads
    assert torch.equal(params[0], snap[0])
    for key, value in snap[1].items():
        assert torch.equal(opt.state[params[0]][key], value), key
    assert not torch.equal(params[1], healthy)
    assert int(opt.state[params[0]]["step"]) == 4      # documented: the counter still advances


def test_compile_and_mask_validation():
    adamw = FIXTURES["adamw"].cls
    with pytest.raises(ValueError, match="compile"):
        adamw(_params(), compile="no-such-backend")
    with pytest.raises(ValueError, match="compile"):
        adamw(_params(), compile=1)
    for name in ("muon", "galore"):   # a batched matrix rule; a projection refreshing host-side subspaces
        with pytest.raises(ValueError, match="nonfinite"):
            FIXTURES[name].cls([torch.randn(4, 4, requires_grad=True)], **{**_config(name), "nonfinite": "mask"})


@pytest.mark.parametrize("name", COMPILABLE)
def test_plan_reads_only_the_step_and_its_declared_host_state(name):
    """The compiled step plans once per distinct (step, ``rule.plan_state``) of a group, so a plan must read
    nothing else of the state: a state holding only those keys gives the same plan (a KeyError otherwise),
    and a plan without declared host state changes nothing."""
    params = _params()
    opt = FIXTURES[name].cls(params, **_kwargs(name))
    _run(opt, params, 7)
    rule, group = opt.rule_for(opt.param_groups[0]), opt.param_groups[0]
    for p in params:
        full = copy.deepcopy(opt.state[p])
        full["step"] += 1
        minimal = {"step": full["step"].clone(), **{k: full[k] for k in rule.plan_state}}
        before = copy.deepcopy(full)
        assert rule.plan(copy.deepcopy(minimal), group) == rule.plan(full, group)
        if not rule.plan_state:
            assert_state_equal(full, before)


@pytest.mark.parametrize("name", ["adamw", "spam", "schedulefree-adamw"])
def test_parameters_at_different_steps_share_one_graph_and_equal_eager(name):
    """A NaN skips one parameter's step (``skip``), so the group's parameters then sit at two different
    steps: the compiled step plans per distinct step (rows + index) and still equals eager, and the step
    counters — views of one buffer in the compiled step — stay per parameter."""
    pa, pb = _params(), _params()
    eager = FIXTURES[name].cls(pa, **_kwargs(name))
    comp = FIXTURES[name].cls(pb, **_kwargs(name), compile="aot_eager")
    for opt, params in ((eager, pa), (comp, pb)):
        _run(opt, params, 2)
        _run(opt, params, 1, start=2, nan_at=(2, 1))
        _run(opt, params, 6, start=3)
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key, value in eager.state[a].items():
            if torch.is_tensor(value):
                torch.testing.assert_close(comp.state[b][key], value, rtol=1e-5, atol=1e-6)
            else:
                assert comp.state[b][key] == pytest.approx(value, rel=1e-9), key
    assert [int(comp.state[p]["step"]) for p in pb] == [9, 8, 9, 9, 9]


def test_step_counters_edited_from_outside_are_respected():
    """The compiled step keeps the group's counters as views of one buffer; a counter replaced from outside
    (a hand-edited state, as a warm restart would do) is picked up, not overwritten from the buffer."""
    params = _params()
    opt = FIXTURES["adamw"].cls(params, compile="aot_eager")
    _run(opt, params, 2)
    opt.state[params[0]]["step"] = torch.tensor(10.0)
    _run(opt, params, 1, start=2)
    assert [int(opt.state[p]["step"]) for p in params] == [11, 3, 3, 3, 3]
    sd = copy.deepcopy(opt.state_dict())
    fresh = FIXTURES["adamw"].cls(params, compile="aot_eager")
    fresh.load_state_dict(sd)
    _run(fresh, params, 1, start=3)
    assert [int(fresh.state[p]["step"]) for p in params] == [12, 4, 4, 4, 4]
    assert int(opt.state[params[0]]["step"]) == 11     # the other optimizer's buffer is its own
