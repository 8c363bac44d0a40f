"""Hybrid matrix optimizers — Muon, SinkGD, SWAN — as ONE optimizer with per-group algorithms.

Hidden weight matrices get the matrix rule; everything else (embeddings, output head, norms, biases,
0-/1-D tensors) gets AdamW at an explicit fallback learning rate.  One ``step``, one scheduler (it scales
every group's own lr), one checkpoint.

Routing, per group, first match wins:
``algo`` key (``"muon"/"sinkgd"/"swan"/"adamw"``) → ``use_muon`` (True: matrix rule) → ``use_fallback``
(True: AdamW) → the partitioner's group ``name`` (``embedding/head/no_decay`` → AdamW, ``matrix`` →
matrix rule) → **per tensor**: a group without any of these is split at construction into a matrix
group (tensors with ``ndim >= 2``) and an AdamW group whose ``lr``/``betas``/``eps``/``weight_decay``
come from ``fallback_lr``/``fallback_betas``/``fallback_eps``/``fallback_weight_decay``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..ops.newton_schulz import PRESETS, as_matrix, newton_schulz_many, newton_schulz_many_split
from ..ops.sinkhorn import sinkhorn_normalize
from ..ops.spectral import whiten
from ._base import TorchstepOptimizer, check_choice, check_range, decay_, scalar

MATRIX_ALGOS = ("muon", "normuon", "muonpp", "lanton", "sinkgd", "swan")
ALGOS = MATRIX_ALGOS + ("adamw",)
FALLBACK_NAMES = ("embedding", "head", "no_decay")
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def shape_scale(rule: str, m: int, n: int) -> float:
    """Muon's per-matrix lr multiplier for an (out m) × (in n) matrix (flattened conv shape)."""
    if rule == "original":
        return math.sqrt(max(1.0, m / n))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(m, n))
    if rule == "spectral_norm":
        return math.sqrt(m / n)
    return 1.0


