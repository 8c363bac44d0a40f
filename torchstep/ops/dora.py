"""DoRA tensor math: the chunked factored row norm of W + s·BA and the stable compose (pure functions).

DoRA (paper arXiv 2402.09353) rescales each output row of the adapted weight,
``W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_row``, with the norm treated as a constant for autograd (DoRA §4.3).
"Scaling DoRA" (paper arXiv 2603.22276, official repo sockeye44/dorafactors) computes that norm without
materialising BA::

    ‖W + sBA‖²_row = ‖W‖²_row + 2s·⟨W, BA⟩_row + s²·‖BA‖²_row
    ⟨W, BA⟩_j = Σ_l B_jl·U_jl,   U = W·Aᵀ   (d_out × r, accumulated over d_in chunks)
    ‖BA‖²_j   = Σ_l (B·G ⊙ B)_jl, G = A·Aᵀ   (r × r)

and applies the rescale to an activation with the *stable* compose
``out = (g − 1)⊙base + g⊙(s·lora)`` (evaluated as ``g·(s·lora) + (g − 1)·base``) instead of the naive
``g⊙(s·lora + base) − base``, which cancels catastrophically in bf16 when g ≈ 1.

Notation: W ∈ R^{d_out×d_in} (``nn.Linear.weight`` rows), A ∈ R^{r×d_in}, B ∈ R^{d_out×r}, s = α/r
(rsLoRA: α/√r), ``base = x·Wᵀ`` (no bias), ``lora = (x·Aᵀ)·Bᵀ`` (unscaled), ``g = m / norm``.

Memory: the factored norm needs O(d_out·r + r²) accumulators plus one d_in chunk of W and A in the compute
dtype (the chunk is sized from a MB budget, :func:`dora_chunk_size`); peft's dense norm needs an identity of
size d_in² plus the dense d_out×d_in BA and W + sBA.  FLOPs are the same order as forming BA (d_out·d_in·r),
so the win is memory, not FLOPs.

Nothing here imports peft; :mod:`torchstep.peft.dora` wires it into modules.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "dora_chunk_size", "factored_row_norm", "dense_row_norm",
    "dora_compose", "dora_compose_", "dora_compose_fused", "DoRAComposeFunction",
    "dora_compose_compiled", "dora_compose_triton", "TRITON_AVAILABLE", "compose",
    "FUSED_MODES", "MIN_CHUNK_MB",
]

MIN_CHUNK_MB = 16
"""Smallest chunk budget honoured (the reference clamps ``PEFT_DORA_NORM_CHUNK_MB`` to at least 16 MB)."""

_MB = 1024 * 1024
_LOW = (torch.bfloat16, torch.float16)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for bf16/fp16 inputs, otherwise the input dtype (fp32/fp64)."""
    return torch.float32 if dtype in _LOW else dtype


def _default_eps(norm_dtype: torch.dtype) -> float:
    """ε clamp of the norm: 1e-6 when the norm is returned in bf16/fp16, else 1e-12."""
    return 1e-6 if norm_dtype in _LOW else 1e-12


