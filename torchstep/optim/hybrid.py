"""One optimizer object for a matrix rule plus its AdamW fallback, routed per group by labels.

Hidden weight matrices get the matrix rule; everything else (embeddings, output head, norms, biases,
0-/1-D tensors) gets AdamW at an explicit fallback learning rate.  One ``step``, one scheduler (it scales
every group's own lr), one checkpoint.

Routing, per group, first match wins:
``algo`` key (the class's matrix rule name, or ``"adamw"``) → ``use_muon`` (True: matrix rule) →
``use_fallback`` (True: AdamW) → the partitioner's group ``name`` (a label of
:data:`torchstep.partition.FALLBACK_LABELS` → AdamW, ``matrix`` → matrix rule) → **per tensor**
(:func:`torchstep.partition.tensor_label`): a group without any of these is split at construction into a
matrix group (tensors with ``ndim >= 2``) and an AdamW group whose ``lr``/``betas``/``eps``/``weight_decay``
come from ``fallback_lr``/``fallback_betas``/``fallback_eps``/``fallback_weight_decay``.
"""
from __future__ import annotations

from typing import Any

from torch import Tensor

from ..partition import FALLBACK_LABELS, MATRIX, split_by_tensor_label
from ._base import Rule, TorchstepOptimizer, check_choice, check_range
from .adamw import ADAMW
from .matrix import MatrixRule, shared_owner_loads


def hybrid_defaults(rule: MatrixRule, fallback_lr: float, fallback_betas: tuple[float, float], fallback_eps: float,
                    fallback_weight_decay: float, maximize: bool, nonfinite: str, **hyperparameters: Any
                    ) -> dict[str, Any]:
    """The defaults dict of a hybrid: the rule's hyperparameters plus the AdamW fallback's."""
    return dict(hyperparameters, fallback_lr=fallback_lr, fallback_betas=fallback_betas, fallback_eps=fallback_eps,
                fallback_weight_decay=fallback_weight_decay, betas=fallback_betas, eps=fallback_eps,
                algo=rule.name, maximize=maximize, nonfinite=nonfinite)


class MatrixHybrid(TorchstepOptimizer):
    """Base of the hybrid optimizers: ``matrix_rule`` (class attribute) for matrices, AdamW for the rest.

    Args:
        params: parameters or groups, routed as in the module docstring.
        defaults: the hyperparameters, built with :func:`hybrid_defaults`.
    """

    matrix_rule: MatrixRule
    fallback_rule: Rule = ADAMW

    @property
    def algos(self) -> tuple[str, str]:
        return self.matrix_rule.name, self.fallback_rule.name

    def rule_for(self, group: dict[str, Any]) -> Rule:
        return self.matrix_rule if group["algo"] == self.matrix_rule.name else self.fallback_rule

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        algo = self._explicit_algo(group)
        if algo is not None:
            group.pop("use_muon", None), group.pop("use_fallback", None)
            return super().add_param_group({**self._fallback_keys(group, algo), **group, "params": params,
                                            "algo": algo})
        for label, sub in split_by_tensor_label({**group, "params": params}):
            algo = self.matrix_rule.name if label == MATRIX else self.fallback_rule.name
            super().add_param_group({**self._fallback_keys(sub, algo), **sub, "algo": algo})

    def _explicit_algo(self, group: dict[str, Any]) -> str | None:
        matrix, fallback = self.algos
        if "algo" in group:
            return group["algo"]
        if "use_muon" in group:
            return matrix if group["use_muon"] else fallback
        if "use_fallback" in group:
            return fallback if group["use_fallback"] else matrix
        if group.get("name") in FALLBACK_LABELS:
            return fallback
        if group.get("name") == MATRIX:
            return matrix
        return None

    def _fallback_keys(self, group: dict[str, Any], algo: str) -> dict[str, Any]:
        """An AdamW group takes its hyperparameters from the fallback_* values unless set explicitly."""
        if algo != self.fallback_rule.name:
            return {}
        d = {**self.defaults, **group}
        return {"lr": d["fallback_lr"], "betas": d["fallback_betas"], "eps": d["fallback_eps"],
                "weight_decay": d["fallback_weight_decay"]}

    def step(self, closure: Any = None) -> Any:
        """One step; under DDP ``split_across_ranks`` / FSDP2 the owner plans of the matrix groups share
        their per-rank loads (:func:`torchstep.optim.matrix.shared_owner_loads`)."""
        with shared_owner_loads():
            return super().step(closure)

    def _validate(self, group):
        check_choice("algo", group["algo"], self.algos)
        check_range("fallback_lr", group["fallback_lr"], 0.0)
        check_range("fallback_eps", group["fallback_eps"], 0.0, lo_open=True)
        check_range("fallback_weight_decay", group["fallback_weight_decay"], 0.0)
        super()._validate(group)
