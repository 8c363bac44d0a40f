"""GaLore — gradient low-rank projection around any element-wise base (Zhao et al., arXiv 2403.03507).

:class:`ProjectedRule` is the projection written once: refresh the subspace every ``T`` steps, project the
gradient, run the base on the projection, project the direction back (× ``scale``), optionally add a
residual stage (Fira), step, then decoupled decay.  :class:`ProjectedOptimizer` routes groups to it by the
``rank`` key; GaLore and Fira are two rules over it.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from ..ops.projectors import (PROJ_TYPES, change_of_basis, project, project_back, projected_shape,
                              projection_side, refresh_basis, reproject)
from ..ops.shapes import as_matrix, matrix_dims
from ..partition import FALLBACK_LABELS, MATRIX, split_by_tensor_label
from ._base import Rule, TorchstepOptimizer, check_choice, check_range, invalid, scalar, step_of
from .lowrank import BASES, check_base_hyperparameters, resolve_base

MOMENT_POLICIES = ("keep", "reproject", "reset")
COMPATS = ("paper", "official")
BASIS_PREFIX = "proj_"


def is_projected(p: Tensor, group: dict[str, Any]) -> bool:
    return group["rank"] is not None and p.dim() >= 2


def basis_of(state: dict[str, Any]) -> dict[str, Tensor]:
    """The subspace basis stored in a parameter's state (``proj_u`` / ``proj_v``), as plain tensors."""
    return {k[len(BASIS_PREFIX):]: v for k, v in state.items() if k.startswith(BASIS_PREFIX)}


def check_projection(group: dict[str, Any]) -> None:
    """The hyperparameters of every projected group (also used by Fira and GradNormLoRP)."""
    rank = group["rank"]
    if isinstance(rank, float):
        check_range("rank", rank, 0.0, 1.0, lo_open=True)
    elif rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise invalid("rank", rank, "an int >= 1, a float fraction of min(m, n) in (0, 1], or None for an "
                      "unprojected group")
    gap = group["update_proj_gap"]
    if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
        raise invalid("update_proj_gap", gap, "an int >= 1")
    check_range("scale", group["scale"], 0.0, lo_open=True)
    check_choice("proj_type", group["proj_type"], PROJ_TYPES)
    check_choice("moments", group["moments"], MOMENT_POLICIES)
    check_choice("compat", group["compat"], COMPATS)
    base = resolve_base(group["base"])
    base.check(group)
    unmovable = set(base_keys(base, group)) - set(base.state_keys)
    if group["moments"] == "reproject" and unmovable:
        raise invalid("moments", "reproject", f"'keep' or 'reset' for base {base.name!r} (its state "
                      f"{sorted(unmovable)} has no change of basis)")
    if group["compat"] == "official" and group["moments"] != "keep":
        raise invalid("moments", group["moments"], "'keep' with compat='official' (the official code neither "
                      "re-projects nor resets the moments)")
    resolve_base(group["base"]).check(group)


class ProjectedRule(Rule):
    """A low-rank projection around the group's base (:mod:`torchstep.optim.lowrank`).

    Args:
        name: the rule's name.
        residual: optional stage ``residual(G, R, D, c, basis, state, group) -> Tensor`` whose result (full
            size, in the units of ``D``; the step is ``−η·c·D``; ``None``: nothing to add) is added to the projected-back direction (Fira).
        check: validates the residual stage's hyperparameters.
    """

    batched = False

    def __init__(self, name: str, residual: Callable | None = None, check: Callable | None = None) -> None:
        self.name, self.residual, self._check = name, residual, check

    def validate(self, group):
        check_projection(group)
        if self._check is not None:
            self._check(group)

    def init_state(self, p, state, group):
        base = resolve_base(group["base"])
        if is_projected(p, group):
            shape = matrix_dims(p)
            side = projection_side(shape, group["proj_type"])
            base.init(p.new_empty(projected_shape(shape, group["rank"], side)), state, group)
        else:
            base.init(p, state, group)

    def update(self, params, grads, states, group):
        for p, grad, state in zip(params, grads, states):
            self.update_one(p, grad, state, group)

    def update_one(self, p: Tensor, grad: Tensor, state: dict, group: dict) -> None:
        base, t, lr = resolve_base(group["base"]), step_of(state), scalar(group["lr"])
        if not is_projected(p, group):
            direction, c = base.direction(grad, state, group, t)
            p.add_(direction, alpha=-lr * c)
        else:
            G = as_matrix(grad)
            basis = self.subspace(G, state, group, t)
            low = project(G, basis)
            direction, c = base.direction(low, state, group, t - state.get("reset_step", 0))
            full = project_back(direction, basis, tuple(G.shape), group["scale"])
            extra = None if self.residual is None else self.residual(G, low, direction, c, basis, state, group)
            if extra is not None:
                full = full.add_(extra)
            p.add_(full.reshape(p.shape), alpha=-lr * c)
        if group["weight_decay"] > 0:
            p.add_(p, alpha=-lr * group["weight_decay"])   # after the step, as the official code

    @staticmethod
    def subspace(G: Tensor, state: dict, group: dict, t: int) -> dict[str, Tensor]:
        """The basis for step ``t``: a new SVD at steps 1, T+1, 2T+1, … (the official ``iter % T == 0``
        before its counter is incremented), with the moments kept, re-projected or reset."""
        old = basis_of(state)
        if old and (t - 1) % group["update_proj_gap"] != 0:
            return old
        side = projection_side(tuple(G.shape), group["proj_type"])
        svd_input = G.float() if group["compat"] == "official" else G     # official: fp32 SVD for every dtype
        new = {k: v.to(G.dtype) for k, v in refresh_basis(svd_input, group["rank"], side, old or None,
                                                          seed=t * 1_000_003 + G.numel()).items()}
        if old:
            move_state(state, group, old, new, t)
        for key, value in new.items():
            state[BASIS_PREFIX + key] = value
        return new


