"""The registry: the only place that knows every optimizer name, with public metadata only.

Test fixtures (valid/invalid configurations, convergence budgets) live in ``tests/fixtures.py`` and
benchmark settings (lr grid centres, fixed hyperparameters) in ``torchstep/bench/arms.py``; both are
checked to cover exactly the names registered here.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from torch import nn

from . import optim
from .partition import as_params


class Family(str, Enum):
    """What kind of update a method makes (its ``value`` is what ``torchstep list`` prints)."""
    ADAM = "adam"
    SGD = "sgd"
    SIGN = "sign"
    ADAGRAD = "adagrad"
    SECOND_ORDER = "second-order"
    ORTHOGONALIZED = "orthogonalized"
    STATELESS = "stateless"
    LOW_RANK = "low-rank"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    family: Family
    arxiv: str
    parity: str | None = None       # official package the parity tests compare against
    reconstructed: bool = False     # rule partly our reading: the paper's algorithm box was not checked
    weight_decay: bool = True       # the method has a weight-decay hyperparameter (the partitioner sets it)

    @property
    def hybrid(self) -> bool:
        """A matrix rule with an AdamW fallback (routes its own groups by labels)."""
        return issubclass(self.cls, optim.MatrixHybrid)


F = Family
SPECS: dict[str, OptimizerSpec] = {s.name: s for s in [
    OptimizerSpec("adamw", optim.AdamW, F.ADAM, "1711.05101", parity="torch.optim.AdamW"),
    OptimizerSpec("lion", optim.Lion, F.SIGN, "2302.06675", parity="lion-pytorch"),
    OptimizerSpec("adamp", optim.AdamP, F.ADAM, "2006.08217", parity="adamp"),
    OptimizerSpec("sgdp", optim.SGDP, F.SGD, "2006.08217", parity="adamp"),
    OptimizerSpec("diffgrad", optim.DiffGrad, F.ADAM, "1909.11015"),
    OptimizerSpec("sophiag", optim.SophiaG, F.SECOND_ORDER, "2305.14342", parity="sophia-opt"),
    OptimizerSpec("sophiah", optim.SophiaH, F.SECOND_ORDER, "2305.14342", parity="pytorch-optimizer"),
    OptimizerSpec("spam", optim.SPAM, F.ADAM, "2501.06842"),
    OptimizerSpec("stablespam", optim.StableSPAM, F.ADAM, "2502.17055"),
    OptimizerSpec("classp", optim.CLASSP, F.ADAGRAD, "2405.09637", weight_decay=False),
    OptimizerSpec("muon", optim.Muon, F.ORTHOGONALIZED, "2502.16982", parity="torch.optim.Muon"),
    OptimizerSpec("normuon", optim.NorMuon, F.ORTHOGONALIZED, "2510.05491"),
    OptimizerSpec("muonpp", optim.MuonPP, F.ORTHOGONALIZED, "2601.01306", reconstructed=True),
    OptimizerSpec("lanton", optim.Lanton, F.ORTHOGONALIZED, "2510.14009", reconstructed=True),
    OptimizerSpec("sinkgd", optim.SinkGD, F.STATELESS, "2502.06742"),
    OptimizerSpec("swan", optim.SWAN, F.STATELESS, "2412.13148"),
    OptimizerSpec("galore", optim.GaLore, F.LOW_RANK, "2403.03507", parity="galore-torch"),
    OptimizerSpec("fira", optim.Fira, F.LOW_RANK, "2410.01623", parity="fira"),
    OptimizerSpec("frugal", optim.Frugal, F.LOW_RANK, "2411.07837"),
    OptimizerSpec("gradnormlorp", optim.GradNormLoRP, F.LOW_RANK, "2412.19616", reconstructed=True),
    OptimizerSpec("schedulefree-adamw", optim.ScheduleFreeAdamW, F.ADAM, "2405.15682", parity="schedulefree"),
    OptimizerSpec("schedulefree-sgd", optim.ScheduleFreeSGD, F.SGD, "2405.15682", parity="schedulefree"),
    OptimizerSpec("adadagrad", optim.AdAdaGrad, F.ADAGRAD, "2402.11215", parity="torch.optim.Adagrad"),
    OptimizerSpec("adadagrad-norm", optim.AdAdaGradNorm, F.ADAGRAD, "2402.11215"),
]}


def list_optimizers() -> list[str]:
    """Names accepted by :func:`create`, sorted."""
    return sorted(SPECS)


def get_spec(name: str) -> OptimizerSpec:
    try:
        return SPECS[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown optimizer {name!r}; valid: {', '.join(list_optimizers())}") from None


def create(name: str, model_or_params: Any, *, overrides: dict[str, dict[str, Any]] | None = None,
           head_pattern: str | None = None, **hyperparams: Any):
    """Build optimizer ``name`` for a model (auto-partitioned, named groups) or for parameters.

    With a model, biases/norms/1-D tensors get ``weight_decay=0`` (when the method has weight
    decay); ``overrides`` maps a group label (:data:`torchstep.partition.LABELS`) to extra group
    keys.  Everything else goes to the optimizer's constructor.
    """
    spec = get_spec(name)
    if isinstance(model_or_params, nn.Module):
        opts: dict[str, Any] = {"overrides": overrides, "decay_keys": spec.weight_decay}
        if head_pattern is not None:
            opts["head_pattern"] = head_pattern
        return spec.cls(as_params(model_or_params, **opts), **hyperparams)
    if overrides or head_pattern:
        raise ValueError("overrides/head_pattern need a model (nn.Module), not a parameter list")
    return spec.cls(model_or_params, **hyperparams)
