"""CUDA checks (``pytest -m cuda``; skipped without a GPU, so CI never runs them — ``scripts/cuda_check.sh`` does where a
GPU is lent).  Status: **written, not yet run on a GPU** (no device was lent to the sessions so far; docs/speed-cuda.md).

* every registered optimizer on CUDA equals the same optimizer on CPU (fp32, 10 steps, tolerance below), and with bf16
  parameters stays within the bf16 band of the fp32 CPU run;
* with ``nonfinite="ignore"`` (the policy without the finite check's host read) a step triggers no host sync
  (``torch.cuda.set_sync_debug_mode("error")``); optimizers known to read device values are listed in
  :data:`SYNCS_EXPECTED` with the reason, so a new sync is a test failure, not a silent slowdown.
"""
from __future__ import annotations

import pytest
import torch

from fixtures import FIXTURES as SPECS
from helpers import make_params, toy_loss

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

#: optimizers whose step reads a device value on the host (to be confirmed on a GPU; empty until measured)
SYNCS_EXPECTED: dict[str, str] = {}
FP32_TOL = 1e-5     # CPU vs CUDA kernels (reduction order, TF32 off) after 10 steps
BF16_TOL = 5e-2     # bf16 parameters vs the fp32 reference, relative to the parameter's scale


def _run(name, device, dtype, steps=10, **extra):
    spec = SPECS[name]
    params = [p.detach().to(device=device, dtype=dtype).requires_grad_() for p in make_params()]
    opt = spec.cls(params, **{**spec.base_kwargs, **extra})
    for k in range(steps):
        opt.zero_grad(set_to_none=True)
        toy_loss(params, k).backward()
        opt.step()
    return [p.detach().to("cpu", torch.float32) for p in params], opt, params


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cuda_equals_cpu_fp32(name):
    cpu, _, _ = _run(name, "cpu", torch.float32)
    gpu, _, _ = _run(name, "cuda", torch.float32)
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, rtol=FP32_TOL, atol=FP32_TOL)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_cuda_bf16_parameters_track_fp32(name):
    ref, _, _ = _run(name, "cpu", torch.float32)
    low, opt, params = _run(name, "cuda", torch.bfloat16)
    for a, b in zip(ref, low):
        assert (b - a).abs().max() <= BF16_TOL * max(1.0, a.abs().max().item())
    for p in params:                             # fp32 state for bf16 parameters (the low-precision policy)
        assert all(v.dtype == torch.float32 for v in opt.state[p].values()
                   if torch.is_tensor(v) and v.is_floating_point() and v.dim() > 0)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_step_without_host_sync(name):
    _, opt, params = _run(name, "cuda", torch.float32, steps=3, nonfinite="ignore")
    opt.zero_grad(set_to_none=True)
    toy_loss(params, 3).backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if name in SYNCS_EXPECTED:
            with pytest.raises(RuntimeError):
                opt.step()
        else:
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _compilable(name):
    return getattr(getattr(SPECS[name].cls, "rule", None), "compilable", False)


@pytest.mark.parametrize("name", [n for n in sorted(SPECS) if _compilable(n)])
def test_compiled_mask_step_equals_eager_without_host_sync(name):
    """``compile=True`` (Triton) with the sync-free ``nonfinite="mask"`` policy: equals the eager CPU run and
    a step (after compilation) never waits on the device, also with a NaN gradient."""
    cpu, _, _ = _run(name, "cpu", torch.float32)
    gpu, opt, params = _run(name, "cuda", torch.float32, compile=True, nonfinite="mask")
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b, a, rtol=FP32_TOL, atol=FP32_TOL)
    opt.zero_grad(set_to_none=True)
    toy_loss(params, 10).backward()
    params[0].grad.view(-1)[0] = float("nan")
    before = params[0].detach().clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(params[0], before)