def move_state(state: dict, group: dict, old: dict[str, Tensor], new: dict[str, Tensor], t: int) -> None:
    """What the base's state does when the subspace changes (group ``moments``): ``keep`` (paper
    Algorithm 2 and the official code), ``reproject`` (first moments by the change of basis, second moments
    by its squares, any other state of the base zeroed), ``reset`` (zeros; bias correction restarts)."""
    policy, base = group["moments"], resolve_base(group["base"])
    if policy == "keep":
        return
    maps = change_of_basis(old, new) if policy == "reproject" else {}
    for key in base_keys(base, group):
        if key in base.first_moments and maps:
            state[key] = reproject(state[key], maps)
        elif key in base.second_moments and maps:
            state[key] = reproject(state[key], maps, squared=True)
        else:
            state[key].zero_()
    if policy == "reset":
        state["reset_step"] = t - 1          # a Python int: no device sync to read it


def base_keys(base, group: dict) -> tuple[str, ...]:
    """The state keys the base allocates for ``group`` (its ``init`` run on a probe)."""
    probe: dict[str, Any] = {}
    base.init(torch.empty(2, 2), probe, group)
    return tuple(probe)


GALORE = ProjectedRule("galore")


class ProjectedOptimizer(TorchstepOptimizer):
    """Routes groups to a projected rule by the ``rank`` key (``route_key``; the rule is the class attribute
    ``rule``).

    * a group with a ``rank`` key uses it (``None``: the base, unprojected);
    * if any group passed to the constructor has ``rank``, groups without it are unprojected (galore-torch's
      convention: ``[{"params": rest}, {"params": matrices, "rank": 128, ...}]``);
    * a partitioner group (``torchstep.create(name, model)``) named ``matrix`` is projected at the default
      rank, ``embedding``/``head``/``no_decay`` are not;
    * otherwise tensors with ``ndim >= 2`` are projected at the default rank and the rest are not — such a
      group is split in two, so ``param_groups`` can hold more groups than were passed (a scheduler given one
      lambda per group should be built after the optimizer, from ``len(opt.param_groups)``).

    A group may choose its own ``base``; the base's hyperparameter defaults fill the group's missing keys.

    Args:
        params: parameters or groups.
        defaults: the hyperparameters (with ``rank`` the default rank of projected groups).
    """

    route_key = "rank"
    _ranks_given = False

    def _allowed_keys(self, group: dict[str, Any]) -> set[str]:
        base = group.get("base", self.defaults["base"])
        return super()._allowed_keys(group) | (set(BASES[base].defaults) if base in BASES else set())

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        if not isinstance(params, Tensor):      # a lone tensor: torch's own TypeError below
            params = list(params)
            self._ranks_given = any(isinstance(g, dict) and self.route_key in g for g in params)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group, key = dict(param_group), self.route_key
        if "base" in group:      # a group's own base brings its own hyperparameter defaults
            for name, value in resolve_base(group["base"]).defaults.items():
                group.setdefault(name, value)
        if key in group:
            return super().add_param_group(group)
        if self._ranks_given or group.get("name") in FALLBACK_LABELS:
            return super().add_param_group({**group, key: None})
        if group.get("name") == MATRIX:
            return super().add_param_group(group)
        for label, sub in split_by_tensor_label(group):
            super().add_param_group(sub if label == MATRIX else {**sub, key: None})


def projection_defaults(lr, rank, update_proj_gap, scale, proj_type, base, weight_decay, moments, compat,
                        maximize, nonfinite, base_hyperparameters) -> dict[str, Any]:
    check_base_hyperparameters(base, base_hyperparameters)
    return dict(resolve_base(base).defaults, **base_hyperparameters, lr=lr, rank=rank,
                update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type, base=base,
                weight_decay=weight_decay, moments=moments, compat=compat, maximize=maximize, nonfinite=nonfinite)


