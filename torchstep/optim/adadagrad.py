"""AdaGrad-Norm and AdaGrad: the base optimizers of AdAdaGrad (adaptive batch sizes, arXiv 2402.11215).

The batch-size controller is :class:`torchstep.scaling.adaptive_batch.AdaptiveBatch`; these optimizers are
the update rules it grows the batch for.  One rule, four accumulator granularities:

* ``"group"`` – one scalar ``b² = b₀² + Σ_t ‖g_t‖²`` over every tensor of the parameter group (AdaGrad-Norm);
* ``"tensor"`` – one scalar per tensor;
* ``"row"`` – one accumulator per output row / channel of the ``(out, prod(rest))`` view (the official
  repository's ``Adagradnorm`` class); a vector's rows are its entries;
* ``"coordinate"`` – one per coordinate (AdaGrad; ``torch.optim.Adagrad``'s update).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ._base import Rule, TorchstepOptimizer, check_choice, check_range, scalar
from ._dtensor import full_state

SCALAR_ACCUMULATORS = ("group", "tensor")


def accumulator_shape(p: Tensor, accumulator: str) -> tuple[int, ...]:
    """The shape of ``p``'s accumulator: ``()`` (scalar), ``(out, 1, …)`` (per row) or ``p.shape``."""
    if accumulator in SCALAR_ACCUMULATORS:
        return ()
    if accumulator == "row" and p.dim() >= 2:
        return (p.shape[0],) + (1,) * (p.dim() - 1)
    return tuple(p.shape)


def squared_norms(grad: Tensor, accumulator: str) -> Tensor:
    """``‖g‖²`` at the accumulator's granularity (a 0-dim tensor, per row with kept dims, or ``g²``)."""
    if accumulator in SCALAR_ACCUMULATORS:
        return torch.linalg.vector_norm(grad).square()
    if accumulator == "row" and grad.dim() >= 2:
        return torch.linalg.vector_norm(grad, dim=tuple(range(1, grad.dim())), keepdim=True).square()
    return grad.square()


class AdaGradRule(Rule):
    """AdaGrad(-Norm) with one of the accumulators named in ``accumulators``.

    Args:
        name: the rule's name.
        accumulators: the granularities this rule accepts (validated as the group's ``accumulator``).
        batched: True for the ``"group"`` accumulator (the step needs the whole group's squared norm).
    """

    maskable = True    # per-tensor accumulators: the "mask" policy applies (not to the batched "group" one)

    def __init__(self, name: str, accumulators: tuple[str, ...], batched: bool) -> None:
        self.name, self.accumulators, self.batched = name, accumulators, batched

    def validate(self, group):
        check_choice("accumulator", group["accumulator"], self.accumulators)
        check_range("initial_accumulator_value", group["initial_accumulator_value"], 0.0)

    def init_state(self, p, state, group):
        # "group": each tensor keeps its share Σ_t ‖g_t‖² and b₀² is added once per step to the group's total
        mode = group["accumulator"]
        value = 0.0 if mode == "group" else group["initial_accumulator_value"]
        if mode == "coordinate" or (mode == "row" and p.dim() < 2):
            state["sum"] = torch.full_like(p, value, memory_format=torch.preserve_format)
        else:
            state["sum"] = full_state(p, accumulator_shape(p, mode), value)   # a DTensor under FSDP2

    def update(self, params, grads, states, group, rest: Sequence[Tensor] = ()):
        """``rest``: the ``"group"`` accumulator's shares of the group's tensors not updated this step (no
        gradient, or a skipped non-finite one) — they still count in the group's scalar."""
        lr, eps, wd, mode = scalar(group["lr"]), group["eps"], group["weight_decay"], group["accumulator"]
        effective = []
        for p, grad, state in zip(params, grads, states):
            if state["sum"].shape != accumulator_shape(p, mode):
                raise ValueError(f"Invalid accumulator: {mode!r} (valid range: the granularity this tensor's state "
                                 f"was created with; its accumulator has shape {tuple(state['sum'].shape)})")
            if wd != 0:
                grad = grad.add(p, alpha=wd)           # coupled L2, as torch.optim.Adagrad
            if mode in SCALAR_ACCUMULATORS:
                # saturate: an inf accumulator would freeze the tensor for good
                state["sum"].add_(squared_norms(grad, mode)).clamp_max_(torch.finfo(state["sum"].dtype).max)
            elif mode == "coordinate":
                state["sum"].addcmul_(grad, grad, value=1)
            else:
                state["sum"].add_(squared_norms(grad, mode))
            effective.append(grad)
        if mode == "group":
            shares = [s["sum"] for s in states] + list(rest)
            dtype = shares[0].dtype
            for share in shares[1:]:
                dtype = torch.promote_types(dtype, share.dtype)
            total = torch.stack([s.to(device=shares[0].device, dtype=dtype) for s in shares]).sum()
            denominator = total.add_(group["initial_accumulator_value"]).sqrt_().add_(eps)
            for p, grad in zip(params, effective):
                p.addcdiv_(grad, denominator.to(device=p.device, dtype=p.dtype), value=-lr)
            return
        for p, grad, state in zip(params, effective, states):
            p.addcdiv_(grad, state["sum"].sqrt().add_(eps), value=-lr)


