"""Robustness suite (issue §4): every registered optimizer x every valid configuration.

On a tiny model with the tensor kinds real networks have — a free bias, a LayerNorm, a Linear, two
Conv1d weights ((6, 3, 3) and a 1x1 (8, 3, 1)) and a Conv2d weight (4, 3, 3, 3) — it checks the
policies every optimizer documents (README, "Policies every optimizer follows"; ``torchstep.optim._base``):

* an all-zero gradient for several steps (the step counts; as the first gradient ever seen, nothing moves
  in a group without weight decay — hybrids' AdamW groups carry ``fallback_weight_decay`` as their own);
* gradients of magnitude 1e-30, 1e+18, 1e+30 and 1e+38 (random signs; every entry finite): a gradient
  whose float32 squared norm is finite steps (all of them at 1e-30 and 1e+18), one whose squared norm
  overflows (all of them at 1e+30 and 1e+38: Adam's g² would be inf) is treated as non-finite and skipped
  (value, state and step counter untouched);
* fp16 / bf16 models: fp32 state, the update computed in fp32 and rounded once;
* a parameter with ``grad=None`` is untouched and gets no state;
* an unused parameter (``requires_grad=True``, not in the graph) survives Hessian refreshes
  (SophiaG/SophiaH: anything with ``update_hessian``) and ``step(closure)``.

After every case: parameters keep shape and dtype and stay finite, every floating state tensor is
finite, and its dtype is fp32 for bf16/fp16 parameters (the parameter's dtype otherwise).

New optimizers inherit all of it through the registry and ``tests/fixtures.py``.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

from helpers import all_configs, assert_state_equal

CONFIGS = all_configs()
IDS = [c[2] for c in CONFIGS]
HESSIAN = [c for c in CONFIGS if hasattr(c[0].cls, "update_hessian")]
LOW_PRECISION = (torch.float16, torch.bfloat16)

every_config = pytest.mark.parametrize("spec,kwargs,_id", CONFIGS, ids=IDS)


@pytest.fixture(autouse=True)
def _one_thread():
    """The tensors here are tiny: intra-op threads only cost barrier waits (2-3x slower on 2 shared cores,
    measured).  Restored after each test, so other modules in the same worker are unaffected."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# ---------------------------------------------------------------------- the model
class TinyNet(nn.Module):
    """Bias, LayerNorm, Linear, Conv1d (6, 3, 3) and (8, 3, 1), Conv2d (4, 3, 3, 3); optionally two
    parameters that require grad but never enter the graph."""

    def __init__(self, unused: bool = False) -> None:
        super().__init__()
        self.conv2d = nn.Conv2d(3, 4, 3, bias=False)      # (4, 3, 3, 3)
        self.conv1d = nn.Conv1d(3, 6, 3, bias=False)      # (6, 3, 3)
        self.pointwise = nn.Conv1d(3, 8, 1, bias=False)   # (8, 3, 1)
        self.norm = nn.LayerNorm(6)                       # weight (6,), bias (6,)
        self.linear = nn.Linear(4 + 6 + 8, 5)             # (5, 18), (5,)
        self.bias = nn.Parameter(torch.zeros(5))          # a free-standing bias
        if unused:
            self.unused_matrix = nn.Parameter(torch.randn(3, 4))
            self.unused_vector = nn.Parameter(torch.randn(3))

    def forward(self, images, signals):
        a = self.conv2d(images).mean(dim=(2, 3))                     # (B, 4)
        b = self.norm(self.conv1d(signals).mean(dim=-1))             # (B, 6)
        c = self.pointwise(signals).tanh().mean(dim=-1)              # (B, 8)
        return self.linear(torch.cat([a, b, c], dim=-1)) + self.bias


def make_model(dtype=torch.float32, unused=False, seed=0) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet(unused=unused)
    with torch.no_grad():   # a non-trivial LayerNorm and bias, so decay and projections see real values
        model.norm.weight.add_(0.1 * torch.randn(6))
        model.norm.bias.add_(0.1 * torch.randn(6))
        model.bias.add_(0.1 * torch.randn(5))
    return model.to(dtype)


def loss_of(model: TinyNet, k: int = 0) -> torch.Tensor:
    """A regression loss on batch ``k`` (deterministic data, in the model's dtype)."""
    dtype = model.linear.weight.dtype
    g = torch.Generator().manual_seed(100 + k)
    images = torch.randn(4, 3, 5, 5, generator=g).to(dtype)
    signals = torch.randn(4, 3, 7, generator=g).to(dtype)
    target = torch.randn(4, 5, generator=g).to(dtype)
    return (model(images, signals) - target).square().mean()


def used_params(model: TinyNet) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if not n.startswith("unused")]