class GaLore(ProjectedOptimizer):
    r"""GaLore: an element-wise optimizer run on a low-rank projection of each weight matrix's gradient.

    For an :math:`m\times n` gradient :math:`G` (conv weights flattened to ``(out, in·k…)``), with the
    short side projected (``proj_type="std"``, :math:`m \ge n`: :math:`P = V_{:r}^\top`, else
    :math:`P = U_{:,:r}`; below for :math:`m < n`):

    .. math::
        P_t &= U_{:, :r}\ \text{of}\ \mathrm{SVD}(G_t) \ \text{ if } (t-1) \bmod T = 0 \text{, else } P_{t-1} \\
        R_t &= P_t^\top G_t,\qquad (D_t, c_t) = \rho(R_t) \quad\text{(the base; Adam: } c_t=\sqrt{1-\beta_2^t}/(1-\beta_1^t),\ D_t = M_t/(\sqrt{V_t}+\epsilon)) \\
        \theta &\leftarrow \theta - \eta\,c_t\,\alpha\,P_t D_t, \qquad \theta \leftarrow \theta - \eta\lambda\theta

    Parameters without a rank (see :class:`ProjectedOptimizer` for the routing) run the same base
    unprojected, at the same lr (the paper's protocol).

    Args:
        params: parameters or groups; groups may set every hyperparameter below, ``rank=None`` = unprojected.
        lr: η (default 0.01, the paper's pre-training lr; galore-torch's class default is 1e-3).
        rank: r, the subspace dimension (default 128, the paper's 60M setting; capped at min(m, n)); a float in
            (0, 1] is a fraction of min(m, n) (e.g. 0.25: the paper's r/d_model at 350M).
        update_proj_gap: T, steps between SVD refreshes (default 200).
        scale: α, multiplies the projected-back update (default 0.25, paper; galore-torch's class default 1.0).
        proj_type: ``std`` (default: short side), ``reverse_std``, ``left``, ``right``, ``full`` (two-sided).
        base: the element-wise optimizer ρ, one of :data:`torchstep.optim.lowrank.BASES`: ``adamw`` (default;
            the HF-flavour Adam of the official code, ε inside the root, ε 1e-6), ``adamw-torch``, ``lion``,
            ``sgd``, ``adafactor``; its hyperparameters are keyword arguments (``betas``, ``eps``, ``momentum``…).
        weight_decay: λ, decoupled, applied after the step (default 0, the paper's runs).
        moments: what the base's state does when the subspace changes: ``keep`` (default: the paper's
            Algorithm 2 and the official code), ``reproject`` (change of basis; second moments by its squares,
            an approximation), ``reset`` (zeros, bias correction restarts).
        compat: ``paper`` (default) or ``official`` (galore-torch ``GaLoreAdamW``: SVD in fp32 for every dtype;
            ``moments`` must be ``keep``).  For fp32 models the two are the same algorithm.
        maximize, nonfinite: the policies of every torchstep optimizer.
        **base_hyperparameters: the base's hyperparameters (defaults per base in ``BASES``).

    Paper: Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection",
    arXiv 2403.03507.  Parity: ``galore_torch.GaLoreAdamW`` (tests, tens of steps across refreshes).
    Deviations: the projector is stored as plain tensors (``proj_u``/``proj_v``; the official pickled
    object breaks ``weights_only`` loading); conv weights are projected in their flattened matrix view (the
    official repo uses a Tucker projector for > 2-D); galore-torch stores the projector in the parameter dtype,
    here bf16/fp16 parameters get fp32 state (library policy).  If the SVD does not converge the previous
    subspace is kept (a random orthonormal one on the first refresh) with a warning; a non-finite gradient
    never reaches the SVD under ``nonfinite="skip"`` and raises ``FloatingPointError`` under ``"ignore"``.
    Memory: per projected m×n matrix (m ≤ n, ``std``): projector m·r plus the base's state on r×n
    (Adam: 2·n·r) — vs 2·m·n for Adam; unprojected tensors keep the base's dense state.
    """

    rule = GALORE

    def __init__(self, params: Any, lr: float = 0.01, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25, proj_type: str = "std", base: str = "adamw", weight_decay: float = 0.0,
                 moments: str = "keep", compat: str = "paper", *, maximize: bool = False, nonfinite: str = "skip",
                 **base_hyperparameters: Any) -> None:
        super().__init__(params, projection_defaults(lr, rank, update_proj_gap, scale, proj_type, base,
                                                     weight_decay, moments, compat, maximize, nonfinite,
                                                     base_hyperparameters))


__all__ = ["GaLore", "GALORE", "ProjectedRule", "ProjectedOptimizer", "BASES", "basis_of", "is_projected"]