class _MatrixHybrid(TorchstepOptimizer):
    matrix_algo = "muon"

    # ------------------------------------------------------------------ routing
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        algo = self._explicit_algo(group)
        if algo is not None:
            group.pop("use_muon", None), group.pop("use_fallback", None)
            return super().add_param_group({**self._fallback_keys(group, algo), **group, "params": params,
                                            "algo": algo})
        names = group.get("param_names")
        split = {"matrix": [], "fallback": []}
        for i, p in enumerate(params):
            split["matrix" if p.dim() >= 2 else "fallback"].append(i)
        for kind, idx in split.items():
            if not idx:
                continue
            sub = {**group, "params": [params[i] for i in idx]}
            if names is not None:
                sub["param_names"] = [names[i] for i in idx]
            algo = self.matrix_algo if kind == "matrix" else "adamw"
            super().add_param_group({**self._fallback_keys(sub, algo), **sub, "algo": algo})

    def _explicit_algo(self, group: dict[str, Any]) -> str | None:
        if "algo" in group:
            return group["algo"]
        if "use_muon" in group:
            return self.matrix_algo if group["use_muon"] else "adamw"
        if "use_fallback" in group:
            return "adamw" if group["use_fallback"] else self.matrix_algo
        if group.get("name") in FALLBACK_NAMES:
            return "adamw"
        if group.get("name") == "matrix":
            return self.matrix_algo
        return None

    def _fallback_keys(self, group: dict[str, Any], algo: str) -> dict[str, Any]:
        """An AdamW group takes its hyperparameters from the fallback_* values unless set explicitly."""
        if algo != "adamw":
            return {}
        d = {**self.defaults, **group}
        return {"lr": d["fallback_lr"], "betas": d["fallback_betas"], "eps": d["fallback_eps"],
                "weight_decay": d["fallback_weight_decay"]}

    def _validate(self, group):
        super()._validate(group)
        check_choice("algo", group["algo"], ALGOS)
        check_range("fallback_lr", group["fallback_lr"], 0.0)
        check_range("fallback_eps", group["fallback_eps"], 0.0, lo_open=True)
        check_range("fallback_weight_decay", group["fallback_weight_decay"], 0.0)
        if group["algo"] in MATRIX_ALGOS and group.get("lmo") != "sign":
            bad = [tuple(p.shape) for p in group["params"] if p.dim() < 2]
            if bad:
                raise ValueError(f"Invalid algo: {group['algo']!r} needs tensors with ndim >= 2, got shapes {bad}")

    # ------------------------------------------------------------------ AdamW fallback
    def _init_state(self, p, state, group):
        if group["algo"] == "adamw":
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        else:
            self._init_matrix_state(p, state, group)

    def _init_matrix_state(self, p, state, group):
        pass

    def _update(self, p, grad, state, group):
        """torch.optim.AdamW's update (torch flavour: ε after the bias-corrected square root)."""
        t = self._advance(state)
        lr = scalar(group["lr"])
        beta1, beta2 = group["betas"]
        decay_(p, lr, group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = state["exp_avg_sq"].sqrt().div_(math.sqrt(1 - beta2 ** t)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))

    # ------------------------------------------------------------------ matrix rules
    def _step_group(self, group, params):
        if group["algo"] == "adamw":
            return super()._step_group(group, params)
        lr = scalar(group["lr"])
        items = [self._working(p, group) for p in params]
        directions = [as_matrix(self._direction(work, grad, state, group)) for work, grad, state in items]
        updates = self._orthogonalise(directions, group)
        factors = self._layer_factors([state for _, _, state in items], group)
        for p, (work, _, state), u, factor in zip(params, items, updates, factors):
            u = self._finalise(u, state, group)
            if factor is not None:
                u = u * factor
            self._advance(state)
            decay_(work, lr, group["weight_decay"])          # decoupled decay with the base lr
            work.add_(u.view_as(work), alpha=-lr * self._scale(u, group))
            self._write_back(p, work)

    def _direction(self, p, grad, state, group) -> Tensor:
        return grad

    def _finalise(self, u: Tensor, state, group) -> Tensor:
        return u

    def _layer_factors(self, states, group) -> list:
        """Per-tensor lr multipliers that depend on the whole group (Lanton); ``None``: none."""
        return [None] * len(states)

    def _scale(self, u: Tensor, group) -> float:
        return 1.0