def refresh_hessian(opt, model: TinyNet, k: int) -> None:
    """One Hessian refresh: ``update_hessian()`` reads ``.grad`` (SophiaG); ``update_hessian(loss)``
    builds its own create_graph gradients from a loss that still holds its graph (SophiaH)."""
    required = [q for q in inspect.signature(opt.update_hessian).parameters.values()
                if q.default is inspect.Parameter.empty and q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    if required:
        opt.update_hessian(loss_of(model, 1000 + k))
    else:
        opt.update_hessian()


def real_step(opt, model: TinyNet, k: int, hessian: bool = True) -> None:
    opt.zero_grad(set_to_none=True)
    loss_of(model, k).backward()
    if hessian and hasattr(opt, "update_hessian"):
        refresh_hessian(opt, model, k)   # SophiaG: from the gradients just computed
    opt.step()


# ---------------------------------------------------------------------- checks
def expected_state_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def health_problems(opt, model: TinyNet, dtype: torch.dtype, shapes: dict[str, torch.Size]) -> list[str]:
    """Every violation of: shapes/dtypes kept, parameters and floating state finite, state in the policy dtype."""
    problems = []
    for name, p in model.named_parameters():
        if p.shape != shapes[name]:
            problems.append(f"{name}: shape {tuple(p.shape)} != {tuple(shapes[name])}")
        if p.dtype != dtype:
            problems.append(f"{name}: dtype {p.dtype} != {dtype}")
        if not torch.isfinite(p).all():
            problems.append(f"{name}: non-finite parameter")
        for key, value in opt.state.get(p, {}).items():
            if not (torch.is_tensor(value) and value.is_floating_point()):
                continue
            if not torch.isfinite(value).all():
                problems.append(f"{name}: non-finite state[{key!r}]")
            # the step counter is always a float32 CPU tensor (checked by the conformance suite)
            if key != "step" and value.dtype != expected_state_dtype(p):
                problems.append(f"{name}: state[{key!r}] is {value.dtype}, expected {expected_state_dtype(p)}")
    return problems


def assert_healthy(opt, model: TinyNet, dtype: torch.dtype, shapes: dict[str, torch.Size]) -> None:
    problems = health_problems(opt, model, dtype, shapes)
    assert not problems, "; ".join(problems)


def shapes_of(model: TinyNet) -> dict[str, torch.Size]:
    return {n: p.shape for n, p in model.named_parameters()}


def step_count(opt, p) -> int:
    return int(opt.state[p]["step"])


def group_of(opt, p) -> dict:
    return next(g for g in opt.param_groups if any(q is p for q in g["params"]))


def no_state(opt, p) -> bool:
    return p not in opt.state or not opt.state[p]


def norm_is_finite(grad: torch.Tensor) -> bool:
    """The documented non-finite rule: a gradient counts as finite iff its float32 2-norm is."""
    return bool(torch.isfinite(torch.linalg.vector_norm(grad, dtype=torch.float32)))


# ---------------------------------------------------------------------- a) zero gradient
@every_config
def test_all_zero_gradient_for_several_steps(spec, kwargs, _id):
    model = make_model()
    shapes, params = shapes_of(model), list(model.parameters())
    opt = spec.cls(params, **kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(3):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        assert_healthy(opt, model, torch.float32, shapes)
    for name, p in model.named_parameters():
        assert step_count(opt, p) == 3, f"{name}: a zero gradient is finite, the step must count"
        # The zero gradient is the first (and only) gradient ever seen, so every moment/momentum is 0:
        # without weight decay nothing may move.
        # (With weight decay the parameters may move: decoupled decay shrinks them, coupled L2 — DiffGrad —
        # feeds λθ through Adam's normalisation, which legitimately steps across 0 for |θ| < lr.)
        if group_of(opt, p).get("weight_decay", 0.0) == 0:
            assert torch.equal(p, before[name]), \
                f"{name} moved on an all-zero first gradient without weight decay " \
                f"(max |Δ| = {(p - before[name]).abs().max().item():.3g})"


# ---------------------------------------------------------------------- b) tiny / huge gradients
@pytest.mark.parametrize("magnitude", [1e-30, 1e18, 1e30, 1e38], ids=["1e-30", "1e+18", "1e+30", "1e+38"])
@every_config
def test_tiny_and_huge_finite_gradients(spec, kwargs, _id, magnitude):
    model = make_model()
    shapes = shapes_of(model)
    named = list(model.named_parameters())
    opt = spec.cls([p for _, p in named], **kwargs)
    real_step(opt, model, 0)               # state exists, so "skipped" also means "state untouched"
    g = torch.Generator().manual_seed(7)
    overflowing_sum = False
    for _ in range(2):
        grads = {n: (torch.randint(0, 2, p.shape, generator=g) * 2 - 1).to(p.dtype) * magnitude for n, p in named}
        for n, p in named:
            assert torch.isfinite(grads[n]).all()   # every entry is a finite float32
            p.grad = grads[n]
        snap = {n: (p.detach().clone(), copy.deepcopy(opt.state[p])) for n, p in named}
        opt.step()
        assert_healthy(opt, model, torch.float32, shapes)
        for n, p in named:
            value, state = snap[n]
            if norm_is_finite(grads[n]):   # documented: a finite gradient steps
                assert magnitude < 1e19
                assert step_count(opt, p) == int(state["step"]) + 1, f"{n}: finite gradient not applied"
            else:                          # documented: a gradient whose squared norm overflows is skipped
                overflowing_sum = True
                assert torch.equal(p, value), f"{n}: overflowing gradient must leave the value untouched"
                assert_state_equal(opt.state[p], state)
    assert overflowing_sum == (magnitude >= 1e30)


# ---------------------------------------------------------------------- c) fp16 / bf16 models
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@every_config
def test_low_precision_model_fp32_state_and_rounded_update(spec, kwargs, _id, dtype):
    model = make_model(dtype)
    shapes = shapes_of(model)
    opt = spec.cls(list(model.parameters()), **kwargs)
    # fp32 twin with the same (upcast) values and the same (upcast) gradients: the low-precision
    # step must be the fp32 step rounded once.
    twin = copy.deepcopy(model).float()
    twin_opt = spec.cls(list(twin.parameters()), **kwargs)
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, 0)
    assert loss.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == dtype
        q.grad = p.grad.float()
    opt.step()
    twin_opt.step()
    assert_healthy(opt, model, dtype, shapes)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q.detach().to(dtype)), f"{name}: not the fp32 update rounded once"
        for key, value in opt.state[p].items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.equal(value, twin_opt.state[q][key]), f"{name}: state[{key!r}] differs from fp32"
    for k in range(1, 4):   # a few more real steps (with Hessian refreshes where the method takes them)
        real_step(opt, model, k)
        assert_healthy(opt, model, dtype, shapes)
    assert all(step_count(opt, p) == 4 for p in model.parameters())


