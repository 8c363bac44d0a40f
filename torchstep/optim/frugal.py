"""FRUGAL — a state-full subspace (Adam) plus a state-free complement (signSGD)
(Zmushko et al., arXiv 2411.07837; rule read from the author's commit c7ebe4c)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..ops.projectors import (COORDINATE_AXES, coordinate_basis, project, project_back, projection_side,
                              random_basis, refresh_basis, PROJ_TYPES)
from ..ops.shapes import as_matrix
from ._base import Rule, check_choice, check_range, invalid, scalar, step_of
from ._dtensor import is_dtensor, run_gathered
from .galore import BASIS_PREFIX, ProjectedOptimizer, base_keys, basis_of
from .lowrank import check_base_hyperparameters, resolve_base

PROJECTIONS = ("block", "coordinate", "svd", "random")
BLOCK_ORDERS = ("random", "ascending", "descending", "mirror")
INACTIVE_RULES = ("sign_sgd", "sgd", "none")


def _mix(*ints: int) -> int:
    """A deterministic seed from (seed, position, refresh index)."""
    out = 0
    for i in ints:
        out = (out * 1_000_003 + int(i)) % (2 ** 62)
    return out


def active_blocks(refresh: int, count: int, density: float, order: str, seed: int) -> set[int]:
    """Positions (among a group's matrices) that are state-full after refresh number ``refresh`` (0-based):
    ``round(ρ·count)`` tensors (Python rounding, as the author code), chosen by ``order`` — ``random`` (a new
    draw each refresh), ``ascending`` / ``descending`` (a window moving by its size, wrapping around),
    ``mirror`` (pairs from both ends moving inward; needs an even number)."""
    k = round(count * density)
    if k == 0 or count == 0:
        return set()
    if order == "random":
        gen = torch.Generator().manual_seed(_mix(seed, refresh))
        return set(torch.randperm(count, generator=gen)[:k].tolist())
    if order == "ascending":
        start = (refresh * k) % count
        return {(start + j) % count for j in range(k)}
    if order == "descending":
        start = (count - 1 - refresh * k) % count
        return {(start - j) % count for j in range(k)}
    half = count // 2
    start = (refresh * (k // 2)) % half
    return {i for idx in range(start, start + k // 2) for i in (idx % half, count - 1 - idx % half)}


def _inactive_direction(grad: Tensor, rule: str) -> Tensor | None:
    if rule == "sign_sgd":
        return grad.sign()
    if rule == "sgd":
        return grad
    return None


class FrugalRule(Rule):
    """FRUGAL's update of one group (see :class:`Frugal`)."""

    name = "frugal"

    def validate(self, group):
        density = group["density"]
        if density is not None:
            check_range("density", density, 0.0, 1.0)
        gap = group["update_gap"]
        if not isinstance(gap, int) or isinstance(gap, bool) or gap < 1:
            raise invalid("update_gap", gap, "an int >= 1")
        check_choice("projection", group["projection"], PROJECTIONS)
        check_choice("block_order", group["block_order"], BLOCK_ORDERS)
        check_choice("coord_choice", group["coord_choice"], COORDINATE_AXES)
        check_choice("proj_type", group["proj_type"], PROJ_TYPES)
        check_choice("inactive_update_rule", group["inactive_update_rule"], INACTIVE_RULES)
        check_range("inactive_lr_scale", group["inactive_lr_scale"], 0.0)
        check_range("proj_lr_scale", group["proj_lr_scale"], 0.0)
        if not isinstance(group["reset_statistics"], bool):
            raise invalid("reset_statistics", group["reset_statistics"], "True or False")
        if not isinstance(group["seed"], int):
            raise invalid("seed", group["seed"], "an int")
        if density is not None and group["projection"] == "block" and group["block_order"] == "mirror":
            count = sum(1 for p in group["params"] if p.dim() >= 2)
            if round(count * density) % 2:
                raise invalid("block_order", "mirror", f"an even number of active blocks (round(ρ·{count}) = "
                              f"{round(count * density)})")
        resolve_base(group["base"]).check(group)

    def init_state(self, p, state, group):
        if not self._projected(p, group):
            resolve_base(group["base"]).init(p, state, group)
        # projected tensors get their state at each refresh (a block may stay state-free)

    @staticmethod
    def _projected(p: Tensor, group: dict) -> bool:
        return group["density"] is not None and p.dim() >= 2

    batched = False

    def update(self, params, grads, states, group, positions=None, clock=None, count=None):
        """``positions``: each tensor's index among the group's ``count`` matrices; ``clock``: the group's step
        (the refresh schedule is the group's, as in the author code; default: each tensor's own step)."""
        if count is None:
            count = sum(1 for p in group["params"] if p.dim() >= 2)
        for i, (p, grad, state) in enumerate(zip(params, grads, states)):
            self.update_one(p, grad, state, group, positions[i] if positions else i, count,
                            clock if clock is not None else step_of(state))

    def update_one(self, p, grad, state, group, position, count, clock):
        if is_dtensor(p) and self._projected(p, group) and group["projection"] != "block":
            # under FSDP2: coordinate / svd / random subspaces need the whole matrix (index sets, seeded
            # bases and the residual's sign are not shard-local) — gathered, computed, sharded back
            return run_gathered(self._update_one, p, grad, state, group, position, count, clock)
        return self._update_one(p, grad, state, group, position, count, clock)

    def _update_one(self, p, grad, state, group, position, count, clock):
        base, t, lr = resolve_base(group["base"]), step_of(state), scalar(group["lr"])
        if group["weight_decay"] != 0:
            p.mul_(1 - lr * group["weight_decay"])          # every tensor, before the update, unscaled lr
        if not self._projected(p, group):
            direction, c = base.direction(grad, state, group, t)
            p.add_(direction, alpha=-lr * c)
            return
        lr_p = lr * group["proj_lr_scale"]
        G = as_matrix(grad)
        k = (clock - 1) // group["update_gap"]          # the group's refresh number
        refresh = state.get("refresh") != k             # also catches up a tensor that missed a refresh step
        if refresh:
            state["refresh"] = k
        if group["projection"] == "block":
            if refresh:
                self._new_block(G, state, group, position, count, k, t)
            if state["active"]:
                direction, c = base.direction(G, state, group, t - state["reset_step"])
                p.add_(direction.reshape(p.shape), alpha=-lr_p * c)
                return
            residual = G
        else:
            basis = self._subspace(G, state, group, position, k, t) if refresh else basis_of(state)
            low = project(G, basis)
            direction, c = base.direction(low, state, group, t - state["reset_step"])
            p.add_(project_back(direction, basis, tuple(G.shape)).reshape(p.shape), alpha=-lr_p * c)
            residual = G - project_back(low, basis, tuple(G.shape))
        step = _inactive_direction(residual, group["inactive_update_rule"])
        if step is not None:
            p.add_(step.reshape(p.shape), alpha=-lr_p * group["inactive_lr_scale"])

    @staticmethod
    def _new_block(G, state, group, position, count, k, t):
        """Every refresh clears every block's state; the active ones restart Adam from zero."""
        base = resolve_base(group["base"])
        for key in base_keys(base, group):
            state.pop(key, None)
        state["reset_step"] = t - 1          # a Python int: no device sync to read it
        active = position in active_blocks(k, count, group["density"], group["block_order"], group["seed"])
        state["active"] = active
        if active:
            base.init(G, state, group)

    def _subspace(self, G, state, group, position, k, t):
        shape, density, seed = tuple(G.shape), group["density"], _mix(group["seed"], position, k)
        projection = group["projection"]
        if projection == "coordinate":
            axis = group["coord_choice"]
            size = {"rows": shape[0], "cols": shape[1], "entries": shape[0] * shape[1]}[axis]
            new = coordinate_basis(shape, int(size * density), axis, seed, G.device)   # floor, as the author code
        else:
            side = projection_side(shape, group["proj_type"])
            dim = {"left": shape[0], "right": shape[1], "full": min(shape)}[side]
            rank = round(dim * density)
            new = (refresh_basis(G, rank, side, basis_of(state) or None, seed) if projection == "svd"
                   else random_basis(shape, rank, side, seed, G.device, G.dtype))
            new = {key: v.to(G.dtype) for key, v in new.items()}
        for key in [key for key in state if key.startswith(BASIS_PREFIX)]:
            del state[key]
        for key, value in new.items():
            state[BASIS_PREFIX + key] = value
        base = resolve_base(group["base"])
        if group["reset_statistics"] or "reset_step" not in state:
            for key in base_keys(base, group):
                state.pop(key, None)
            base.init(project(G, new), state, group)
            state["reset_step"] = t - 1          # a Python int: no device sync to read it
        return new


FRUGAL = FrugalRule()


class Frugal(ProjectedOptimizer):
    r"""FRUGAL: Adam on a subspace of each weight matrix, a state-free rule (signSGD) on the rest.

    For a projected tensor with gradient :math:`G`, every ``update_gap`` steps (steps 1, T+1, …) a new
    subspace is chosen; then with :math:`s_p` = ``proj_lr_scale``, :math:`s_i` = ``inactive_lr_scale``:

    .. math::
        \theta &\leftarrow \theta(1-\eta\lambda) \qquad\text{(every tensor, first)} \\
        \text{block:}\quad \theta &\leftarrow \theta - \eta s_p\,\mathrm{Adam}(G)\ \text{(active)},\qquad
              \theta \leftarrow \theta - \eta s_p s_i\,\mathrm{sign}(G)\ \text{(inactive)} \\
        \text{other:}\quad \theta &\leftarrow \theta - \eta s_p\,\mathrm{up}(\mathrm{Adam}(\mathrm{down}(G)))
              - \eta s_p s_i\,\mathrm{sign}(G - \mathrm{up}(\mathrm{down}(G)))

    Adam is torch's flavour (ε after the bias-corrected root, as the author code).  ``block``: at each refresh
    every tensor's state is cleared and ``round(ρ·#matrices)`` tensors restart Adam from zero (so ρ = 1 is
    "AdamW restarted every T steps"; with T beyond the run it is AdamW).  ``coordinate``: ``⌊ρ·size⌋``
    random columns/rows/entries.  ``svd`` / ``random``: rank ``round(ρ·d)`` of the projected side
    (``proj_type`` as GaLore).  ``reset_statistics`` zeroes the Adam state at each refresh (non-block).
    Tensors routed without a density (``density=None``: embeddings, norms, head, vectors) run the group's base
    densely (AdamW by default).  The refresh schedule is the group's (one clock: 1 + the largest step counter
    of its matrices), so a tensor skipped for a non-finite gradient refreshes with the others.

    Args:
        params: parameters or groups (routing as :class:`~torchstep.optim.GaLore`, by the ``density`` key).
        lr: η (default 1e-3).
        density: ρ, the state-full fraction (default 0.25); 0 = no Adam state for projected matrices.
        update_gap: T, steps between subspace refreshes (default 200).
        projection: ``block`` (default; the paper's main method), ``coordinate``, ``svd``, ``random``.
        block_order: ``descending`` (default; the paper's scripts — last layers first), ``ascending``, ``random``,
            ``mirror``.
        coord_choice: ``cols`` (default; author ``columns``), ``rows``, ``entries`` (author ``randk``).
        proj_type: side of the ``svd``/``random`` projection (default ``std``: the short side).
        reset_statistics: zero the Adam state when the subspace changes (default True).
        inactive_update_rule: ``sign_sgd`` (default), ``sgd``, ``none`` (author ``"no"``).
        inactive_lr_scale: s_i (default 1.0 pre-training; the paper uses 0.1 for fine-tuning).
        proj_lr_scale: s_p (default 1.0).
        weight_decay: λ, decoupled, before the update, on every tensor (default 0, the paper's scripts; the
            author class default is 0.01).
        seed: seeds the random block order and the coordinate/random subspaces (default 0; resume-exact).
        base: the state-full rule (default ``adamw-torch``; any :data:`~torchstep.optim.lowrank.BASES` name).
        maximize, nonfinite: the policies of every torchstep optimizer.
        **base_hyperparameters: ``betas`` (0.9, 0.999), ``eps`` (1e-8).

    Paper: Zmushko, Beznosikov, Takáč, Horváth, "FRUGAL: Memory-Efficient Optimization by Reducing State
    Overhead for Scalable Training", arXiv 2411.07837.  Deviations from the author code: the group clock is the
    largest step counter of its matrices (the author keys on the group's first tensor, whose counter stalls
    when it has no gradient; identical when every tensor gets a gradient every step); coordinate indices are sorted (the same subspace); the ``randperm``
    projection type is not offered; the subspace seeds come from ``seed`` (the author draws from the global RNG).
    Under FSDP2 (DTensor parameters): ``block`` runs on the shards (whole-tensor state-full/state-free choice,
    element-wise Adam and sign); ``coordinate`` / ``svd`` / ``random`` gather each projected matrix, its gradient
    and state (:func:`~torchstep.optim._dtensor.run_gathered`), compute the step on every rank and keep the local
    shard — exact, at the cost of one all-gather and a full-size transient per matrix and step.
    Memory: block — 2·(active tensors' sizes); coordinate — 2·⌊ρ n⌋·m + the index set; svd — the projector and
    Adam on the rank-``round(ρ d)`` projection; plus AdamW's 2× for unprojected tensors.
    """

    rule = FRUGAL
    route_key = "density"

    def __init__(self, params: Any, lr: float = 1e-3, density: float = 0.25, update_gap: int = 200,
                 projection: str = "block", block_order: str = "descending", coord_choice: str = "cols",
                 proj_type: str = "std", reset_statistics: bool = True, inactive_update_rule: str = "sign_sgd",
                 inactive_lr_scale: float = 1.0, proj_lr_scale: float = 1.0, weight_decay: float = 0.0,
                 seed: int = 0, base: str = "adamw-torch", *, maximize: bool = False, nonfinite: str = "skip",
                 **base_hyperparameters: Any) -> None:
        check_base_hyperparameters(base, base_hyperparameters)
        self._positions: dict[int, tuple[int, dict[int, int]]] = {}   # group → (size, matrix index by tensor id)
        self._clocks: dict[int, int] = {}                              # group → its step, fixed in step()
        super().__init__(params, dict(
            resolve_base(base).defaults, **base_hyperparameters, lr=lr, density=density, update_gap=update_gap,
            projection=projection, block_order=block_order, coord_choice=coord_choice, proj_type=proj_type,
            reset_statistics=reset_statistics, inactive_update_rule=inactive_update_rule,
            inactive_lr_scale=inactive_lr_scale, proj_lr_scale=proj_lr_scale, weight_decay=weight_decay,
            seed=seed, base=base, maximize=maximize, nonfinite=nonfinite))

    @torch.no_grad()
    def step(self, closure=None):
        """As every torchstep optimizer; first fixes each group's clock: 1 + the largest step counter among its
        matrices, so one skipped (non-finite) tensor cannot shift the group's refresh schedule."""
        self._clocks = {}
        for group in self.param_groups:
            steps = [step_of(self.state[p]) for p in group["params"] if p.dim() >= 2 and self.state.get(p)]
            self._clocks[id(group)] = 1 + max(steps, default=0)
        return super().step(closure)

    def _apply_rule(self, group, params, works, grads, states):
        key = id(group)
        if self._positions.get(key, (None,))[0] != len(group["params"]):
            self._positions[key] = (len(group["params"]),
                                    {id(p): i for i, p in enumerate(q for q in group["params"] if q.dim() >= 2)})
        index = self._positions[key][1]
        self.rule.update(works, grads, states, group, positions=[index.get(id(p), -1) for p in params],
                         clock=self._clocks[key], count=len(index))    # called per tensor: nothing O(N) here


__all__ = ["Frugal", "FRUGAL", "active_blocks", "PROJECTIONS", "BLOCK_ORDERS", "INACTIVE_RULES"]