def dora_chunk_size(d_out: int, d_in: int, r: int, element_size: int, budget_mb: float = 256,
                    device_type: str = "cpu") -> int:
    """Width of the d_in chunk used by :func:`factored_row_norm` under a memory budget.

    Math (element size e of the compute dtype, budget M = max(budget_mb, 16) MiB)::

        full  = ((d_out + r)·d_in + d_out·r + r²)·e
        chunk = d_in                                   if full ≤ M
        chunk = ⌊(M − (d_out·r + r²)·e) / ((d_out + r)·e)⌋ clipped to [1, d_in]   otherwise
        on cuda/xpu a chunk > 64 is rounded down to a multiple of 64

    Pinned (fp32, 256 MB): (4096, 11008, 64) → 11008; (8192, 28672, 384) → 7441 on CPU, 7424 on CUDA;
    (8192, 8192, 384) → 7424 on CUDA (Scaling DoRA, arXiv 2603.22276, reference code).

    Args:
        d_out, d_in, r: weight rows, weight columns, LoRA rank (all ≥ 1).
        element_size: bytes per element of the compute dtype (4 for fp32 accumulation).
        budget_mb: memory budget in MiB (default 256); values below 16 are raised to 16; negative is an error.
        device_type: ``"cpu"`` (default), ``"cuda"`` or ``"xpu"`` (the latter two align to 64).
    """
    for name, v in (("d_out", d_out), ("d_in", d_in), ("r", r), ("element_size", element_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not (budget_mb >= 0) or math.isinf(budget_mb):
        raise ValueError(f"budget_mb must be a finite number >= 0, got {budget_mb!r}")
    budget = int(max(float(budget_mb), MIN_CHUNK_MB) * _MB)
    e = int(element_size)
    full = ((d_out + r) * d_in + d_out * r + r * r) * e
    if full <= budget:
        return int(d_in)
    chunk = (budget - (d_out * r + r * r) * e) // ((d_out + r) * e)
    chunk = max(1, min(int(chunk), int(d_in)))
    if device_type in ("cuda", "xpu") and chunk > 64:
        chunk = chunk // 64 * 64
    return chunk


def _check_factors(W: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor]) -> None:
    if not isinstance(W, torch.Tensor) or W.ndim != 2:
        raise ValueError(f"W must be a 2-D tensor (d_out, d_in), got {getattr(W, 'shape', type(W))}")
    if not W.is_floating_point():
        raise ValueError(f"W must be floating point, got {W.dtype}")
    if A is None or B is None:
        return
    if A.ndim != 2 or A.shape[1] != W.shape[1]:
        raise ValueError(f"A must have shape (r, {W.shape[1]}), got {tuple(A.shape)}")
    if B.ndim != 2 or B.shape != (W.shape[0], A.shape[0]):
        raise ValueError(f"B must have shape ({W.shape[0]}, {A.shape[0]}), got {tuple(B.shape)}")


def factored_row_norm(W: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], scale: float, *,
                      chunk_mb: float = 256, eps: Optional[float] = None,
                      chunk_size: Optional[int] = None) -> torch.Tensor:
    """Row norm ‖W + s·BA‖_row without materialising BA (Scaling DoRA, arXiv 2603.22276).

    Math (compute dtype c = fp32 for bf16/fp16 W, else W's dtype; autocast off; under ``no_grad``)::

        for each d_in chunk C:  base += Σ_C W∘W ;  U += W_C·A_Cᵀ ;  G += A_C·A_Cᵀ
        cross = Σ_k B∘U ;  ba = Σ_k (B·G)∘B
        norm  = max(√max(base + 2s·cross + s²·ba, 0), ε)      # s == 0: norm = ‖W‖_row, A and B unused

    Args:
        W: base weight (d_out, d_in).
        A: LoRA down factor (r, d_in); may be ``None`` when ``scale == 0``.
        B: LoRA up factor (d_out, r); may be ``None`` when ``scale == 0``.
        scale: s (α/r, or α/√r for rsLoRA).
        chunk_mb: memory budget for one chunk in MiB (default 256, floor 16, see :func:`dora_chunk_size`).
        eps: clamp of the norm; default 1e-12 when the returned norm is fp32/fp64, 1e-6 when bf16/fp16.
        chunk_size: explicit chunk width along d_in (overrides ``chunk_mb``; for tests).

    Returns:
        The (d_out,) norm in W's dtype, with no ``grad_fn`` (a constant for autograd, DoRA §4.3).

    Memory: accumulators d_out·r + r² + d_out in the compute dtype, plus one chunk of W and A cast to it.
    Deviation from the reference: none known; the clamp at 0 before the sqrt guards round-off of the expanded
    square, which can make base + 2s·cross + s²·ba slightly negative for a (near-)zero row.
    """
    _check_factors(W, A, B)
    if not (chunk_mb >= 0):
        raise ValueError(f"chunk_mb must be >= 0, got {chunk_mb!r}")
    s = float(scale)
    if not math.isfinite(s):
        raise ValueError(f"scale must be finite, got {scale!r}")
    if s != 0.0 and (A is None or B is None):
        raise ValueError("A and B are required when scale != 0")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    out_dtype = W.dtype
    cd = _compute_dtype(out_dtype)
    e = _default_eps(out_dtype) if eps is None else float(eps)
    d_out, d_in = W.shape
    with torch.no_grad(), torch.autocast(device_type=W.device.type, enabled=False):
        W = W.detach()
        if s == 0.0:
            r = 1
        else:
            r = A.shape[0]
            A = A.detach()
            B = B.detach()
        if chunk_size is None:
            chunk = dora_chunk_size(d_out, d_in, r, torch.tensor([], dtype=cd).element_size(), chunk_mb,
                                    W.device.type)
        else:
            chunk = min(int(chunk_size), d_in)
        base = torch.zeros(d_out, dtype=cd, device=W.device)
        if s != 0.0:
            U = torch.zeros(d_out, r, dtype=cd, device=W.device)
            G = torch.zeros(r, r, dtype=cd, device=W.device)
        for start in range(0, d_in, chunk):
            Wc = W[:, start:start + chunk].to(cd)
            base += torch.einsum("ij,ij->i", Wc, Wc)
            if s != 0.0:
                Ac = A[:, start:start + chunk].to(device=W.device, dtype=cd)
                U.addmm_(Wc, Ac.t())
                G.addmm_(Ac, Ac.t())
            del Wc
        if s == 0.0:
            sq = base
        else:
            Bc = B.to(device=W.device, dtype=cd)
            cross = torch.einsum("ij,ij->i", Bc, U)
            ba = torch.einsum("ij,ij->i", Bc @ G, Bc)
            sq = base + (2.0 * s) * cross + (s * s) * ba
        norm = sq.clamp_min(0).sqrt().clamp_min(e)
        return norm.to(out_dtype)


