"""Which weight-decay width exponent κ keeps the top singular values matched across widths?

The check of Fan, Liu, Zhao, Yuan, Gu (arXiv 2510.15262): in a normalised (scale-invariant) network trained
with AdamW to its steady state, each matrix's top singular value is ≈ √(η/λ)·d^0.75; with μP's η ∝ 1/d it is
width-invariant exactly when λ ∝ d^½.  Here: an MLP ``d_in → w → w → w → d_out`` whose three first matrices
are each followed by a parameter-free LayerNorm (so they are scale-invariant, as in a Transformer), learning
a fixed random teacher, with :func:`torchstep.scaling.width_scaled_groups` at every κ — hidden matrices
(the two w×w, found by :func:`torchstep.scaling.infinite_shapes`) at ``lr·d₀/d`` and ``λ·(d/d₀)^κ``, every
other tensor at ``lr`` with λ = 0.  Reported: σ_max of each hidden matrix at the end, per width and κ, and
its spread across widths (max/min).  Theory predicts σ_max ∝ d^(¼ − κ/2): growing for κ = 0, flat for ½,
shrinking for 1.  Run by ``torchstep wd-sweep`` (docs/weight-decay-width.md).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..scaling import infinite_shapes, top_singular_values, width_scaled_groups


@dataclass(frozen=True)
class WdResult:
    exponent: float
    width: int
    sigma_max: dict[str, float]      # hidden matrix → top singular value at the end
    final_loss: float


class _NormedMLP(nn.Module):
    def __init__(self, d_in: int, width: int, d_out: int):
        super().__init__()
        self.inp = nn.Linear(d_in, width, bias=False)
        self.h1 = nn.Linear(width, width, bias=False)
        self.h2 = nn.Linear(width, width, bias=False)
        self.head = nn.Linear(width, d_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in (self.inp, self.h1, self.h2):
            x = F.relu(F.layer_norm(layer(x), (layer.out_features,)))
        return self.head(x)


def run(exponent: float, width: int, base_width: int = 64, steps: int = 2000, lr: float = 3e-3,
        weight_decay: float = 0.5, d_in: int = 32, d_out: int = 8, batch: int = 64, seed: int = 0) -> WdResult:
    """Train at ``width`` with the recipe (lr, λ) tuned at ``base_width`` moved by κ = ``exponent``."""
    torch.manual_seed(10_000 + seed)
    teacher = _NormedMLP(d_in, 64, d_out)            # the same teacher at every width and κ
    torch.manual_seed(seed)
    model = _NormedMLP(d_in, width, d_out)
    with torch.device("meta"):                       # shapes only
        shapes = infinite_shapes(model, _NormedMLP(d_in, base_width, d_out),
                                 delta=_NormedMLP(d_in, 2 * base_width, d_out))
    opt = torch.optim.AdamW(width_scaled_groups(model, lr, weight_decay, width, base_width, exponent,
                                                shapes=shapes))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, d_in, generator=g)
        with torch.no_grad():
            y = teacher(x)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = torch.randn(1024, d_in, generator=torch.Generator().manual_seed(10_000 + seed))
        final = float(F.mse_loss(model(x), teacher(x)))
    hidden = {n for n, s in shapes.items() if s.hidden}
    sigma = {n: v for n, v in top_singular_values(model).items() if n in hidden}
    return WdResult(exponent, width, sigma, final)


def sweep(exponents=(0.0, 0.5, 1.0), widths=(64, 128, 256, 512), **kwargs) -> list[WdResult]:
    """:func:`run` for every (κ, width)."""
    return [run(k, w, **kwargs) for k in exponents for w in widths]


def spread(results: list[WdResult], exponent: float, matrix: str | None = None) -> float:
    """max/min across widths of σ_max of ``matrix`` (default: the mean over hidden matrices) at κ = ``exponent``
    (1 = perfectly matched)."""
    values = [r.sigma_max[matrix] if matrix else sum(r.sigma_max.values()) / len(r.sigma_max)
              for r in results if r.exponent == exponent]
    return max(values) / min(values)


__all__ = ["WdResult", "run", "sweep", "spread"]
