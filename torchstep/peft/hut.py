r"""HUT — Hadamard Updated Transformation: the frozen weight is *transformed* element-wise by a low-rank matrix.

The rule (**reconstructed** — "the natural reading" of the card, ``shared/reference/peft.md`` §4)::

    W_new = W₀ ⊙ (M_A · M_B)          M_A ∈ R^{d_out×r}, M_B ∈ R^{r×d_in}
    h     = γ ⊙ (x·W_newᵀ + b₀) + β    γ, β ∈ R^{d_out} (optional learned scale and shift)

Init: M_A = [1 | U], M_B = [1ᵀ ; 0] (first column of M_A and first row of M_B all ones, the other r−1 columns of
M_A small uniform, the other rows of M_B zero), so M_A·M_B = 1 exactly and W_new = W₀ bitwise; γ = 1, β = 0.
Only M_A, M_B (and γ, β) are trainable; W₀ and b₀ stay frozen.  Mergeable: W = diag(γ)·W_new, b = γ⊙b₀ + β
(zero inference latency).  Gradients (derived): with G = ∂L/∂W_new, ∂L/∂M_A = (G ⊙ W₀)·M_Bᵀ and
∂L/∂M_B = M_Aᵀ·(G ⊙ W₀) — LoRA's gradients applied to the W₀-masked weight gradient.  W₀ ⊙ (a·bᵀ) = diag(a)·W₀·diag(b)
(rank 1 is an IA³/SSF-like pair of vector scalings); here the merged matrix is formed each forward
(d_out·d_in·r multiply-adds).

Paper: Zhang, Zhou, Chen, "HUT: A More Computation Efficient Fine-Tuning Method With Hadamard Updated
Transformation", arXiv 2409.13501 (no official code found).
Confirmed [abstract, read 2026-12 via the arXiv HTML mirror opening]: the "direct Updated Transformation"
paradigm W_new = U(W₀) (not W₀ + ΔW); HUT realises U "using the Hadamard transformation with two low-rank matrices";
evaluated on RoBERTa and GPT-2; [review] zero extra inference latency.
**Unverified (the method section could not be retrieved)**: (1) the exact formula — W₀ ⊙ (M_A·M_B) here; W₀ ⊙ (1 + M_A·M_B)
and a "sandwich" form are also consistent with the summaries; (2) the init (all-ones product here); (3) whether γ, β
exist and where they sit (after the bias here; ``scale_shift=False`` drops them); (4) the target modules of the
paper's experiments; (5) the FLOP claims and the RoBERTa-large parameter count (card test 4 is therefore not pinned).

Memory: (d_out + d_in)·r (+ 2·d_out for γ, β) trainable values per layer, plus the optimizer's state on them; a
transient d_out×d_in merged weight per forward.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class HUTLinear(nn.Module):
    r"""``h = γ ⊙ (x·(W₀ ⊙ (M_A·M_B))ᵀ + b₀) + β`` around a frozen ``nn.Linear`` (see the module docstring).

    Args:
        base: the ``nn.Linear`` to adapt (its weight and bias are frozen, kept as ``base``).
        r: rank ≥ 1 of M_A·M_B.
        scale_shift: learn γ, β ∈ R^{d_out} (default True; reconstructed).
        init_scale: half-width of the uniform init of M_A's columns 2…r (default 1/√r; M_B's rows 2…r are 0, so
            the product stays exactly 1 whatever this is).
    """

    def __init__(self, base: nn.Linear, r: int, scale_shift: bool = True, init_scale: float | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise ValueError(f"Invalid base: HUT adapts nn.Linear, got {type(base).__name__}")
        if not (isinstance(r, int) and r >= 1):
            raise ValueError(f"Invalid r: {r!r} (valid range: int >= 1)")
        self.base, self.r = base, r
        base.requires_grad_(False)
        d_out, d_in = base.weight.shape
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        m_a = torch.zeros(d_out, r, **kw)
        m_a[:, 0] = 1
        if r > 1:
            bound = 1 / math.sqrt(r) if init_scale is None else float(init_scale)
            m_a[:, 1:].uniform_(-bound, bound)
        m_b = torch.zeros(r, d_in, **kw)
        m_b[0] = 1
        self.hut_A, self.hut_B = nn.Parameter(m_a), nn.Parameter(m_b)
        if scale_shift:
            self.hut_gamma = nn.Parameter(torch.ones(d_out, **kw))
            self.hut_beta = nn.Parameter(torch.zeros(d_out, **kw))
        else:
            self.hut_gamma = self.hut_beta = None

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def transformed_weight(self) -> Tensor:
        """W_new = W₀ ⊙ (M_A·M_B)."""
        return self.base.weight * (self.hut_A @ self.hut_B)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.transformed_weight(), self.base.bias)
        if self.hut_gamma is not None:
            y = y * self.hut_gamma + self.hut_beta
        return y

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same map: W = diag(γ)·W_new, b = γ⊙b₀ + β."""
        W = self.transformed_weight()
        b = self.base.bias
        if self.hut_gamma is not None:
            W = W * self.hut_gamma[:, None]
            b = self.hut_beta + (self.hut_gamma * b if b is not None else 0)
        out = nn.Linear(self.in_features, self.out_features, bias=b is not None,
                        device=W.device, dtype=W.dtype)
        out.weight.copy_(W)
        if b is not None:
            out.bias.copy_(b)
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, scale_shift={self.hut_gamma is not None}"


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_hut(model: nn.Module, target_modules: str | Iterable[str], r: int = 8, scale_shift: bool = True,
              freeze_rest: bool = True) -> list[str]:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by :class:`HUTLinear` (in place).

    Args:
        model: any ``nn.Module``.
        target_modules: a regex fully matching module names, or a list of names / name suffixes (peft's convention).
        r: rank ≥ 1.
        scale_shift: learn γ, β (default True).
        freeze_rest: freeze every parameter that is not a HUT parameter (default True, as peft does).

    Returns the replaced module names.  Raises ``ValueError`` when a target is not an ``nn.Linear`` or nothing matches.
    """
    if not (isinstance(r, int) and r >= 1):
        raise ValueError(f"Invalid r: {r!r} (valid range: int >= 1)")
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules:
            raise ValueError("Invalid target_modules: empty")
    hits = [(n, m) for n, m in model.named_modules() if n and _matches(n, target_modules)]
    bad = [f"{n} ({type(m).__name__})" for n, m in hits if not isinstance(m, nn.Linear)]
    if bad:
        raise ValueError(f"Invalid target_modules: HUT adapts nn.Linear only, these targets are not: {bad}")
    if not hits:
        raise ValueError(f"Invalid target_modules: {target_modules!r} matches no module of the model")
    if freeze_rest:
        model.requires_grad_(False)
    for name, m in hits:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, HUTLinear(m, r, scale_shift=scale_shift))
    return [n for n, _ in hits]


def merge_hut(model: nn.Module) -> list[str]:
    """Replace every :class:`HUTLinear` by its merged ``nn.Linear`` (in place); returns the merged names."""
    names = [n for n, m in model.named_modules() if isinstance(m, HUTLinear)]
    if not names:
        raise ValueError("Invalid model: no HUTLinear modules to merge")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, getattr(parent, child).merged())
    return names


__all__ = ["HUTLinear", "apply_hut", "merge_hut"]
