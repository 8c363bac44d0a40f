"""Generic conformance suite: every registered optimizer x every valid configuration.

A new optimizer gets all of these by registering it in ``torchstep.registry`` and adding its ``Fixture`` to ``tests/fixtures.py``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers import (all_configs, assert_state_equal, clone_params, make_params, roundtrip,
                     run_steps, toy_loss)
from fixtures import FIXTURES as SPECS

CONFIGS = all_configs()
IDS = [c[2] for c in CONFIGS]


def converging(spec, desc):
    # CLASSP's default threshold (g² > 0.5) deliberately freezes coordinates with small
    # gradients; its sparsity is tested in test_classp.py instead.  A fixture's ``converge_only`` names the
    # configs that differ on vectors (GradNormLoRP's official mode is not among them: it weight-normalises
    # every tensor, and x = 0 has no direction, so it stays 0 — the official code makes it NaN).
    if spec.converge_only is not None and desc not in spec.converge_only:
        return False
    return not (spec.name == "classp" and desc == "default threshold")


def linear_decay(opt, steps):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda k: max(0.0, 1 - k / steps))


def minimise(spec, kwargs, f, x0, lr, steps):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    opt = spec.cls([x], **{**kwargs, "lr": lr})
    sched = linear_decay(opt, steps) if spec.decay_schedule else None
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for _ in range(steps):
        opt.zero_grad()
        (sign * f(x)).backward()
        opt.step()
        if sched is not None:
            sched.step()
    if hasattr(opt, "eval"):      # Schedule-Free: the solution is the averaged point x, not the gradient point y
        opt.eval()
    return x.detach()


# --------------------------------------------------------------------------- convergence
CONV = all_configs(converging)


@pytest.mark.parametrize("spec,kwargs,_id", CONV, ids=[c[2] for c in CONV])
def test_converges_on_ill_conditioned_quadratic(spec, kwargs, _id):
    # f(x) = ½ Σ λ_i (x_i − c_i)², condition number 100; optimum c. Tolerance 2e-2 (∞-norm).
    lam = torch.logspace(0, 2, 8, dtype=torch.float64)
    c = torch.linspace(-1, 1, 8, dtype=torch.float64)
    f = lambda x: 0.5 * (lam * (x - c) ** 2).sum()  # noqa: E731  (minimise() maximises −f under maximize)
    kw = {k: v for k, v in kwargs.items() if k != "weight_decay"}  # wd moves the optimum
    x = minimise(spec, kw, f, [0.0] * 8, spec.quadratic_lr, spec.steps)
    assert (x - c).abs().max() < 2e-2


ROSEN = all_configs(lambda spec, desc: converging(spec, desc) and desc not in spec.skip_rosenbrock)


@pytest.mark.parametrize("spec,kwargs,_id", ROSEN, ids=[c[2] for c in ROSEN])
def test_converges_on_rosenbrock(spec, kwargs, _id):
    # Rosenbrock from (−1.5, 2): optimum (1, 1). Tolerance 5e-2 (∞-norm) within the spec's budget.
    f = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    kw = {k: v for k, v in kwargs.items() if k != "weight_decay"}
    x = minimise(spec, kw, f, [-1.5, 2.0], spec.rosenbrock_lr, 3 * spec.steps)
    assert (x - 1).abs().max() < 5e-2


# --------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_group_with_zero_lr_does_not_move_and_groups_are_isolated(spec, kwargs, _id):
    params = make_params()
    frozen_before = [p.detach().clone() for p in params[2:]]
    opt = spec.cls([{"params": params[:2]}, {"params": params[2:], "lr": 0.0}], **kwargs)
    run_steps(opt, params, 5)
    for p, before in zip(params[2:], frozen_before):
        assert torch.equal(p.detach(), before)
    assert opt.param_groups[0]["lr"] == kwargs.get("lr", opt.defaults["lr"])


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_tensor_lr_equals_float_lr(spec, kwargs, _id):
    lr = kwargs.get("lr", 1e-2)
    a, b = make_params(torch.float64), make_params(torch.float64)
    opt_a = spec.cls(a, **{**kwargs, "lr": lr})
    opt_b = spec.cls(b, **{**kwargs, "lr": torch.tensor(lr, dtype=torch.float64)})
    run_steps(opt_a, a, 8)
    run_steps(opt_b, b, 8)
    for pa, pb in zip(a, b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_closure_called_once_with_grad_and_loss_returned(spec, kwargs, _id):
    params = make_params()
    opt = spec.cls(params, **kwargs)
    calls = []

    def closure():
        calls.append(torch.is_grad_enabled())
        opt.zero_grad()
        loss = toy_loss(params)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert calls == [True]
    assert torch.is_tensor(loss) and torch.equal(loss, toy_loss(clone_params(make_params())))
    opt.zero_grad(set_to_none=True)
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_no_grad_and_frozen_params_untouched_and_stateless(spec, kwargs, _id):
    params = make_params()
    no_grad, frozen = params[1], params[2]
    frozen.requires_grad_(False)
    before = [no_grad.detach().clone(), frozen.detach().clone()]
    opt = spec.cls(params, **kwargs)
    for k in range(3):
        opt.zero_grad(set_to_none=True)
        toy_loss([params[0], params[3]], k).backward()
        opt.step()
    assert torch.equal(no_grad, before[0]) and torch.equal(frozen, before[1])
    assert no_grad not in opt.state and frozen not in opt.state
    # a parameter that gets its first gradient late still gets state (lazy init every step)
    opt.zero_grad()
    toy_loss(params[:2]).backward()
    opt.step()
    assert no_grad in opt.state and not torch.equal(no_grad, before[0])


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_grad_is_never_written(spec, kwargs, _id):
    params = make_params()
    opt = spec.cls(params, **kwargs)
    for k in range(4):
        opt.zero_grad()
        toy_loss(params, k).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_checkpoint_resume_is_bit_exact_and_weights_only(spec, kwargs, _id):
    a = make_params()
    opt_a = spec.cls(a, **kwargs)
    run_steps(opt_a, a, 7)
    saved = roundtrip(opt_a.state_dict())
    b = clone_params(a)
    opt_b = spec.cls(b, **kwargs)
    opt_b.load_state_dict(saved)
    run_steps(opt_a, a, 6, start=7)
    run_steps(opt_b, b, 6, start=7)
    for pa, pb in zip(a, b):
        assert torch.equal(pa, pb)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    for key in sa["state"]:
        assert_state_equal(sa["state"][key], sb["state"][key])
    assert sa["param_groups"] == sb["param_groups"]
    twin = copy.deepcopy(opt_a)
    assert twin.state_dict()["param_groups"] == sa["param_groups"]
    assert repr(opt_a).startswith(spec.cls.__name__)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_dtypes_shapes_and_low_precision_state_policy(spec, kwargs, _id, dtype):
    params = make_params(dtype)
    reference = make_params(torch.float64)
    opt = spec.cls(params, **kwargs)
    ref_opt = spec.cls(reference, **kwargs)
    run_steps(opt, params, 5)
    run_steps(ref_opt, reference, 5)
    for p, r in zip(params, reference):
        assert p.dtype == dtype and p.shape == r.shape
        assert torch.isfinite(p).all()
        state = opt.state[p]
        floats = [v for k, v in state.items() if k != "step" and torch.is_tensor(v) and v.is_floating_point()]
        expected = torch.float32 if dtype == torch.bfloat16 else dtype
        assert all(v.dtype == expected for v in floats)
        assert state["step"].dtype == torch.float32 and state["step"].device.type == "cpu"
    if dtype == torch.float32:  # same trajectory as float64 up to float32 rounding
        for p, r in zip(params, reference):
            torch.testing.assert_close(p.double(), r.detach(), rtol=1e-3, atol=1e-3)
    if dtype == torch.bfloat16:  # fp32 state survives a checkpoint round trip
        fresh = spec.cls(clone_params(params), **kwargs)
        fresh.load_state_dict(roundtrip(opt.state_dict()))
        in_order = lambda o: [q for g in o.param_groups for q in g["params"]]  # noqa: E731 (hybrids split groups)
        for p_old, p_new in zip(in_order(opt), in_order(fresh)):
            for key, value in opt.state[p_old].items():
                loaded = fresh.state[p_new][key]
                assert torch.equal(loaded, value) if torch.is_tensor(value) else loaded == value


@pytest.mark.parametrize("spec,bad,argname", [(s, bad, arg) for s in SPECS.values() for bad, arg in s.invalid],
                         ids=[f"{s.name}-{arg}" for s in SPECS.values() for _, arg in s.invalid])
def test_invalid_hyperparameters_raise_value_error_naming_the_argument(spec, bad, argname):
    params = make_params()
    with pytest.raises(ValueError, match=argname):
        spec.cls(params, **{**spec.base_kwargs, **bad})
    opt = spec.cls(params[:1], **spec.base_kwargs)
    with pytest.raises(ValueError, match=argname):  # add_param_group validates too
        opt.add_param_group({"params": params[1:], **bad})


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_generic_construction_errors(spec):
    params = make_params()
    with pytest.raises(ValueError, match="nesterov_typo"):
        spec.cls([{"params": params, "nesterov_typo": True}], **spec.base_kwargs)
    with pytest.raises(TypeError):
        spec.cls(params, foreach=True, **spec.base_kwargs)  # flags we do not implement are refused
    with pytest.raises(TypeError):
        spec.cls(params[0], **spec.base_kwargs)
    with pytest.raises(ValueError):
        spec.cls([], **spec.base_kwargs)
    with pytest.raises(ValueError, match="lr"):
        spec.cls(params, **{**spec.base_kwargs, "lr": torch.tensor([1e-3, 1e-3])})
    with pytest.raises(ValueError, match="nonfinite"):
        spec.cls(params, nonfinite="maybe", **spec.base_kwargs)


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_nonfinite_gradient_skips_parameter_without_touching_state(spec, kwargs, _id):
    params = make_params()
    opt = spec.cls(params, **kwargs)
    run_steps(opt, params, 3)
    opt.zero_grad()
    toy_loss(params, 3).backward()
    params[0].grad[0, 0] = math.nan
    params[3].grad[1, 1] = math.inf
    snap = {i: (params[i].detach().clone(), copy.deepcopy(opt.state[params[i]])) for i in (0, 3)}
    healthy = params[1].detach().clone()
    opt.step()
    for i, (value, state) in snap.items():
        assert torch.equal(params[i], value)
        assert_state_equal(opt.state[params[i]], state)
    assert not torch.equal(params[1], healthy)  # the other parameters still step


@pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)
def test_nonfinite_gradient_raise_policy_modifies_nothing(spec, kwargs, _id):
    params = make_params()
    opt = spec.cls(params, **{**kwargs, "nonfinite": "raise"})
    run_steps(opt, params, 2)
    opt.zero_grad()
    toy_loss(params, 2).backward()
    params[3].grad[0, 0] = math.inf
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="group 0"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_hooks_fire_in_order(spec):
    params = make_params()
    opt = spec.cls(params, **spec.base_kwargs)
    order = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: order.append("pre"))
    h2 = opt.register_step_post_hook(lambda o, a, k: order.append("post"))
    toy_loss(params).backward()
    opt.step()
    h1.remove(), h2.remove()
    opt.step()
    assert order == ["pre", "post"]


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_zero_gradient_without_decay_keeps_parameters(spec):
    params = make_params()
    opt = spec.cls(params, **{**spec.base_kwargs, **({"weight_decay": 0.0} if "weight_decay" in
                                                      spec.cls.__init__.__code__.co_varnames else {})})
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_older_checkpoints_without_late_flags_and_with_float_step_load(spec):
    params = make_params()
    opt = spec.cls(params, **spec.base_kwargs)
    run_steps(opt, params, 2)
    saved = roundtrip(opt.state_dict())
    for group in saved["param_groups"]:
        del group["nonfinite"], group["maximize"]
    for state in saved["state"].values():
        state["step"] = float(state["step"])
    fresh = spec.cls(clone_params(params), **spec.base_kwargs)
    fresh.load_state_dict(saved)
    assert all(g["nonfinite"] == "skip" and g["maximize"] is False for g in fresh.param_groups)
    assert all(torch.is_tensor(s["step"]) for s in fresh.state.values())
    run_steps(fresh, fresh.param_groups[0]["params"], 1, start=2)
