"""SinkGD: stateless Sinkhorn-normalised gradient steps for hidden matrices, AdamW for the rest."""
from __future__ import annotations

import math
from typing import Any

from ..ops.sinkhorn import sinkhorn_normalize
from ._base import check_choice, check_range
from .hybrid import MatrixHybrid, hybrid_defaults
from .matrix import MatrixRule


def _lmo(matrices, group):
    out = [sinkhorn_normalize(d, group["iters"], group["eps"]) for d in matrices]
    if group["normalization"] == "unit":
        out = [x / math.sqrt(x.shape[0]) for x in out]
    return out


def _check(group):
    check_range("iters", group["iters"], 1)
    check_choice("normalization", group["normalization"], ("paper", "unit"))


SINKGD = MatrixRule("sinkgd", lmo=_lmo, check=_check)


class SinkGD(MatrixHybrid):
    r"""SinkGD: stateless Sinkhorn-normalised gradient steps for hidden matrices, AdamW for the rest.

    .. math::
        X \leftarrow G;\ \text{repeat } L:\ X_{i:} \leftarrow \sqrt{n}\,X_{i:}/\|X_{i:}\|,\
            X_{:j} \leftarrow \sqrt{m}\,X_{:j}/\|X_{:j}\|;\quad
        \theta \leftarrow \theta(1-\eta\lambda) - \eta X

    (:func:`torchstep.ops.sinkhorn.sinkhorn_normalize`; the update has unit RMS per entry and ignores the
    gradient's scale — the schedule carries all scale.)  Any ``ndim >= 2`` tensor is normalised as its
    (out, prod(rest)) matrix.

    Args:
        params: parameters or groups (routing as :class:`~torchstep.optim.Muon`).
        lr: η (default 1e-3; community recipe 0.05 × a global 2e-2).
        iters: Sinkhorn rounds L (default 5).
        normalization: ``"paper"`` (default; rows to norm √n, columns to √m) or ``"unit"`` — the community
            package ``sinkgd-pytorch`` (unit row/column norms: the paper's X/√m).
        weight_decay: decoupled λ with the base lr (default 0).
        fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay: AdamW fallback (defaults 2e-2,
            (0.9, 0.999), 1e-8, 0).  ``eps`` of the row/column norms is ``fallback_eps`` (1e-8).
        maximize, nonfinite: the policies of every torchstep optimizer.

    Paper: Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless and Scalable LLM
    Training", arXiv 2502.06742; no official code.  Memory: none for matrices.
    Under FSDP2 each matrix's normalisation runs once, on the whole matrix, on its owner rank
    (:func:`torchstep.optim.matrix.owner_lmo`); under DDP every rank computes every matrix (no split).
    """

    matrix_rule = SINKGD

    def __init__(self, params: Any, lr: float = 1e-3, iters: int = 5, normalization: str = "paper",
                 weight_decay: float = 0.0, fallback_lr: float = 2e-2,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8,
                 fallback_weight_decay: float = 0.0, *, maximize: bool = False, nonfinite: str = "skip") -> None:
        super().__init__(params, hybrid_defaults(
            self.matrix_rule, fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay, maximize, nonfinite,
            lr=lr, iters=iters, normalization=normalization, weight_decay=weight_decay))