# ---------------------------------------------------------------------- d) grad None among others
@every_config
def test_parameter_with_grad_none_is_untouched_and_stateless(spec, kwargs, _id):
    model = make_model()
    shapes = shapes_of(model)
    opt = spec.cls(list(model.parameters()), **kwargs)
    skipped = {"conv2d.weight": model.conv2d.weight, "norm.bias": model.norm.bias}   # a matrix and a vector
    before = {n: p.detach().clone() for n, p in skipped.items()}
    for k in range(2):
        opt.zero_grad(set_to_none=True)
        loss_of(model, k).backward()
        for p in skipped.values():
            p.grad = None
        if hasattr(opt, "update_hessian") and not inspect.signature(opt.update_hessian).parameters:
            opt.update_hessian()           # a .grad-reading refresh must skip grad-None parameters too
        opt.step()
        assert_healthy(opt, model, torch.float32, shapes)
    for name, p in skipped.items():
        assert torch.equal(p, before[name]), f"{name}: grad None but the value changed"
        assert no_state(opt, p), f"{name}: grad None but state was created: {sorted(opt.state[p])}"
    for name, p in model.named_parameters():
        if name not in skipped:
            assert step_count(opt, p) == 2, f"{name}: the other parameters must still step"


# ---------------------------------------------------------------------- e) unused parameters
def with_unused_parameters(spec, kwargs):
    """(model, shapes, optimizer, unused parameters by name, their values) for a model with unused tensors."""
    model = make_model(unused=True)
    opt = spec.cls(list(model.parameters()), **kwargs)
    unused = {"unused_matrix": model.unused_matrix, "unused_vector": model.unused_vector}
    return model, shapes_of(model), opt, unused, {n: p.detach().clone() for n, p in unused.items()}


@pytest.mark.parametrize("spec,kwargs,_id", HESSIAN, ids=[c[2] for c in HESSIAN])
def test_hessian_refresh_with_unused_parameter(spec, kwargs, _id):
    model, shapes, opt, unused, before = with_unused_parameters(spec, kwargs)
    for k in range(3):
        real_step(opt, model, k)           # refresh (unused parameter not in the graph), then step
        assert_healthy(opt, model, torch.float32, shapes)
        for name, p in unused.items():
            assert p.grad is None
            assert torch.equal(p, before[name]), f"{name}: unused parameter moved"
    for p in used_params(model):
        assert step_count(opt, p) == 3
        assert (opt.state[p]["hessian"] != 0).any(), "the refresh must reach the used parameters"


@every_config
def test_step_with_closure_and_unused_parameter(spec, kwargs, _id):
    model, shapes, opt, unused, before = with_unused_parameters(spec, kwargs)
    for k in range(2):
        def closure(k=k):
            opt.zero_grad(set_to_none=True)
            loss = loss_of(model, k)
            loss.backward()
            return loss
        loss = opt.step(closure)
        assert torch.is_tensor(loss) and torch.isfinite(loss)
        assert_healthy(opt, model, torch.float32, shapes)
    for name, p in unused.items():
        assert p.grad is None
        assert torch.equal(p, before[name]), f"{name}: unused parameter moved"
        assert no_state(opt, p), f"{name}: unused parameter got state"
    for p in used_params(model):
        assert step_count(opt, p) == 2