class _AdaGradFamily(TorchstepOptimizer):
    """Routes ``accumulator="group"`` groups to the batched rule (it needs every share of the group)."""

    rule: AdaGradRule
    group_rule: AdaGradRule | None = None

    def rule_for(self, group):
        if group["accumulator"] == "group" and self.group_rule is not None:
            return self.group_rule
        return self.rule

    def _apply_rule(self, group, params, works, grads, states):
        rest = []
        if group["accumulator"] == "group":
            live = {id(p) for p in params}
            rest = [self.state[p]["sum"] for p in group["params"] if id(p) not in live and self.state.get(p)]
        self.rule_for(group).update(works, grads, states, group, rest=rest)


_NORM_ACCUMULATORS = ("group", "tensor", "row")
ADAGRAD_NORM = AdaGradRule("adadagrad-norm", _NORM_ACCUMULATORS, batched=False)
ADAGRAD_NORM_GROUP = AdaGradRule("adadagrad-norm", _NORM_ACCUMULATORS, batched=True)
ADAGRAD = AdaGradRule("adadagrad", ("coordinate", "row"), batched=False)


class AdAdaGradNorm(_AdaGradFamily):
    r"""AdaGrad-Norm, the scalar-step base optimizer of AdAdaGrad-Norm (grow the batch with ``AdaptiveBatch``).

    With ``G_t`` the group's (mini-batch) gradient, ``g_t = G_t + λθ_t`` and ``S`` the accumulator:

    .. math::
        b_t^2 &= b_0^2 + \sum_{s \le t} \|g_s\|^2 \qquad (\|\cdot\| \text{ over every tensor of the group}) \\
        \theta_{t+1} &= \theta_t - \frac{\eta}{b_t + \epsilon}\, g_t

    (the current gradient is in the accumulator, as in Ward et al.'s AdaGrad-Norm and the official code).

    Args:
        params: parameters or groups.
        lr: η (default 1.0, the official ``Adagradnorm`` class's default; the paper's analysis allows any η > 0).
        initial_accumulator_value: b₀² (default 1e-2, the official class's; ≥ 0).
        eps: ε added after the square root (default 1e-10, as the official class and ``torch.optim.Adagrad``).
        weight_decay: coupled L2 λ, added to the gradient before it is accumulated (default 0; the paper has none).
        accumulator: ``"group"`` (default) — one scalar b² per parameter group: the paper's AdaGrad-Norm when all
            parameters share one group (``AdAdaGradNorm(model.parameters())``; ``torchstep.create(name, model)``
            partitions the model into label groups, each then with its own scalar); ``"tensor"`` — one scalar
            per tensor; ``"row"`` — one accumulator per output row / channel of the ``(out, prod(rest))`` view
            (the official repository's ``Adagradnorm``, whose experiments ran it as "AdaGrad-Norm").
        maximize, nonfinite: the policies of every torchstep optimizer.

    ``initial_accumulator_value`` is read every step for ``"group"`` (b₀² is added to the group's total), and
    when a tensor's state is created for ``"tensor"`` / ``"row"`` (stored in the accumulator, as torch's
    Adagrad).  The granularity is fixed when a tensor's state is created: changing it later raises where the
    accumulator's shape differs (``"row"`` / ``"coordinate"`` vs a scalar); ``"tensor"`` ↔ ``"group"`` (both a
    scalar) is not detected and counts b₀² twice — do not switch them mid-run.
    Tensors without a gradient this step, or skipped for a non-finite one, add nothing to b² but their past
    share still counts.  A scalar accumulator saturates at the dtype's largest value instead of becoming inf.

    Paper: Lau, Liu, Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods",
    arXiv 2402.11215 (AdaGrad-Norm: Ward, Wu, Bottou, arXiv 1806.01811).  Official code: timlautk/AdAdaGrad
    ``adagradnorm.py`` (checked: accumulate before the root, ε = 1e-10 after it, b₀² = 1e-2, lr 1.0).
    Deviations from the official class (``accumulator="row"``): 3-D tensors (Conv1d) get one accumulator per
    output row here (official: per coordinate); its branch for shapes other than 2-D / 4-D, which first adds
    the *previous* parameter's mean row norm when the shapes happen to broadcast, is not reproduced; its ``weight_decay`` (which subtracts
    η·λ·g, not η·λ·θ) is replaced by coupled L2; its ``momentum`` and ``lr_decay`` are not offered (use a
    scheduler).  Memory: one scalar per tensor (``"group"``, ``"tensor"``) or one per output row (``"row"``).
    """

    rule = ADAGRAD_NORM
    group_rule = ADAGRAD_NORM_GROUP

    def __init__(self, params: Any, lr: float = 1.0, initial_accumulator_value: float = 1e-2, eps: float = 1e-10,
                 weight_decay: float = 0.0, accumulator: str = "group", *, maximize: bool = False,
                 nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      weight_decay=weight_decay, accumulator=accumulator, maximize=maximize,
                                      nonfinite=nonfinite))