def dense_row_norm(W: torch.Tensor, A: Optional[torch.Tensor], B: Optional[torch.Tensor], scale: float, *,
                   eps: Optional[float] = None) -> torch.Tensor:
    """Reference ‖W + s·BA‖_row with BA materialised (what peft does, minus its d_in×d_in identity).

    Same dtype policy, ε clamp and ``no_grad`` as :func:`factored_row_norm`; memory O(d_out·d_in).
    """
    _check_factors(W, A, B)
    out_dtype = W.dtype
    cd = _compute_dtype(out_dtype)
    e = _default_eps(out_dtype) if eps is None else float(eps)
    with torch.no_grad(), torch.autocast(device_type=W.device.type, enabled=False):
        M = W.detach().to(cd)
        if float(scale) != 0.0:
            M = M + float(scale) * (B.detach().to(cd) @ A.detach().to(cd))
        return torch.linalg.vector_norm(M, dim=1).clamp_min(e).to(out_dtype)


# ----------------------------------------------------------------------------------------------------- compose

def _promoted(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(lora.dtype, base.dtype), g.dtype)


def _compose_math(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, s: float) -> torch.Tensor:
    """g·(s·lora) + (g − 1)·base in this exact order (all operands already in one dtype)."""
    t = lora * s
    t = g * t
    return t + (g - 1) * base


