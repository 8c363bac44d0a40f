"""The registry: the only place that knows every optimizer name.

Each :class:`OptimizerSpec` carries what the generic conformance suite needs: valid
configuration variants, invalid configurations with the argument their error must name,
and convergence settings (learning rate and step budget on the test problems).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import optim
from .partition import as_params


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: type
    family: str
    arxiv: str
    parity: str | None = None            # official package the parity tests compare against
    configs: tuple[tuple[dict[str, Any], str], ...] = ()     # (kwargs, description)
    invalid: tuple[tuple[dict[str, Any], str], ...] = ()     # (kwargs, argument named in the error)
    base_kwargs: dict[str, Any] = field(default_factory=dict)  # always passed (e.g. SGDP's lr)
    quadratic_lr: float = 1e-2            # convergence settings of the conformance suite
    rosenbrock_lr: float = 1e-3
    steps: int = 2000
    decay_schedule: bool = True           # linear lr decay to 0 in the convergence tests
    skip_rosenbrock: tuple[str, ...] = () # configs documented not to solve Rosenbrock in budget
    bench_lr: float = 3e-3                # centre of the benchmark's lr grid
    bench_kwargs: dict[str, Any] = field(default_factory=dict)  # fixed benchmark hyperparameters
    hessian: str | None = None            # "gnb" / "hutchinson": the benchmark refreshes it every 10 steps
    reconstructed: bool = False           # rule partly our reading: the paper's algorithm box was not checked


_COMMON_INVALID = (({"lr": -1e-3}, "lr"),)
_BETAS_INVALID = (({"betas": (1.0, 0.999)}, r"betas\[0\]"), ({"betas": (0.9, -0.1)}, r"betas\[1\]"))
_EPS_INVALID = (({"eps": 0.0}, "eps"),)
_WD_INVALID = (({"weight_decay": -0.1}, "weight_decay"),)

SPECS: dict[str, OptimizerSpec] = {s.name: s for s in [
    OptimizerSpec(
        "lion", optim.Lion, "sign", "2302.06675", parity="lion-pytorch",
        configs=(({}, "default"), ({"weight_decay": 0.1}, "decoupled wd"),
                 ({"betas": (0.95, 0.98)}, "stable betas"), ({"maximize": True}, "maximize")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _WD_INVALID,
        quadratic_lr=3e-2, rosenbrock_lr=1e-2, bench_lr=3e-4),
    OptimizerSpec(
        "adamp", optim.AdamP, "adam", "2006.08217", parity="adamp",
        configs=(({}, "default"), ({"weight_decay": 1e-2}, "wd"), ({"nesterov": True}, "nesterov"),
                 ({"maximize": True}, "maximize")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"delta": -1.0}, "delta"), ({"wd_ratio": 2.0}, "wd_ratio")),
        quadratic_lr=1e-1, rosenbrock_lr=2e-2),
    OptimizerSpec(
        "sgdp", optim.SGDP, "sgd", "2006.08217", parity="adamp",
        base_kwargs={"lr": 1e-2},
        configs=(({"momentum": 0.9}, "momentum"), ({"momentum": 0.9, "nesterov": True}, "nesterov"),
                 ({"momentum": 0.9, "weight_decay": 1e-3}, "wd"), ({}, "plain"),
                 ({"momentum": 0.9, "compat": "official"}, "official")),
        invalid=_COMMON_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"momentum": 1.5}, "momentum"), ({"dampening": -1}, "dampening"), ({"delta": -1.0}, "delta"),
         ({"compat": "x"}, "compat")),
        # Plain gradient descent (no momentum) needs more than 6000 Rosenbrock steps at a stable lr.
        quadratic_lr=1e-2, rosenbrock_lr=1e-3, skip_rosenbrock=("plain",), bench_lr=3e-2,
        bench_kwargs={"momentum": 0.9}),
    OptimizerSpec(
        "diffgrad", optim.DiffGrad, "adam", "1909.11015",
        configs=(({}, "default"), ({"weight_decay": 1e-3}, "coupled L2"), ({"maximize": True}, "maximize")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID,
        quadratic_lr=1e-1, rosenbrock_lr=2e-2),
    OptimizerSpec(
        "sophiag", optim.SophiaG, "second-order", "2305.14342", parity="sophia-opt",
        configs=(({}, "default"), ({"weight_decay": 0.0, "rho": 0.05, "bs": 1}, "bs=1"),
                 ({"maximize": True}, "maximize")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"rho": 0.0}, "rho"), ({"bs": 0}, "bs")),
        quadratic_lr=3e-2, rosenbrock_lr=1e-2, bench_lr=3e-4, bench_kwargs={"weight_decay": 0.0}, hessian="gnb"),
    OptimizerSpec(
        "sophiah", optim.SophiaH, "second-order", "2305.14342",
        configs=(({}, "default"), ({"weight_decay": 0.1}, "wd"), ({"distribution": "gaussian"}, "gaussian")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"rho": -1.0}, "rho"), ({"samples": 0}, "samples"), ({"distribution": "x"}, "distribution")),
        quadratic_lr=3e-2, rosenbrock_lr=1e-2, bench_lr=3e-4, hessian="hutchinson"),
    OptimizerSpec(
        "spam", optim.SPAM, "adam", "2501.06842",
        configs=(({}, "paper"), ({"compat": "official"}, "official"),
                 ({"reset_interval": 50, "warmup_steps": 10, "grad_accu_steps": 5}, "frequent resets"),
                 ({"weight_decay": 1e-2}, "wd")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"threshold": -1}, "threshold"), ({"reset_interval": -1}, "reset_interval"),
         ({"warmup_steps": -5}, "warmup_steps"), ({"compat": "x"}, "compat")),
        quadratic_lr=1e-1, rosenbrock_lr=2e-2),
    OptimizerSpec(
        "stablespam", optim.StableSPAM, "adam", "2502.17055",
        configs=(({}, "paper"), ({"compat": "official", "total_T": 500}, "official"),
                 ({"reset_interval": 50, "total_T": 300}, "frequent resets"),
                 ({"adaclip": False, "adagn": False}, "plain")),
        invalid=_COMMON_INVALID + _BETAS_INVALID + _EPS_INVALID + _WD_INVALID +
        (({"gamma1": 1.0}, "gamma1"), ({"gamma3": -0.1}, "gamma3"), ({"eta_min": 2.0}, "eta_min"),
         ({"total_T": 0}, "total_T"), ({"compat": "x"}, "compat")),
        quadratic_lr=1e-1, rosenbrock_lr=2e-2),
    OptimizerSpec(
        "classp", optim.CLASSP, "adagrad", "2405.09637",
        configs=(({"threshold": 0.0}, "no threshold"), ({"threshold": 0.0, "power": 2.0}, "AdaGrad power"),
                 ({"threshold": 0.0, "compat": "official"}, "official"), ({}, "default threshold")),
        invalid=_COMMON_INVALID + _EPS_INVALID +
        (({"threshold": -1.0}, "threshold"), ({"power": 0.0}, "power"), ({"compat": "x"}, "compat")),
        # The accumulator is CLASSP's own decay, so no schedule.  With power 1 the sum of |g|
        # grows with Rosenbrock's early O(100) gradients and the iterate stalls (measured: ∞-norm
        # error 0.84 after 6000 steps at the best lr of {0.3, 1, 3}) — documented, not hidden.
        quadratic_lr=5e-1, rosenbrock_lr=1.0, decay_schedule=False,
        skip_rosenbrock=("no threshold", "official"),
        # threshold 0: the default 0.5 assumes the paper's gradient scale and freezes most tasks here
        bench_lr=3e-2, bench_kwargs={"threshold": 0.0}),
    # Hybrid matrix methods: the conformance problems' 1-D tensors go to the AdamW fallback, whose lr
    # the convergence tests set through fallback_lr (matrix-specific behaviour is tested in test_muon.py).
    OptimizerSpec(
        "muon", optim.Muon, "orthogonalized", "2502.16982", parity="torch.optim.Muon",
        base_kwargs={"fallback_lr": 2e-2},
        configs=(({}, "default"), ({"nesterov": False, "weight_decay": 0.1}, "plain momentum + wd"),
                 ({"adjust_lr": "match_rms_adamw", "lr": 1e-3}, "match_rms_adamw"),
                 ({"ns_preset": "polar_express5", "ns_dtype": "float32"}, "polar express fp32")),
        invalid=_COMMON_INVALID + _WD_INVALID +
        (({"momentum": 1.5}, "momentum"), ({"ns_steps": 0}, "ns_steps"), ({"ns_preset": "x"}, "ns_preset"),
         ({"adjust_lr": "x"}, "adjust_lr"), ({"fallback_lr": -1.0}, "fallback_lr"), ({"ns_dtype": "x"}, "ns_dtype")),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=3e-3, bench_kwargs={"adjust_lr": "match_rms_adamw",
                                                                             "fallback_lr": 3e-3}),
    OptimizerSpec(
        "normuon", optim.NorMuon, "orthogonalized", "2510.05491",
        base_kwargs={"fallback_lr": 2e-2},
        configs=(({}, "paper"), ({"compat": "official"}, "official"), ({"beta2": 0.0}, "beta2=0")),
        invalid=_COMMON_INVALID + _WD_INVALID +
        (({"beta2": 1.0}, "beta2"), ({"compat": "x"}, "compat"), ({"normalize_eps": 0.0}, "normalize_eps")),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=3e-3, bench_kwargs={"fallback_lr": 3e-3}),
    OptimizerSpec(
        "muonpp", optim.MuonPP, "orthogonalized", "2601.01306", reconstructed=True,
        base_kwargs={"fallback_lr": 2e-2, "weight_decay": 0.0},
        configs=(({}, "no decay"), ({"weight_decay": 0.1, "nesterov": False}, "decay (weight bound)"),
                 ({"ns_preset": "convergent", "ns_steps": 12, "ns_dtype": "float32"}, "convergent NS fp32")),
        invalid=_COMMON_INVALID + _WD_INVALID +
        (({"weight_decay": 100.0}, "weight_decay"), ({"adjust_lr": "original"}, "adjust_lr"),
         ({"ns_steps": 0}, "ns_steps")),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=1e-2, bench_kwargs={"fallback_lr": 3e-3, "weight_decay": 0.0}),
    OptimizerSpec(
        "lanton", optim.Lanton, "orthogonalized", "2510.14009", reconstructed=True,
        base_kwargs={"fallback_lr": 2e-2},
        configs=(({}, "spectral, nuclear"), ({"noise_norm": "frobenius"}, "frobenius noise"),
                 ({"lmo": "sign"}, "sign LMO"), ({"nesterov": True, "weight_decay": 0.1}, "nesterov + wd")),
        invalid=_COMMON_INVALID + _WD_INVALID +
        (({"beta2": 1.0}, "beta2"), ({"lmo": "x"}, "lmo"), ({"noise_norm": "x"}, "noise_norm"),
         ({"momentum": 1.5}, "momentum")),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=1e-2, bench_kwargs={"fallback_lr": 3e-3}),
    OptimizerSpec(
        "sinkgd", optim.SinkGD, "stateless", "2502.06742",
        base_kwargs={"fallback_lr": 2e-2},
        configs=(({}, "default"), ({"normalization": "unit", "iters": 2}, "unit"),
                 ({"weight_decay": 0.1}, "wd")),
        invalid=_COMMON_INVALID + _WD_INVALID + (({"iters": 0}, "iters"), ({"normalization": "x"}, "normalization")),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=3e-3, bench_kwargs={"fallback_lr": 3e-3}),
    OptimizerSpec(
        "swan", optim.SWAN, "stateless", "2412.13148",
        base_kwargs={"fallback_lr": 2e-2},
        configs=(({}, "default"), ({"ns_steps": 5}, "5 NS steps")),
        invalid=_COMMON_INVALID + _WD_INVALID + (({"ns_steps": 0}, "ns_steps"),),
        quadratic_lr=2e-2, rosenbrock_lr=2e-2, bench_lr=3e-3, bench_kwargs={"fallback_lr": 3e-3}),
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
    decay); ``overrides`` maps a group kind (``matrix, embedding, head, no_decay``) to extra group
    keys.  Everything else goes to the optimizer's constructor.
    """
    cls = get_spec(name).cls
    if isinstance(model_or_params, nn.Module):
        opts: dict[str, Any] = {"overrides": overrides}
        if head_pattern is not None:
            opts["head_pattern"] = head_pattern
        groups = as_params(model_or_params, **opts)
        if "weight_decay" not in inspect.signature(cls).parameters:
            for g in groups:
                g.pop("weight_decay", None)
        return cls(groups, **hyperparams)
    if overrides or head_pattern:
        raise ValueError("overrides/head_pattern need a model (nn.Module), not a parameter list")
    return cls(model_or_params, **hyperparams)
