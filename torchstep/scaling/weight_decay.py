"""Weight decay across widths (Fan, Liu, Zhao, Yuan, Gu, arXiv 2510.15262): λ for matrices ∝ (d/d₀)^κ with
the μP lr η ∝ d₀/d, vector-like parameters without decay; and the top-singular-value diagnostic."""
from __future__ import annotations

from typing import Mapping

import torch

from ..partition import MATRIX, param_groups


def width_scaled_groups(model: torch.nn.Module, lr: float, weight_decay: float, width: int, base_width: int,
                        wd_width_exponent: float = 0.5, vector_lr: float | None = None,
                        shapes: Mapping | None = None) -> list[dict]:
    """Param groups for AdamW-type training at ``width`` from a recipe tuned at ``base_width``.

    Hidden matrices: ``lr·d₀/d`` and ``λ·(d/d₀)^κ`` (κ = ``wd_width_exponent``, the paper's ½ by default); every
    other tensor: ``vector_lr`` (default ``lr``) and λ = 0.  Hidden means the partitioner's ``matrix`` label, or,
    with ``shapes`` (:func:`torchstep.scaling.infinite_shapes` / ``make_mup``), two width dimensions — which
    also makes an input layer such as an MLP's first Linear vector-like, as μP has it.  The decay is torch's
    decoupled ``θ ← θ(1 − ηλ)``, so the per-step factor ηλ scales as (d/d₀)^(κ−1).
    """
    if not (width > 0 and base_width > 0):
        raise ValueError(f"Invalid width: {width!r} / base_width {base_width!r} (valid range: both > 0)")
    ratio = width / base_width
    hidden = {"lr": lr / ratio, "weight_decay": weight_decay * ratio ** wd_width_exponent}
    vector = {"lr": lr if vector_lr is None else vector_lr, "weight_decay": 0.0}
    groups = param_groups(model)
    if shapes is None:
        return [{**g, **(hidden if g["name"] == MATRIX else vector)} for g in groups]
    out = []
    for g in groups:
        for kind, settings in (("hidden", hidden), ("vector", vector)):
            idx = [i for i, n in enumerate(g["param_names"]) if shapes[n].hidden == (kind == "hidden")]
            if idx:
                out.append({**g, **settings, "name": f"{g['name']}/{kind}", "params": [g["params"][i] for i in idx],
                            "param_names": [g["param_names"][i] for i in idx]})
    return out


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
