"""Weight decay across widths (Fan, Liu, Zhao, Yuan, Gu, arXiv 2510.15262): λ for matrices ∝ (d/d₀)^κ with
the μP lr η ∝ d₀/d, vector-like parameters without decay; and the top-singular-value diagnostic."""
from __future__ import annotations

import torch

from ..partition import MATRIX, param_groups


def width_scaled_groups(model: torch.nn.Module, lr: float, weight_decay: float, width: int, base_width: int,
                        wd_width_exponent: float = 0.5, vector_lr: float | None = None) -> list[dict]:
    """Param groups for AdamW-type training at ``width`` from a recipe tuned at ``base_width``.

    Hidden matrices: ``lr·d₀/d`` and ``λ·(d/d₀)^κ`` (κ = ``wd_width_exponent``, the paper's ½ by default); every
    other tensor (embeddings, head, norms, biases: the partitioner's labels): ``vector_lr`` (default ``lr``) and
    λ = 0.  The decay is torch's decoupled ``θ ← θ(1 − ηλ)``, so the per-step factor ηλ scales as (d/d₀)^(κ−1).
    """
    if not (width > 0 and base_width > 0):
        raise ValueError(f"Invalid width: {width!r} / base_width {base_width!r} (valid range: both > 0)")
    ratio = width / base_width
    groups = param_groups(model)
    for g in groups:
        if g["name"] == MATRIX:
            g.update(lr=lr / ratio, weight_decay=weight_decay * ratio ** wd_width_exponent)
        else:
            g.update(lr=lr if vector_lr is None else vector_lr, weight_decay=0.0)
    return groups


@torch.no_grad()
def top_singular_values(model: torch.nn.Module) -> dict[str, float]:
    """σ_max of every hidden matrix (flattened ``(out, prod(rest))``), by parameter name — the paper's check:
    with the right κ these stay matched across widths."""
    out = {}
    for g in param_groups(model):
        if g["name"] == MATRIX:
            for name, p in zip(g["param_names"], g["params"]):
                out[name] = float(torch.linalg.matrix_norm(p.detach().float().reshape(p.shape[0], -1), ord=2))
    return out


__all__ = ["width_scaled_groups", "top_singular_values"]