class Muon(_MatrixHybrid):
    r"""Muon: orthogonalised momentum for hidden matrices, AdamW for the rest — one optimizer.

    For a matrix group (see the module docstring for routing):

    .. math::
        b &\leftarrow \mu b + (1-\mu) g \quad(\text{EMA form; identical after NS normalisation}) \\
        u &= (1-\mu) g + \mu b \ \text{(Nesterov)} \ \text{else}\ b, \quad U = u \text{ as } m\times n
            \text{ (conv: out} \times \text{in·kh·kw)} \\
        \theta &\leftarrow \theta(1-\eta\lambda) - \eta\, s(m, n)\, \mathrm{NS}(U)

    ``NS`` is :func:`torchstep.ops.newton_schulz` (``ns_preset``, ``ns_steps``, ``ns_dtype``), run
    **batched over all same-shape matrices of a group**.  ``adjust_lr``: ``"original"`` s = √max(1, m/n)
    (Keller), ``"match_rms_adamw"`` s = 0.2·√max(m, n) (Moonlight; update RMS 0.2·η, use AdamW's lr),
    ``"spectral_norm"`` s = √(m/n) (Dion), ``"none"``.  Decay uses the base lr.

    AdamW groups: torch's AdamW with ``fallback_lr, fallback_betas, fallback_eps, fallback_weight_decay``.

    Defaults: ``lr=0.02, momentum=0.95, nesterov=True, weight_decay=0, ns_steps=5,
    ns_preset="quintic", ns_dtype="bfloat16", adjust_lr="original"``; fallback AdamW ``lr=3e-4,
    betas=(0.9, 0.95), eps=1e-10, weight_decay=0`` (KellerJordan/Muon's ``MuonWithAuxAdam``).
    ``torch.optim.Muon``'s own defaults are ``lr=1e-3, weight_decay=0.1`` with the same rule; with
    ``ns_dtype="bfloat16"`` the iteration is bit-identical to torch's (tested).

    Data parallel: with DDP every rank holds the same averaged gradients, so the step is identical on all
    ranks; ``split_across_ranks=True`` lets each rank orthogonalise a share of the matrices and broadcast
    it (:func:`torchstep.ops.newton_schulz.newton_schulz_many_split`) — same result, 1/W of the NS work.

    Paper/code: K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks" (2024,
    KellerJordan/Muon); Moonlight, arXiv 2502.16982 (``match_rms_adamw``).  Deviation avoided: some
    ports computed the conv scale from the 4-D shape; we use the flattened (out, in·kh·kw) shape.
    Memory: one momentum buffer per matrix (fp32 for bf16 parameters); Adam's two for the rest.
    """

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, ns_preset: str = "quintic",
                 ns_dtype: str = "bfloat16", adjust_lr: str = "original", fallback_lr: float = 3e-4,
                 fallback_betas: tuple[float, float] = (0.9, 0.95), fallback_eps: float = 1e-10,
                 fallback_weight_decay: float = 0.0, *, split_across_ranks: bool = False, maximize: bool = False,
                 nonfinite: str = "skip") -> None:
        self.split_across_ranks = split_across_ranks
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                                      ns_steps=ns_steps, ns_preset=ns_preset, ns_dtype=ns_dtype,
                                      adjust_lr=adjust_lr, fallback_lr=fallback_lr, fallback_betas=fallback_betas,
                                      fallback_eps=fallback_eps, fallback_weight_decay=fallback_weight_decay,
                                      betas=fallback_betas, eps=fallback_eps, algo=self.matrix_algo,
                                      maximize=maximize, nonfinite=nonfinite, **self._extra_defaults()))

    def _extra_defaults(self) -> dict[str, Any]:
        """Hyperparameters a subclass adds (NorMuon's beta2, …)."""
        return {}

    def _validate(self, group):
        super()._validate(group)
        check_range("ns_steps", group["ns_steps"], 1, 99)
        check_choice("ns_preset", group["ns_preset"], tuple(PRESETS))
        check_choice("ns_dtype", group["ns_dtype"], tuple(_DTYPES))
        check_choice("adjust_lr", group["adjust_lr"], ("original", "match_rms_adamw", "spectral_norm", "none"))

    def _init_matrix_state(self, p, state, group):
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _direction(self, p, grad, state, group):
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(grad, 1 - mu)
        return grad.lerp(buf, mu) if group["nesterov"] else buf

    def _orthogonalise(self, directions, group):
        run = newton_schulz_many_split if self.split_across_ranks else newton_schulz_many
        return run(directions, steps=group["ns_steps"], preset=group["ns_preset"],
                   compute_dtype=_DTYPES[group["ns_dtype"]])

    def _scale(self, u, group):
        return shape_scale(group["adjust_lr"], u.shape[0], u.shape[1])


