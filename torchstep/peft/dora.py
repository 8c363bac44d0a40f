"""DoRA modules on the factored norm: a standalone :class:`DoRALinear` and :func:`patch_peft_dora` for peft models.

DoRA (paper arXiv 2402.09353): ``y = m ⊙ (W + s·BA)/‖W + s·BA‖_row · x + bias``, evaluated as
``base + (g − 1)⊙base + g⊙(s·lora)`` with ``base = x·Wᵀ``, ``lora = (x·Aᵀ)·Bᵀ``, ``g = m / ‖W + sBA‖_row`` and the
norm detached (DoRA §4.3: A and B get gradients only through the LoRA branch, m through g).  The norm is the
chunked factored norm and the compose the stable form of "Scaling DoRA" (paper arXiv 2603.22276), both from
:mod:`torchstep.ops.dora`.

This module imports only ``torch`` and ``torchstep.ops``; peft layers are recognised by duck typing.
"""
from __future__ import annotations

import math
import types
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from torchstep.ops.dora import FUSED_MODES, compose, factored_row_norm

__all__ = ["DoRALinear", "patch_peft_dora", "PeftDoRAPatch", "dora_scale"]


def dora_scale(r: int, alpha: float, use_rslora: bool = False) -> float:
    """LoRA scale s = α/r, or α/√r with rsLoRA (peft's ``scaling``)."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _check_chunk_mb(chunk_mb: Any) -> float:
    if isinstance(chunk_mb, bool) or not isinstance(chunk_mb, (int, float)) or not chunk_mb >= 0 \
            or math.isinf(chunk_mb):
        raise ValueError(f"chunk_mb must be a finite number >= 0 (MiB), got {chunk_mb!r}")
    return float(chunk_mb)


def _check_fused(fused: str) -> str:
    if fused not in FUSED_MODES:
        raise ValueError(f"fused must be one of {FUSED_MODES}, got {fused!r}")
    return fused


def _g_from(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """g = m / norm, divided in fp32 when the magnitude is bf16/fp16 (exactly 1 at init, no bf16 rounding of g)."""
    if magnitude.dtype in (torch.bfloat16, torch.float16):
        return magnitude.float() / norm.float()
    return magnitude / norm


class DoRALinear(nn.Module):
    """DoRA-adapted ``nn.Linear`` with the factored row norm and the stable compose (arXiv 2402.09353, 2603.22276).

    Math::

        s = α/r (α/√r if use_rslora);  norm = ‖W + s·BA‖_row (factored, detached);  g = m / norm
        y = x·Wᵀ + [g·(s·(x·Aᵀ)·Bᵀ) + (g − 1)·(x·Wᵀ)] + bias

    Initialisation as peft: ``lora_A`` (r, d_in) ``kaiming_uniform_(a=√5)``, ``lora_B`` (d_out, r) zeros,
    ``magnitude`` (d_out) = ‖W + s·BA‖_row = ‖W‖_row, so the module equals ``base`` at init.  The base layer is
    kept as ``base_layer`` and frozen (``requires_grad=False``).

    Args:
        base: the ``nn.Linear`` to adapt (its weight dtype/device are used for the new parameters).
        r: LoRA rank (≥ 1).
        alpha: LoRA α (peft ``lora_alpha``).
        use_rslora: s = α/√r instead of α/r (default False).
        chunk_mb: chunk budget of the norm in MiB (default 256, floor 16; negative is an error).
        fused: compose path, one of ``auto`` (default), ``eager``, ``function`` (closed-form backward),
            ``compile`` (torch.compile) or ``triton`` (UNTESTED, CUDA forward only).

    Deviations from peft: no LoRA dropout (dropout 0, peft's default), no ``lora_bias``; g is divided in fp32
    when the magnitude is bf16/fp16 (peft divides in the activation dtype) and the compose then runs in fp32
    and is cast back; the norm is accumulated in fp32 for bf16/fp16 weights (peft: in the activation dtype).

    Memory: transient O(d_out·r + r²) + one d_in chunk for the norm (peft: d_in² identity + d_out·d_in);
    parameters r·(d_in + d_out) + d_out.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, *, use_rslora: bool = False,
                 chunk_mb: float = 256, fused: str = "auto"):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive integer rank, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        self.chunk_mb = _check_chunk_mb(chunk_mb)
        self.fused = _check_fused(fused)
        self.r, self.alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.scaling = dora_scale(r, alpha, use_rslora)
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        W = base.weight
        d_out, d_in = W.shape
        self.in_features, self.out_features = d_in, d_out
        kw = dict(device=W.device, dtype=W.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **kw))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.magnitude = nn.Parameter(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """‖W + s·BA‖_row (factored, in W's dtype, no grad_fn)."""
        return factored_row_norm(self.base_layer.weight, self.lora_A, self.lora_B, self.scaling,
                                 chunk_mb=self.chunk_mb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.base_layer.weight
        base = F.linear(x, W)
        lora = F.linear(F.linear(x, self.lora_A), self.lora_B)
        g = _g_from(self.magnitude, self.weight_norm())
        out = base + compose(lora, base, g, self.scaling, fused=self.fused)
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        return out

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The merged weight ``(m/‖W + sBA‖_row)[:, None] · (W + s·BA)`` in W's dtype (detached, fp32 math).

        ``F.linear(x, merged_weight(), bias)`` equals the forward up to rounding; nothing is cached, so there is
        no lossy unmerge.  Memory: one d_out×d_in fp32 temporary.
        """
        W = self.base_layer.weight
        cd = torch.float32 if W.dtype in (torch.bfloat16, torch.float16) else W.dtype
        V = W.to(cd) + self.scaling * (self.lora_B.to(cd) @ self.lora_A.to(cd))
        g = self.magnitude.to(cd) / self.weight_norm().to(cd)
        return (g[:, None] * V).to(W.dtype)

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding :meth:`merged_weight` and a copy of the base bias."""
        W = self.base_layer.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                        device=W.device, dtype=W.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.merged_weight())
            if self.base_layer.bias is not None:
                lin.bias.copy_(self.base_layer.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, use_rslora={self.use_rslora}, fused={self.fused!r}")


# ------------------------------------------------------------------------------------------------ peft patch

def _factored_forward(self, x, *, lora_A, lora_B, scaling, base_layer, base_result=None, adapter_name="default",
                      **_unused):
    """Replacement for peft ``DoraLinearLayer.forward``: same contract (returns the DoRA *extra* output)."""
    cfg = self._torchstep_dora
    W = base_layer.weight
    if getattr(self, "fan_in_fan_out", False):
        W = W.t()
    W = W.to(x.dtype)
    norm = factored_row_norm(W, lora_A.weight.to(x.dtype), lora_B.weight.to(x.dtype), scaling,
                             chunk_mb=cfg["chunk_mb"])
    g = (self.weight / norm).view(1, -1)
    lora_result = lora_B(lora_A(x))
    if base_result is not None:
        bias = getattr(base_layer, "bias", None)
        if bias is not None:
            base_result = base_result - bias
    else:
        base_result = F.linear(x, W)
    return compose(lora_result, base_result, g, scaling, fused=cfg["fused"])


class PeftDoRAPatch:
    """Handle returned by :func:`patch_peft_dora`: ``restore()`` or use as a context manager."""

    def __init__(self, layers: List[nn.Module], names: List[str], skipped: Dict[str, str]):
        self._layers = layers
        self.names = names
        self.skipped = skipped

    def restore(self) -> None:
        """Put peft's own forward back on every patched layer (idempotent)."""
        for layer in self._layers:
            if "forward" in layer.__dict__:
                del layer.__dict__["forward"]
            layer.__dict__.pop("_torchstep_dora", None)
        self._layers = []

    def __enter__(self) -> "PeftDoRAPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __len__(self) -> int:
        return len(self.names)


def _adapter_module(module: nn.Module, attr: str, adapter: str) -> Optional[nn.Module]:
    d = getattr(module, attr, None)
    if isinstance(d, nn.ModuleDict) and adapter in d:
        return d[adapter]
    return None


def patch_peft_dora(model: nn.Module, *, chunk_mb: float = 256, fused: str = "auto") -> PeftDoRAPatch:
    """Swap the norm and compose of every peft DoRA Linear layer in ``model`` for the factored norm.

    Walks ``model.named_modules()`` for LoRA layers (duck-typed: a ``lora_magnitude_vector`` ModuleDict whose
    entries have ``get_weight_norm``) and replaces, per adapter whose ``lora_A``/``lora_B`` are ``nn.Linear``,
    the magnitude layer's ``forward`` (peft: identity through A and B, dense norm, compose) by one that computes
    ``g = m / factored_row_norm(W, A, B, s)`` and the stable compose.  Parameters, state_dict, merge/unmerge and
    peft's dropout handling (the caller passes ``base_result=None`` when dropout is active) are untouched.

    Skipped (reported in ``.skipped``, left as peft's): Conv and Embedding DoRA, ``lora_bias=True`` (peft then
    puts the bias into its BA), base weights that are not plain floating tensors (quantised layers).
    Deviation: peft's ``ENABLE_DORA_CACHING`` eval cache is not used by the patched forward.

    Args:
        model: a ``get_peft_model(..., LoraConfig(use_dora=True))`` model (or any module holding such layers).
        chunk_mb: norm chunk budget in MiB (default 256).
        fused: compose path (see :func:`torchstep.ops.dora.compose`).

    Returns:
        :class:`PeftDoRAPatch` (``.names`` = patched ``module.adapter`` names); ``restore()`` undoes it.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    chunk_mb = _check_chunk_mb(chunk_mb)
    _check_fused(fused)
    layers: List[nn.Module] = []
    names: List[str] = []
    skipped: Dict[str, str] = {}
    for mname, module in model.named_modules():
        mags = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(mags, nn.ModuleDict) or len(mags) == 0:
            continue
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else getattr(module, "base_layer", None)
        for adapter, mag in mags.items():
            key = f"{mname}.{adapter}"
            if not hasattr(mag, "get_weight_norm") or not isinstance(getattr(mag, "weight", None), torch.Tensor):
                skipped[key] = "not a DoRA magnitude layer"
                continue
            la, lb = _adapter_module(module, "lora_A", adapter), _adapter_module(module, "lora_B", adapter)
            if not isinstance(la, nn.Linear) or not isinstance(lb, nn.Linear):
                skipped[key] = "not a Linear DoRA layer (conv/embedding)"
                continue
            if lb.bias is not None:
                skipped[key] = "lora_bias=True"
                continue
            w = getattr(base, "weight", None)
            if not isinstance(w, torch.Tensor) or type(w) not in (torch.Tensor, nn.Parameter) \
                    or not w.is_floating_point() or w.ndim != 2:
                skipped[key] = "base weight is not a plain floating 2-D tensor (quantised?)"
                continue
            mag.__dict__["_torchstep_dora"] = {"chunk_mb": chunk_mb, "fused": fused}
            mag.__dict__["forward"] = types.MethodType(_factored_forward, mag)
            layers.append(mag)
            names.append(key)
    return PeftDoRAPatch(layers, names, skipped)
