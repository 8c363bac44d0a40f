"""Muon: orthogonalised momentum for hidden matrices, AdamW for the rest (one hybrid optimizer).

The rule itself (:data:`torchstep.optim.matrix.MUON`) is composed from the shared stages in
:mod:`torchstep.optim.matrix`; routing is :class:`torchstep.optim.hybrid.MatrixHybrid`'s.
"""
from __future__ import annotations

from typing import Any

from ..ops.shapes import shape_scale  # noqa: F401  (re-exported: torchstep.optim.muon.shape_scale)
from .hybrid import MatrixHybrid, hybrid_defaults
from .matrix import MUON


class Muon(MatrixHybrid):
    r"""Muon: orthogonalised momentum for hidden matrices, AdamW for the rest — one optimizer.

    For a matrix group (see :mod:`torchstep.optim.hybrid` for routing):

    .. math::
        b &\leftarrow \mu b + (1-\mu) g \quad(\text{EMA form; identical after NS normalisation}) \\
        u &= (1-\mu) g + \mu b \ \text{(Nesterov)} \ \text{else}\ b, \quad U = u \text{ as } m\times n
            \text{ (any ndim} \ge 2\text{: out} \times \text{prod(rest))} \\
        \theta &\leftarrow \theta(1-\eta\lambda) - \eta\, s(m, n)\, \mathrm{NS}(U)

    ``NS`` is :func:`torchstep.ops.newton_schulz` run **batched over all same-shape matrices of a group**.

    Args:
        params: parameters or groups (``use_muon`` / ``use_fallback`` / ``algo`` / partitioner names route them).
        lr: matrix learning rate η (default 0.02, Keller's).
        momentum: μ (default 0.95).
        nesterov: Nesterov form (default True).
        weight_decay: decoupled decay λ of matrices, with the base lr (default 0).
        ns_steps: Newton–Schulz steps (default 5).
        ns_preset: ``quintic`` (default), ``polar_express5``, ``you_cesista``, ``convergent`` (every preset
            maps a zero matrix to a zero update).
        ns_dtype: ``bfloat16`` (default), ``float16``, ``float32``, ``float64``: the iteration's compute dtype
            (``float16`` normalises in fp32 first; with ``ns_method="gram"`` it restarts once in 5 steps).
        ns_method: ``standard`` (default), ``gram`` — the same NS polynomial iterated on the small m×m Gram
            matrix with restarts (fewer FLOPs for n ≥ 1.5·m; :func:`torchstep.ops.newton_schulz.newton_schulz`),
            ``auto`` (gram at aspect ratio ≥ 2).
        adjust_lr: shape scale s — ``original`` √max(1, m/n) (Keller, default), ``match_rms_adamw``
            0.2·√max(m, n) (Moonlight; update RMS 0.2·η, use AdamW's lr), ``spectral_norm`` √(m/n) (Dion),
            ``none``.
        fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay: the AdamW fallback's
            hyperparameters (defaults 3e-4, (0.9, 0.95), 1e-10, 0: KellerJordan/Muon's ``MuonWithAuxAdam``).
        split_across_ranks: DDP (every rank holds every matrix): each matrix gets one owner rank by the
            cost-balanced LPT plan (:func:`torchstep.ops.sharding.owner_plan`), owners orthogonalise theirs
            and broadcast one flat buffer each
            (:func:`torchstep.ops.newton_schulz.newton_schulz_many_split`) — bitwise the unsplit result,
            ≈1/W of the NS work (default False).  Under FSDP2 (``fully_shard``: DTensor parameters sharded
            on dim 0) no flag is needed: every matrix is gathered to its owner, orthogonalised once, and
            its rows sent back (:func:`torchstep.optim.matrix.owner_lmo`; never NS of a shard).
        maximize, nonfinite: the policies of every torchstep optimizer.

    ``torch.optim.Muon``'s own defaults are ``lr=1e-3, weight_decay=0.1`` with the same rule; with
    ``ns_dtype="bfloat16"`` the iteration is bit-identical to torch's (tested).

    Paper/code: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024,
    KellerJordan/Muon); Moonlight, arXiv 2502.16982 (``match_rms_adamw``).  Deviation avoided: some
    ports computed the conv scale from the 4-D shape; every ``ndim >= 2`` tensor uses the flattened
    (out, prod(rest)) shape here — for NS, scale and every statistic.
    Memory: one momentum buffer per matrix (fp32 for bf16 parameters); Adam's two for the rest.
    """

    matrix_rule = MUON

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_preset: str = "quintic",
                 ns_dtype: str = "bfloat16", adjust_lr: str = "original", fallback_lr: float = 3e-4,
                 fallback_betas: tuple[float, float] = (0.9, 0.95), fallback_eps: float = 1e-10,
                 fallback_weight_decay: float = 0.0, *, split_across_ranks: bool = False, maximize: bool = False,
                 nonfinite: str = "skip", ns_method: str = "standard") -> None:
        extra = getattr(self, "_rule_hyperparameters", {})   # set by subclasses that add their own
        super().__init__(params, hybrid_defaults(
            self.matrix_rule, fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay, maximize, nonfinite,
            lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
            ns_preset=ns_preset, ns_dtype=ns_dtype, ns_method=ns_method, adjust_lr=adjust_lr,
            split_across_ranks=split_across_ranks, **extra))