class AdAdaGrad(_AdaGradFamily):
    r"""AdaGrad, the coordinate-wise base optimizer of AdAdaGrad (grow the batch with ``AdaptiveBatch``).

    With ``g_t = G_t + λθ_t`` and ``S_0 = b₀²`` (``initial_accumulator_value``), per coordinate:

    .. math::
        S_t &= S_{t-1} + g_t^2 \\
        \theta_{t+1} &= \theta_t - \frac{\eta}{\sqrt{S_t} + \epsilon}\, g_t

    With the defaults this is ``torch.optim.Adagrad`` (``lr_decay=0``) operation for operation — the
    optimizer the official repository runs for its AdAdaGrad experiments (tested bit for bit).

    Args:
        params: parameters or groups.
        lr: η (default 1e-2, torch's; the official scripts use 8e-3 to 5e-2).
        initial_accumulator_value: S₀ (default 0, torch's; 1e-2 is the official ``Adagradnorm`` class's).
        eps: ε added after the square root (default 1e-10, torch's).
        weight_decay: coupled L2 λ (default 0), as ``torch.optim.Adagrad``.
        accumulator: ``"coordinate"`` (default, AdaGrad) or ``"row"`` — one accumulator per output row /
            channel of the ``(out, prod(rest))`` view (the official ``Adagradnorm`` class; see
            :class:`AdAdaGradNorm` for its deviations).
        maximize, nonfinite: the policies of every torchstep optimizer.

    ``initial_accumulator_value`` is read when a tensor's state is created (torch semantics).
    Paper: Lau, Liu, Kolar, arXiv 2402.11215 (AdaGrad: Duchi, Hazan, Singer 2011).  Deviations: ``lr_decay``
    is not offered (use a scheduler); the paper's coordinate-wise variant of the *batch-size tests* is not
    implemented (``AdaptiveBatch`` runs the norm / inner-product / orthogonality tests of the official code).
    Memory: one buffer (``sum``, as the parameter) for ``"coordinate"``, one per output row for ``"row"``.
    """

    rule = ADAGRAD

    def __init__(self, params: Any, lr: float = 1e-2, initial_accumulator_value: float = 0.0, eps: float = 1e-10,
                 weight_decay: float = 0.0, accumulator: str = "coordinate", *, maximize: bool = False,
                 nonfinite: str = "skip") -> None:
        super().__init__(params, dict(lr=lr, initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      weight_decay=weight_decay, accumulator=accumulator, maximize=maximize,
                                      nonfinite=nonfinite))


__all__ = ["AdAdaGradNorm", "AdAdaGrad", "AdaGradRule", "ADAGRAD", "ADAGRAD_NORM", "accumulator_shape",
           "squared_norms"]