class NorMuon(Muon):
    r"""NorMuon: Muon followed by neuron-wise (per output row) second-moment normalisation.

    For a matrix group, after ``O = NS(u)`` as in :class:`Muon`:

    .. math::
        v &\leftarrow \beta_2 v + (1-\beta_2)\,\mathrm{mean}_j(O_{ij}^2) \quad (v \in \mathbb R^{m\times 1}) \\
        \hat O &= O \oslash (\sqrt v + \epsilon) \\
        \text{paper: } \theta &\leftarrow \theta(1-\eta\lambda) - \eta \cdot 0.2\sqrt{mn}\,\hat O/\|\hat O\|_F
            \quad(\text{update RMS } 0.2\eta) \\
        \text{official: } \theta &\leftarrow \theta(1-\eta\lambda) - \eta\sqrt{\max(1, m/n)}\;
            \hat O\,\|O\|_F/\|\hat O\|_F \quad(\text{Frobenius norm of } O \text{ kept, Keller scale})

    ``compat="paper"`` (default) or ``"official"`` (zichongli5/NorMuon ``normuon.py``; issue #9 of that
    repository discusses the difference).  No bias correction of ``v`` (as both).  Conv weights: the
    statistic is per output channel of the flattened (out, in·kh·kw) matrix — the official code
    reshapes to 4-D first and normalises over kw instead (documented deviation).

    Defaults: ``lr=0.02, momentum=0.95, beta2=0.95, eps=1e-10, nesterov=True, weight_decay=0``;
    fallback AdamW as :class:`Muon`.  Paper: Li, Liu, Liang, Chen, Zhao, "NorMuon: Making Muon more
    efficient and scalable", arXiv 2510.05491.  Memory: Muon's plus one scalar per output row.
    """

    matrix_algo = "normuon"

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, beta2: float = 0.95,
                 normalize_eps: float = 1e-10, compat: str = "paper", **kwargs: Any) -> None:
        self._normuon = dict(beta2=beta2, normalize_eps=normalize_eps, compat=compat)
        super().__init__(params, lr=lr, momentum=momentum, **kwargs)

    def _extra_defaults(self) -> dict[str, Any]:
        return self._normuon

    def _validate(self, group):
        super()._validate(group)
        if group["algo"] == "normuon":
            check_range("beta2", group["beta2"], 0.0, 1.0, hi_open=True)
            check_range("normalize_eps", group["normalize_eps"], 0.0, lo_open=True)
            check_choice("compat", group["compat"], ("paper", "official"))

    def _init_matrix_state(self, p, state, group):
        super()._init_matrix_state(p, state, group)
        state["row_second_moment"] = torch.zeros(p.shape[0], 1, dtype=p.dtype, device=p.device)

    def _finalise(self, u, state, group):
        v, eps = state["row_second_moment"], group["normalize_eps"]
        v.lerp_(u.float().square().mean(-1, keepdim=True).to(v.dtype), 1 - group["beta2"])
        normed = u / (v.sqrt() + eps)
        if group["compat"] == "official":
            return normed * (torch.linalg.matrix_norm(u) / (torch.linalg.matrix_norm(normed) + eps))
        m, n = u.shape
        return normed * (0.2 * math.sqrt(m * n) / (torch.linalg.matrix_norm(normed) + eps))

    def _scale(self, u, group):
        return shape_scale("original", *u.shape) if group["compat"] == "official" else 1.0