def dora_compose(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """Stable DoRA compose ``out = (g − 1)⊙base + g⊙(s·lora)``, plain eager ops (autograd traces them).

    Math: evaluated as ``g·(s·lora) + (g − 1)·base`` — scale first, then g, then the base term — in the
    promoted dtype of (lora, base, g) (fp32 g with bf16 activations runs in fp32) and cast back to
    ``lora``'s dtype.  The naive ``g⊙(s·lora + base) − base`` cancels when g ≈ 1 (arXiv 2603.22276).

    Args:
        lora: unscaled LoRA branch output (..., d_out).
        base: base output without bias (..., d_out).
        g: m / norm, broadcastable to the last dim ((d_out,) or (1, d_out)).
        scale: s.

    Memory: one promoted-dtype temporary per operand when dtypes differ, else two lora-sized temporaries.
    """
    pd = _promoted(lora, base, g)
    out = _compose_math(lora.to(pd), base.to(pd), g.to(pd), float(scale))
    return out.to(lora.dtype)


def dora_compose_(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, *,
                  chunk_mb: float = 256) -> torch.Tensor:
    """In-place :func:`dora_compose`: overwrites and returns ``lora``; bitwise equal to the out-of-place one.

    When all dtypes agree the ops run in place on ``lora`` in the same order (``lora *= s; lora *= g;
    lora += (g − 1)·base``).  With mixed dtypes the promoted-dtype evaluation is done over row chunks of at
    most ``chunk_mb`` MiB (so the transient stays bounded) and copied back — the same elementwise ops and
    casts as out-of-place, hence the same bits.  Not for tensors that need autograd.
    """
    if lora.requires_grad and torch.is_grad_enabled():
        raise ValueError("lora must not require grad for the in-place compose (use dora_compose)")
    if not (chunk_mb >= 0):
        raise ValueError(f"chunk_mb must be >= 0, got {chunk_mb!r}")
    s = float(scale)
    pd = _promoted(lora, base, g)
    if pd == lora.dtype == base.dtype == g.dtype:
        lora.mul_(s)
        lora.mul_(g)
        lora.add_((g - 1) * base)
        return lora
    d = lora.shape[-1]
    flat = lora.reshape(-1, d)                     # a view for contiguous activations
    fb = base.expand_as(lora).reshape(-1, d)
    gp = g.to(pd)
    per_col = gp.numel() == d
    gp = gp.reshape(d) if per_col else gp.expand(*lora.shape).reshape(-1, d)
    esz = torch.tensor([], dtype=pd).element_size()
    rows = max(1, int(max(chunk_mb, MIN_CHUNK_MB) * _MB) // max(1, 3 * d * esz))
    for i in range(0, flat.shape[0], rows):
        gi = gp if per_col else gp[i:i + rows]
        out = _compose_math(flat[i:i + rows].to(pd), fb[i:i + rows].to(pd), gi, s)
        flat[i:i + rows].copy_(out.to(lora.dtype))
    if flat.data_ptr() != lora.data_ptr():         # non-contiguous input: reshape copied
        lora.copy_(flat.reshape(lora.shape))
    return lora


class DoRAComposeFunction(torch.autograd.Function):
    """Stable compose with the closed-form backward (Scaling DoRA, arXiv 2603.22276, "fused backward").

    With ``inner = s·lora + base`` (so ``out = g⊙inner − base``)::

        d_lora = g·s·d_out ;  d_base = (g − 1)·d_out ;  d_g = Σ_{broadcast dims} inner⊙d_out

    ``inner`` is saved only when g requires grad (a frozen magnitude adds no activation); otherwise only g is
    saved.  Forward bits equal :func:`dora_compose`; the backward equals autograd through it up to rounding.
    """

    @staticmethod
    def forward(ctx, lora, base, g, scale):
        s = float(scale)
        pd = _promoted(lora, base, g)
        lp, bp, gp = lora.to(pd), base.to(pd), g.to(pd)
        out = _compose_math(lp, bp, gp, s).to(lora.dtype)
        ctx.s = s
        ctx.dtypes = (lora.dtype, base.dtype, g.dtype)
        ctx.g_shape = g.shape
        ctx.base_shape = base.shape
        if ctx.needs_input_grad[2]:
            inner = lp * s + bp
            ctx.save_for_backward(g, inner)
        else:
            ctx.save_for_backward(g)
        return out

    @staticmethod
    def backward(ctx, d_out):
        saved = ctx.saved_tensors
        g = saved[0]
        s = ctx.s
        ld, bd, gd = ctx.dtypes
        pd = torch.promote_types(torch.promote_types(ld, bd), gd)
        go = d_out.to(pd)
        gp = g.to(pd)
        d_lora = d_base = d_g = None
        if ctx.needs_input_grad[0]:
            d_lora = ((gp * s) * go).to(ld)
        if ctx.needs_input_grad[1]:
            d_base = ((gp - 1) * go).to(bd)
            if d_base.shape != ctx.base_shape:
                d_base = d_base.sum_to_size(ctx.base_shape)
        if ctx.needs_input_grad[2]:
            inner = saved[1]
            d_g = (inner * go).sum_to_size(ctx.g_shape).to(gd)
        return d_lora, d_base, d_g, None


def dora_compose_fused(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """:class:`DoRAComposeFunction` applied (custom autograd, closed-form backward)."""
    return DoRAComposeFunction.apply(lora, base, g, float(scale))


_COMPILED = None


def dora_compose_compiled(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float) -> torch.Tensor:
    """:func:`dora_compose` through ``torch.compile`` (Inductor fuses the elementwise chain into one loop).

    Agrees with eager to fp32 rounding (Inductor may reassociate/FMA-contract, so not bitwise).  First call
    compiles (seconds; needs a C++ compiler on CPU).  See docs/peft-dora.md for whether it wins on CPU.
    """
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(dora_compose, dynamic=False, fullgraph=True)
    return _COMPILED(lora, base, g, scale)


# ------------------------------------------------------------------------------------------ Triton (UNTESTED)
try:  # pragma: no cover - triton is absent on the CPU machines this library is tested on
    import triton
    import triton.language as tl
    TRITON_AVAILABLE = True
except Exception:  # noqa: BLE001 - any import failure means "no triton"
    triton = tl = None
    TRITON_AVAILABLE = False

if TRITON_AVAILABLE:  # pragma: no cover
    @triton.jit
    def _dora_compose_kernel(lora_ptr, base_ptr, g_ptr, out_ptr, inner_ptr, n_elem, d_out, s,
                             SAVE_INNER: tl.constexpr, BLOCK: tl.constexpr):
        # UNTESTED: written without a GPU.  One program per BLOCK contiguous elements of (rows, d_out).
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_elem
        col = offs % d_out
        lo = tl.load(lora_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        ba = tl.load(base_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gg = tl.load(g_ptr + col, mask=mask, other=1.0).to(tl.float32)
        t = lo * s
        out = gg * t + (gg - 1.0) * ba
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_INNER:
            tl.store(inner_ptr + offs, (t + ba).to(inner_ptr.dtype.element_ty), mask=mask)


def dora_compose_triton(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float,
                        *, save_inner: bool = False):
    """UNTESTED Triton forward of the stable compose (CUDA only; no GPU was available when it was written).

    Computes ``out = g·(s·lora) + (g − 1)·base`` in fp32 registers (and optionally ``inner = s·lora + base``)
    in one pass over memory.  Not differentiable by itself and never selected automatically: pass
    ``fused="triton"`` explicitly; the result should agree with :func:`dora_compose` within O(ε) (FMA), not
    bitwise.  Raises ``RuntimeError`` without triton or a CUDA tensor.  Returns ``out`` or ``(out, inner)``.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError("triton is not installed; dora_compose_triton is unavailable")
    if lora.device.type != "cuda":
        raise RuntimeError("dora_compose_triton needs CUDA tensors")
    d = lora.shape[-1]
    lora_c = lora.contiguous()
    base_c = base.expand_as(lora).contiguous()
    g_c = g.reshape(-1).contiguous()
    if g_c.numel() != d:
        raise ValueError(f"g must have {d} elements (one per output feature), got {g_c.numel()}")
    out = torch.empty_like(lora_c)
    inner = torch.empty_like(lora_c) if save_inner else out
    n = lora_c.numel()
    block = 1024
    _dora_compose_kernel[(triton.cdiv(n, block),)](lora_c, base_c, g_c, out, inner, n, d, float(scale),
                                                   SAVE_INNER=save_inner, BLOCK=block)
    return (out, inner) if save_inner else out


# ------------------------------------------------------------------------------------------------ dispatch
FUSED_MODES = ("auto", "eager", "function", "compile", "triton")

# Crossover of the reference implementation for the closed-form backward: last dim ≥ 2048 and
# rows·cols ≥ 2048·6144 (measured on GPUs; kept as the CPU default too, see docs/peft-dora.md).
_AUTO_MIN_COLS = 2048
_AUTO_MIN_ELEMS = 2048 * 6144


def compose(lora: torch.Tensor, base: torch.Tensor, g: torch.Tensor, scale: float, *,
            fused: str = "auto") -> torch.Tensor:
    """Dispatch the stable compose: ``eager`` | ``function`` (closed-form backward) | ``compile`` | ``triton``.

    ``auto`` (default) uses the closed-form backward only for large activations (last dim ≥ 2048 and
    numel ≥ 2048·6144), else eager.  ``triton`` is UNTESTED, forward-only, and used only when no gradient
    is needed (otherwise it falls back to ``function``).
    """
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be one of {FUSED_MODES}, got {fused!r}")
    if fused == "auto":
        big = lora.shape[-1] >= _AUTO_MIN_COLS and lora.numel() >= _AUTO_MIN_ELEMS
        fused = "function" if big else "eager"
    if fused == "eager":
        return dora_compose(lora, base, g, scale)
    if fused == "function":
        return dora_compose_fused(lora, base, g, scale)
    if fused == "compile":
        return dora_compose_compiled(lora, base, g, scale)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (lora, base, g))
    if needs_grad or not TRITON_AVAILABLE or lora.device.type != "cuda":
        return dora_compose_fused(lora, base, g, scale)
    return dora_compose_triton(lora, base, g, scale)
