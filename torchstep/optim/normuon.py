"""NorMuon: Muon followed by neuron-wise (per output row) second-moment normalisation."""
from __future__ import annotations

import math
from typing import Any

import torch

from ..ops.shapes import SHAPE_SCALES, shape_scale
from ._base import check_choice, check_range, invalid
from .matrix import (MatrixRule, check_newton_schulz, init_momentum, momentum_direction, newton_schulz_lmo,
                     zeros_rows)
from .muon import Muon

#: paper-mode default lr: update RMS 0.2·η = 6e-4, Keller's lr 0.02 on a 1024-wide matrix (0.02/√1024)
PAPER_LR, OFFICIAL_LR = 3e-3, 0.02


def _nesterov(group) -> bool:
    """The paper's algorithm uses plain momentum (zichongli5/NorMuon issue #5); the official code Nesterov."""
    return group["compat"] == "official" if group["nesterov"] is None else group["nesterov"]


def _direction(grad, state, group):
    return momentum_direction(grad, state, group, nesterov=_nesterov(group))


def _init(p, state, group):
    init_momentum(p, state, group)
    state["row_second_moment"] = zeros_rows(p)


def _normalise_rows(u, state, group):
    v, eps = state["row_second_moment"], group["normalize_eps"]
    v.lerp_(u.float().square().mean(-1, keepdim=True).to(v.dtype), 1 - group["beta2"])
    normed = u / (v.sqrt() + eps)
    if group["compat"] == "official":
        return normed * (torch.linalg.matrix_norm(u) / (torch.linalg.matrix_norm(normed) + eps))
    m, n = u.shape
    return normed * (0.2 * math.sqrt(m * n) / (torch.linalg.matrix_norm(normed) + eps))


def _scale(u, group) -> float:
    if group["compat"] == "official":
        return shape_scale(group["adjust_lr"] or "original", *u.shape)
    return 1.0


def _check(group):
    check_newton_schulz(group)
    check_range("beta2", group["beta2"], 0.0, 1.0, hi_open=True)
    check_range("normalize_eps", group["normalize_eps"], 0.0, lo_open=True)
    check_choice("compat", group["compat"], ("paper", "official"))
    check_choice("nesterov", group["nesterov"], (None, True, False))
    check_choice("adjust_lr", group["adjust_lr"], (None,) + SHAPE_SCALES)
    if group["compat"] == "paper" and group["adjust_lr"] is not None:
        raise invalid("adjust_lr", group["adjust_lr"],
                      "None with compat='paper' (its 0.2·√(mn)/‖Ô‖_F scale already fixes the update RMS at 0.2·η)")


NORMUON = MatrixRule("normuon", lmo=newton_schulz_lmo, direction=_direction, init=_init, post=_normalise_rows,
                     scale=_scale, check=_check)


class NorMuon(Muon):
    r"""NorMuon: Muon followed by neuron-wise (per output row) second-moment normalisation.

    For a matrix group, with ``O = NS(u)`` as in :class:`Muon`:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2)\,\mathrm{mean}_j(O_{ij}^2) \quad (v \in \mathbb R^{m\times 1}) \\
        \hat O &= O \oslash (\sqrt v + \epsilon) \\
        \text{paper: } \theta &\leftarrow \theta(1-\eta\lambda) - \eta \cdot 0.2\sqrt{mn}\,\hat O/\|\hat O\|_F
            \quad(\text{update RMS } 0.2\eta;\ u = b,\ \text{plain momentum}) \\
        \text{official: } \theta &\leftarrow \theta(1-\eta\lambda) - \eta\, s(m, n)\;
            \hat O\,\|O\|_F/\|\hat O\|_F \quad(u \text{ Nesterov};\ s = \sqrt{\max(1, m/n)} \text{ by default})

    Args:
        params: as :class:`Muon`.
        lr: η; ``None`` (default) picks 3e-3 for ``compat="paper"`` and 0.02 for ``"official"``.  The paper
            mode's 0.2·√(mn) scale makes the update RMS 0.2·η, 5–11× Keller's at lr 0.02 on 256–3072-wide
            matrices; 3e-3 gives RMS 6e-4 = Keller's 0.02/√1024 (our choice: the paper's lr could not be read).
        momentum: β1 (default 0.95).
        beta2: EMA of the row statistic (default 0.95).
        normalize_eps: ε of the row normalisation and the Frobenius ratio (default 1e-10).
        compat: ``"paper"`` (default) or ``"official"`` (zichongli5/NorMuon ``normuon.py``).
        nesterov: ``None`` (default) follows ``compat`` — plain momentum in the paper's algorithm (repository
            issue #5), Nesterov in the official code; True/False overrides.
        adjust_lr: ``None`` (default) — the mode's own scale.  With ``compat="official"`` any Muon shape scale
            is honoured (default ``original``); with ``"paper"`` setting it raises ``ValueError``.
        **kwargs: the rest of :class:`Muon`'s arguments (NS settings, fallback AdamW, policies).

    No bias correction of ``v`` (as both).  Conv weights: the statistic is per output channel of the
    flattened (out, prod(rest)) matrix — the official code reshapes to 4-D first and normalises over kw
    instead (documented deviation).  Fallback AdamW as :class:`Muon`.
    Paper: Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more efficient and scalable", arXiv 2510.05491;
    the official/paper scale difference is repository issue #9.  Memory: Muon's plus one scalar per output row.

    FSDP2: ``O`` is computed on the matrix's owner (:func:`torchstep.optim.matrix.owner_lmo`); ``v`` is a
    ``Shard(0)`` DTensor following the parameter's rows, so the row statistic stays local and the two
    Frobenius norms are all-reduces — the whole-matrix result (tested against single-process training),
    not dion's per-shard rescale approximation.
    """

    matrix_rule = NORMUON

    def __init__(self, params: Any, lr: float | None = None, momentum: float = 0.95, beta2: float = 0.95,
                 normalize_eps: float = 1e-10, compat: str = "paper", nesterov: bool | None = None,
                 adjust_lr: str | None = None, **kwargs: Any) -> None:
        check_choice("compat", compat, ("paper", "official"))
        if lr is None:
            lr = PAPER_LR if compat == "paper" else OFFICIAL_LR
        self._rule_hyperparameters = dict(beta2=beta2, normalize_eps=normalize_eps, compat=compat)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, adjust_lr=adjust_lr, **kwargs)
