"""Fira — GaLore's low-rank Adam plus the norm-scaled full-rank residual (Chen et al., arXiv 2410.01623)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.projectors import project_back
from ._base import check_choice, check_range, invalid
from .galore import ProjectedOptimizer, ProjectedRule, projection_defaults

SCALINGS = ("column", "matrix")
_TINY = 1e-8            # the official code's ε in φ and in the limiter


def _norm_scaling(low: Tensor, direction: Tensor, basis: dict, group: dict) -> Tensor:
    """φ = ‖ψ(R)‖/‖R‖: per index of the non-projected side (``column``: the paper's default "Fira" and the
    official code — the norm runs over the rank dimension), or one scalar (``matrix``, "Fira-matrix").

    The rank dimension is read from the basis (left projection: R is r×n, norms over dim 0); the official
    code reads it from R's shape, which agrees except for a square R (a left projection of a tall matrix at
    full short-side rank), where its factors do not broadcast and it fails."""
    if group["scaling"] == "matrix":
        return torch.linalg.vector_norm(direction) / (torch.linalg.vector_norm(low) + _TINY)
    dim = 0 if "u" in basis else 1
    phi = torch.linalg.vector_norm(direction, dim=dim) / (torch.linalg.vector_norm(low, dim=dim) + _TINY)
    return phi.unsqueeze(1) if dim == 1 else phi


def fira_residual(G: Tensor, low: Tensor, direction: Tensor, c: float, basis: dict, state: dict,
                  group: dict) -> Tensor | None:
    """The residual term, in the units of ``direction`` (the rule multiplies everything by η·c).

    paper:    S = φ ⊙ (I − PPᵀ)G with φ from N = c·D, limited; update α(P N + S)  → returns α·S/c
    official: S = φ ⊙ (G − α·PPᵀG) with φ from D, limited; update c·(α P D + S)   → returns S
    Limiter (both): S ← S·γ/max(‖S‖/(‖S_prev‖ + ε), γ); the limited norm is stored (``fira_prev``)."""
    official = group["compat"] == "official"
    if not official and all(b.shape[0] == b.shape[1] for b in basis.values()):
        return None        # a full-rank (square) basis leaves no complement: Fira is GaLore exactly
    scale = group["scale"]
    in_subspace = project_back(low, basis, tuple(G.shape), scale if official else 1.0)
    phi = _norm_scaling(low, direction if official else direction * c, basis, group)
    residual = (G - in_subspace).mul_(phi)
    norm = torch.linalg.vector_norm(residual)
    gamma = group["gamma"]
    if "fira_prev" in state:
        limiter = (norm / (state["fira_prev"] + _TINY)).clamp_min_(gamma).div_(gamma)
        residual.div_(limiter)
        state["fira_prev"].copy_(norm / limiter)
    else:
        state["fira_prev"] = norm.clone()
    return residual if official else residual.mul_(scale / c)


def _check_fira(group: dict) -> None:
    check_range("gamma", group["gamma"], 1.0)
    check_choice("scaling", group["scaling"], SCALINGS)
    if group["proj_type"] == "full" and group["scaling"] == "column":
        raise invalid("proj_type", "full", "std, reverse_std, left or right with scaling='column' "
                      "(a two-sided projection has no column structure; use scaling='matrix')")
    if group["base"] not in ("adamw", "adamw-torch"):
        raise invalid("base", group["base"], "'adamw' or 'adamw-torch' (Fira's scaling is defined for Adam)")


FIRA = ProjectedRule("fira", residual=fira_residual, check=_check_fira)


class Fira(ProjectedOptimizer):
    r"""Fira: GaLore's low-rank Adam plus the full-rank residual, scaled by the low-rank Adam's norm ratio.

    With :math:`R = P^\top G`, :math:`N = \rho(R)` (HF-flavour Adam, bias correction included) and the
    column-wise factors :math:`\phi_i = \|N_{:,i}\| / (\|R_{:,i}\| + 10^{-8})`:

    .. math::
        S_t &= \phi \odot (I - P P^\top) G_t \\
        S_t &\leftarrow S_t\,\gamma / \max\!\big(\|S_t\| / (\|S_{t-1}\| + 10^{-8}),\ \gamma\big)
              \quad\text{(norm-growth limiter; } S_{t-1}\text{ the limited value)} \\
        \theta &\leftarrow \theta - \eta\,\alpha\,(P N_t + S_t), \qquad \theta \leftarrow \theta - \eta\lambda\theta

    ``compat="official"`` is pip ``fira`` 1.0.2 / xichen-fy/Fira: the residual is :math:`G - \alpha PP^\top G`
    (not orthogonal when α ≠ 1), φ and the limiter use :math:`N/c` (bias correction outside), and α multiplies
    only :math:`PN`: :math:`\theta \leftarrow \theta - \eta c\,(\alpha P N/c + S)`.  With α = 1 both agree
    except for the limiter's ratio of bias corrections.

    Args:
        params: parameters or groups (routing as :class:`~torchstep.optim.GaLore`; ``rank=None`` unprojected).
        lr: η (default 0.01, the paper's scripts).
        rank: r (default 128; a float is a fraction of min(m, n), as in GaLore).
        update_proj_gap: T (default 200).
        scale: α (default 0.25 below 1B in the paper; 0.0625 above; pip ``fira`` calls it ``alpha``, default 1).
        proj_type: as GaLore (``full`` needs ``scaling="matrix"``).
        gamma: γ of the norm-growth limiter (default 1.01, all the paper's experiments).
        scaling: ``column`` (default, paper's "Fira" and the code) or ``matrix`` ("Fira-matrix").
        base: ``adamw`` (default, HF flavour as the code) or ``adamw-torch``.
        weight_decay: λ, decoupled, after the step (default 0).
        moments: as GaLore (default ``keep``).
        compat: ``paper`` (default) or ``official`` (see above).
        maximize, nonfinite: the policies of every torchstep optimizer.
        **base_hyperparameters: ``betas`` (0.9, 0.999), ``eps`` (1e-6).

    Paper: Chen et al., "Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?",
    arXiv 2410.01623 (Algorithm 1: ``G̃ = α(P N + S)``; Eq. 11 column-level φ).  Parity: pip ``fira``
    (``compat="official"``, tested).  Deviations: none in paper mode; ε placement in φ is the code's
    (the extracted paper text is ambiguous).  Memory: GaLore's plus one scalar per projected matrix.
    """

    rule = FIRA

    def __init__(self, params: Any, lr: float = 0.01, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", gamma: float = 1.01, scaling: str = "column",
                 base: str = "adamw", weight_decay: float = 0.0, moments: str = "keep", compat: str = "paper", *,
                 maximize: bool = False, nonfinite: str = "skip", **base_hyperparameters: Any) -> None:
        defaults = projection_defaults(lr, rank, update_proj_gap, scale, proj_type, base, weight_decay, moments,
                                       compat, maximize, nonfinite, base_hyperparameters)
        super().__init__(params, dict(defaults, gamma=gamma, scaling=scaling))


__all__ = ["Fira", "FIRA"]