class SinkGD(_MatrixHybrid):
    r"""SinkGD: stateless Sinkhorn-normalised gradient steps for hidden matrices, AdamW for the rest.

    .. math::
        X \leftarrow G;\ \text{repeat } L:\ X_{i:} \leftarrow \sqrt{n}\,X_{i:}/\|X_{i:}\|,\
            X_{:j} \leftarrow \sqrt{m}\,X_{:j}/\|X_{:j}\|;\quad
        \theta \leftarrow \theta(1-\eta\lambda) - \eta X

    (:func:`torchstep.ops.sinkhorn.sinkhorn_normalize`; the update has unit RMS per entry and ignores the
    gradient's scale — the schedule carries all scale.)  ``normalization="unit"`` reproduces the
    community package ``sinkgd-pytorch`` (unit row/column norms: the paper's X/√m).

    Defaults: ``lr=1e-3`` (community recipe: 0.05 × a global 2e-2), ``iters=5, eps=1e-8,
    weight_decay=0``; fallback AdamW ``lr=2e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0``.
    Paper: Scetbon, Ma, Gong, Meeds, "Gradient Multi-Normalization for Stateless and Scalable LLM
    Training", arXiv 2502.06742; no official code.  Memory: none for matrices.
    """

    matrix_algo = "sinkgd"

    def __init__(self, params: Any, lr: float = 1e-3, iters: int = 5, normalization: str = "paper",
                 weight_decay: float = 0.0, fallback_lr: float = 2e-2,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8,
                 fallback_weight_decay: float = 0.0, *, maximize: bool = False, nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, iters=iters, normalization=normalization, weight_decay=weight_decay,
                                      fallback_lr=fallback_lr, fallback_betas=fallback_betas,
                                      fallback_eps=fallback_eps, fallback_weight_decay=fallback_weight_decay,
                                      betas=fallback_betas, eps=fallback_eps, algo=self.matrix_algo,
                                      maximize=maximize, nonfinite=nonfinite))

    def _validate(self, group):
        super()._validate(group)
        check_range("iters", group["iters"], 1)
        check_choice("normalization", group["normalization"], ("paper", "unit"))

    def _orthogonalise(self, directions, group):
        out = [sinkhorn_normalize(d, group["iters"], group["eps"]) for d in directions]
        if group["normalization"] == "unit":
            out = [x / math.sqrt(x.shape[0]) for x in out]
        return out


class SWAN(_MatrixHybrid):
    r"""SWAN: stateless GradNorm + GradWhitening for hidden matrices, AdamW for the rest.

    .. math::
        Z = (G - \bar g\,\mathbf 1^\top) \oslash (s\,\mathbf 1^\top) \ \text{(per-row mean / std over inputs)},\quad
        \Delta = (Z Z^\top)^{-1/2} Z,\quad \theta \leftarrow \theta(1-\eta\lambda) - \eta\,\Delta

    Whitening by the coupled Newton–Schulz inverse square root in fp32
    (:func:`torchstep.ops.spectral.whiten`, ``ns_steps``), so ``Δ ≈ U·Vᵀ`` of ``Z``.
    Defaults: ``lr=1e-3, ns_steps=10, eps=1e-8, weight_decay=0``; fallback AdamW ``lr=1e-3,
    betas=(0.9, 0.999), eps=1e-8``.  Paper: Ma, Gong, Scetbon, Meeds, "SWAN: SGD with Normalization and
    Whitening Enables Stateless LLM Training", ICML 2025, arXiv 2412.13148; no official code — the
    whitening iteration and its step count are our choices.  Memory: none for matrices.
    """

    matrix_algo = "swan"

    def __init__(self, params: Any, lr: float = 1e-3, ns_steps: int = 10, weight_decay: float = 0.0,
                 fallback_lr: float = 1e-3, fallback_betas: tuple[float, float] = (0.9, 0.999),
                 fallback_eps: float = 1e-8, fallback_weight_decay: float = 0.0, *, maximize: bool = False,
                 nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, ns_steps=ns_steps, weight_decay=weight_decay, fallback_lr=fallback_lr,
                                      fallback_betas=fallback_betas, fallback_eps=fallback_eps,
                                      fallback_weight_decay=fallback_weight_decay, betas=fallback_betas,
                                      eps=fallback_eps, algo=self.matrix_algo, maximize=maximize,
                                      nonfinite=nonfinite))

    def _validate(self, group):
        super()._validate(group)
        check_range("ns_steps", group["ns_steps"], 1)

    @staticmethod
    def grad_norm(G: Tensor, eps: float = 1e-8) -> Tensor:
        """Per-row standardisation over the input dimension (mean 0, variance 1)."""
        return (G - G.mean(-1, keepdim=True)) / G.std(-1, keepdim=True, correction=0).clamp_min(eps)

    def _orthogonalise(self, directions, group):
        return [whiten(self.grad_norm(d, group["eps"]), group["ns_steps"]) for d in directions]
