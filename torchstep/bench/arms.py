"""The one table of benchmark arms: torch peers plus every registered torchstep optimizer.

Used by the sweep, the step-time benchmark (``torchstep bench speed``) and the width sweep.  Benchmark
defaults (lr grid centre, fixed hyperparameters, Hessian refresh, peer implementation) live here, not in
the registry; :data:`BENCH` must name exactly the registry's optimizers (tested).

Matched routing: on tasks with a real model (``Problem.routed``) every arm applies its rule with its
searched lr to the partitioner's ``matrix`` group, while embeddings, the output head, norms and biases go
to AdamW (torchstep's, the same rule as the ``adamw`` arm) at the task's fixed ``FALLBACK_LR`` **for every
arm, AdamW included** — so routing cannot explain a difference between arms.  On synthetic problems the
arm gets every parameter.  Weight decay is 0 for every arm (known-optimum tasks need the unregularised
objective; decay is not tuned in protocol v1).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from ..memory import state_bytes
from ..ops import gnb_sampled_loss
from .. import schedules
from ..ops.curves import warmup_cosine
from ..optim import AdamW, Muon, MuonPP, Spectra
from ..partition import MATRIX, param_groups, tensor_label
from ..scaling.mup import hidden_lr_factor
from ..registry import SPECS
from .tasks import Problem

FALLBACK_LR = 3e-3
HESSIAN_PERIOD = 10


@dataclass(frozen=True)
class Arm:
    name: str
    build: Callable[..., torch.optim.Optimizer]   # build(groups, lr=…, **kwargs)
    default_lr: float                               # centre of the lr grid
    kwargs: dict[str, Any] = field(default_factory=dict)   # fixed benchmark hyperparameters
    accepts: Callable[[Tensor], bool] | None = None  # tensors the rule takes; the rest go to the shared fallback
    hessian: str | None = None                       # "gnb" | "hutchinson": periodic Sophia refresh
    peer: tuple[str, dict[str, Any]] | None = None   # same method in pip pytorch-optimizer (speed benchmark)
    #: RL arms: ``{"preset": name, "overrides": {...}, "dynamic_sampling": bool}`` (torchstep.objectives) — the
    #: arm is the objective, ``build`` its fixed optimizer; they run on ``kind == "rl"`` tasks only
    objective: dict[str, Any] | None = None
    #: fine-tuning arms: ``{"method": name, ...}`` (bench/finetune.py: the adaptation method — LoRA, DoRA, HFT, …,
    #: ``build`` its optimizer); they run on ``kind == "finetune"`` tasks only
    adapter: dict[str, Any] | None = None

    @property
    def kind(self) -> str:
        """The task kind the arm runs on: ``"rl"`` (objective arms), ``"finetune"`` (adapter arms), ``"supervised"``."""
        return "rl" if self.objective is not None else "finetune" if self.adapter is not None else "supervised"

    @property
    def spec(self) -> dict[str, Any] | None:
        """What the task needs to know about the arm besides its optimizer (objective or adapter), or None."""
        return self.objective if self.objective is not None else self.adapter

    @property
    def matrix_only(self) -> bool:
        return self.accepts is not None

    def make(self, groups: Any, lr: float, **overrides: Any) -> torch.optim.Optimizer:
        return self.build(groups, lr=lr, **{**self.kwargs, **overrides})


def _is_matrix(p: Tensor) -> bool:
    return tensor_label(p) == MATRIX


#: benchmark settings of every registered optimizer: (grid centre, fixed kwargs, Hessian refresh, peer)
BENCH: dict[str, tuple[float, dict[str, Any], str | None, tuple[str, dict] | None]] = {
    "adamw": (3e-3, {"weight_decay": 0.0}, None, None),
    "lion": (3e-4, {}, None, ("Lion", {})),
    "adamp": (3e-3, {}, None, ("AdamP", {})),
    "sgdp": (3e-2, {"momentum": 0.9}, None, ("SGDP", {"momentum": 0.9})),
    "diffgrad": (3e-3, {}, None, ("DiffGrad", {})),
    "sophiag": (3e-4, {"weight_decay": 0.0}, "gnb", None),
    "sophiah": (3e-4, {}, "hutchinson", None),
    "spam": (3e-3, {}, None, ("SPAM", {})),
    "stablespam": (3e-3, {}, None, ("StableSPAM", {})),
    # threshold 0: the default 0.5 assumes the paper's gradient scale and freezes most tasks here
    "classp": (3e-2, {"threshold": 0.0}, None, None),
    "muon": (3e-3, {"adjust_lr": "match_rms_adamw", "fallback_lr": FALLBACK_LR}, None, None),
    "normuon": (3e-3, {"fallback_lr": FALLBACK_LR}, None, None),
    "muonpp": (1e-2, {"fallback_lr": FALLBACK_LR, "weight_decay": 0.0}, None, None),
    "lanton": (1e-2, {"fallback_lr": FALLBACK_LR}, None, None),
    "sinkgd": (3e-3, {"fallback_lr": FALLBACK_LR}, None, None),
    # with the paper's rescale the update has RMS ≈ 1 per entry (as SinkGD's): the same grid centre
    "swan": (3e-3, {"fallback_lr": FALLBACK_LR}, None, None),
    # low-rank rules: r = min(m, n)/4 (the paper's r/d_model at 350M), refresh every 50 of the tasks' 300 steps
    "galore": (1e-2, {"rank": 0.25, "update_proj_gap": 50}, None, None),
    "fira": (1e-2, {"rank": 0.25, "update_proj_gap": 50}, None, None),
    "frugal": (3e-3, {"update_gap": 50}, None, None),
    "gradnormlorp": (1e-2, {"rank": 0.25, "update_proj_gap": 50}, None, None),
    # Schedule-Free: its own averaging replaces the schedule (the harness' cosine still multiplies the lr)
    "schedulefree-adamw": (3e-3, {}, None, None),
    "schedulefree-sgd": (1e-1, {}, None, None),
    # AdaGrad bases of AdAdaGrad at the benchmark's fixed batch (the adaptive batch is not a sweep arm): the
    # official scripts' AdaGrad lrs are 8e-3–5e-2; AdaGrad-Norm's single scalar steps by ~lr in norm at first
    "adadagrad": (1e-2, {}, None, None),
    "adadagrad-norm": (1e-1, {}, None, None),
}


def _ours(name: str) -> Arm:
    spec = SPECS[name]
    lr, kwargs, hessian, peer = BENCH[name]
    return Arm(name, spec.cls, lr, kwargs, accepts=_is_matrix if spec.hybrid else None, hessian=hessian, peer=peer)


def _rl(name: str, preset: str, dynamic_sampling: bool = False, **overrides: Any) -> Arm:
    """An RL arm: the objective preset on torch AdamW at the card's lr 3e-4 (no weight decay)."""
    return Arm(name, torch.optim.AdamW, 3e-4, {"weight_decay": 0.0},
               objective={"preset": preset, "overrides": overrides, "dynamic_sampling": dynamic_sampling})


#: the RL objective arms (``rl-arith``; card ``rl_objectives.md`` §5): one per preset.  DAPO and DLER add the
#: dynamic-sampling filter (no over-generation); CISPO's eps_max has no card default — 2.0 here (on-policy ratios
#: are 1, so it never binds on rl-arith); ACE (α = 1) and COPO are marked unverified / reconstructed in their presets
RL_ARMS = (_rl("grpo", "grpo"), _rl("dr_grpo", "dr_grpo"), _rl("dapo", "dapo", True), _rl("dler", "dler", True),
           _rl("rloo", "rloo"), _rl("reinforce_pp", "reinforce_pp"), _rl("bnpo", "bnpo"), _rl("gspo", "gspo"),
           _rl("cispo", "cispo", eps_max=2.0), _rl("gtpo", "gtpo"), _rl("ace", "ace"), _rl("copo", "copo"))

def _ft(name: str, method: str, lr: float, **spec: Any) -> Arm:
    """A fine-tuning arm: the adaptation method (bench/finetune.py) trained by torch AdamW (no weight decay)."""
    return Arm(name, torch.optim.AdamW, lr, {"weight_decay": 0.0}, adapter={"method": method, **spec})


#: the fine-tuning arms (``finetune-bytes``): LoRA-family adapters at rank 8, α = 2r (peft's LoRA), full fine-tuning
#: (ALLoRA: α = r, η = 1; MGPO: the official nlu profile ρ 0.05, β 0.9; HFT: half frozen per 75-step round, optimizer
#: state kept; HUT rank 8)
FINETUNE_ARMS = (_ft("full-ft", "full", 1e-3), _ft("lora", "lora", 3e-3), _ft("dora", "dora", 3e-3),
                 _ft("allora", "allora", 3e-3), _ft("mgpo", "mgpo", 3e-3), _ft("hut", "hut", 3e-3),
                 _ft("hft", "hft", 1e-3))

ARMS: dict[str, Arm] = {a.name: a for a in [
    _ours("adamw"),
    Arm("sgd", torch.optim.SGD, 3e-2, {"momentum": 0.9}),
    Arm("torch-muon", torch.optim.Muon, 3e-3, {"weight_decay": 0.0, "adjust_lr_fn": "match_rms_adamw"},
        accepts=lambda p: p.dim() == 2),
    *(_ours(name) for name in SPECS if name != "adamw"),
    # an Adafactor-like baseline for the memory comparison (factored second moment, no first moment)
    Arm("torch-adafactor", torch.optim.Adafactor, 1e-2),
    # Muon with fp32 Newton–Schulz: the bf16 default is ~50x slower on CPUs without native bf16 matmul
    Arm("muon-fp32", Muon, 3e-3, {"adjust_lr": "match_rms_adamw", "fallback_lr": FALLBACK_LR, "ns_dtype": "float32"},
        accepts=_is_matrix),
    # the SPECTRA wrapper over torch AdamW (c = 5: the paper's 160M recipe; matrices only)
    Arm("spectra-adamw", lambda g, lr, c: Spectra(torch.optim.AdamW(g, lr=lr, weight_decay=0.0), c=c), 3e-3,
        {"c": 5.0}),
    *RL_ARMS,
    *FINETUNE_ARMS,
]}

#: arms of the memory comparison (docs/low-rank.md): in the ``full`` suite and ``bench memory``, not in
#: ``default`` (on its synthetic tasks they would reduce to their base, and it must stay near 15 minutes)
MEMORY_ARMS = ("galore", "fira", "frugal", "gradnormlorp", "torch-adafactor", "muon-fp32")

#: the width sweep's comparison (docs/width-sweep.md): Muon++ against Muon's two common shape scales
WIDTH_SWEEP_ARMS: dict[str, Callable[[list], torch.optim.Optimizer]] = {
    "muonpp (lr 0.02, wd 0.1)": lambda ps: MuonPP(ps, lr=0.02, weight_decay=0.1, ns_dtype="float32"),
    "muon original (lr 0.02)": lambda ps: Muon(ps, lr=0.02, ns_dtype="float32"),
    "muon match_rms_adamw (lr 3e-3)": lambda ps: Muon(ps, lr=3e-3, adjust_lr="match_rms_adamw", ns_dtype="float32"),
}


def lr_grid(default_lr: float, points: int = 4, offsets: list[int] | None = None) -> list[float]:
    """Half-decade log grid: ``default × 10^(k/2)``; by default k = −2, −1, 0, 1 (4 points)."""
    ks = offsets if offsets is not None else list(range(-(points // 2), points - points // 2))
    return [round_lr(default_lr * 10 ** (k / 2)) for k in ks]


def round_lr(lr: float) -> float:
    return float(f"{lr:.4g}")


def extend(grid: list[float], lr: float, default_lr: float) -> list[float]:
    """The grid plus two more half-decade points beyond the edge that ``lr`` sits on."""
    ks = [round(2 * math.log10(x / default_lr)) for x in grid]
    ks = [ks[0] - 2, ks[0] - 1] + ks if lr == grid[0] else ks + [ks[-1] + 1, ks[-1] + 2]
    return lr_grid(default_lr, offsets=ks)


#: μP's hidden-matrix lr rule per arm (torchstep.scaling.mup's table) for a model whose hidden matrices share one
#: fan-in multiplier m and have m_in/m_out = 1 (the byte GPT): entry-wise normalised rules lr/m, SGD-type lr,
#: Muon with Moonlight's 0.2·√max(m, n) scale lr/√m (Keller's / spectral scales: lr).  Arms not listed have no
#: rule we can justify (low-rank projections, AdaGrad-Norm's global scalar, ClassP, NorMuon / Muon++ / LANTON's
#: extra normalisations) and are refused under μP rather than guessed.
MUP_RULES = {**dict.fromkeys(("adamw", "lion", "adamp", "diffgrad", "sophiag", "sophiah", "spam", "stablespam",
                              "schedulefree-adamw", "adadagrad", "torch-adafactor", "spectra-adamw",
                              "sinkgd", "swan"), "adam"),       # SinkGD / SWAN: entries of RMS ≈ 1, as Adam's
             **dict.fromkeys(("sgd", "sgdp", "schedulefree-sgd"), "sgd"),
             **dict.fromkeys(("muon", "muon-fp32", "torch-muon"), "muon")}


def mup_lr_factor(arm: str, m: float) -> float:
    """The factor on the arm's lr for the hidden matrices at width multiplier ``m`` (1 when ``m`` = 1)."""
    if m == 1:
        return 1.0
    rule = MUP_RULES.get(arm)
    if rule is None:
        raise ValueError(f"no μP rule for arm {arm!r}; valid: {', '.join(MUP_RULES)}")
    kwargs = ARMS[arm].kwargs
    return hidden_lr_factor(rule, m, 1.0, kwargs.get("adjust_lr", kwargs.get("adjust_lr_fn", "original")))


def applicable(arm: Arm, task) -> bool:
    """Objective arms run on RL tasks, adapter arms on fine-tuning tasks, optimizer arms on the rest; matrix-only
    rules need 2-D weights."""
    return arm.kind == task.kind and (task.matrices or not arm.matrix_only)


#: the harness' schedules (``--schedule``): name → (description recorded in each trial, multiplier(step, total,
#: warm-up steps)).  The cosine description is the protocol-v1 string, so earlier results keep their hashes.
SCHEDULES: dict[str, tuple[str, Callable[[int, int, int], float]]] = {
    "cosine": ("warmup 5% + cosine to 0", warmup_cosine),
    "wsd": ("warmup 5% + WSD, 1-sqrt decay over the last 20 %",
            lambda t, total, w: schedules.wsd(t + 1, total, w, 0.2, "1-sqrt", warmup_start=0.0)),
    "linear": ("warmup 5% + linear decay to 0", lambda t, total, w: schedules.linear_decay(t + 1, total, w)),
    "power": ("warmup 5% + the Power scheduler's n^-0.51, 1 at the end of warm-up",
              lambda t, total, w: (t + 1) / w if t + 1 < w else ((t + 1) / w) ** -0.51),
    "none": ("constant lr (no warm-up; Schedule-Free arms: their own 5% warm-up)", lambda t, total, w: 1.0),
    # two passes in one trial (runner.py): a linear-decay run records gradient norms, the refined schedule
    # (Defazio et al., arXiv 2310.07831) computed from them drives the second, which is the trial's result
    "refined": ("two-pass: linear decay recording gradient norms (l1; l2 for SGD), then their refined "
                "schedule", lambda t, total, w: schedules.linear_decay(t + 1, total, w)),
}
#: arms whose refined schedule is computed from ℓ2 gradient norms (the paper's SGD case); ℓ1 for the rest
SGD_TYPE = ("sgd", "sgdp")

#: arms whose optimizer replaces the schedule: they always run with ``none`` and get the harness' warm-up as
#: their own ``warmup_steps``
OWN_SCHEDULE = ("schedulefree-adamw", "schedulefree-sgd")


def schedule_for(arm: str, schedule: str) -> str:
    """The schedule an arm runs under ``--schedule schedule`` (Schedule-Free arms: always ``none``)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    return "none" if arm in OWN_SCHEDULE else schedule


class ArmOptimizer:
    """The arm's optimizer on the rule group plus the shared AdamW fallback: one ``step``."""

    def __init__(self, arm: Arm, problem: Problem, lr: float, total_steps: int, warmup_fraction: float = 0.05,
                 schedule: str = "cosine", curve: Callable[[int, int, int], float] | None = None):
        self.arm, self.problem = arm, problem
        params = param_groups(problem.model) if problem.routed else [{"params": list(problem.model.parameters())}]
        rule = [p for g in params if not problem.routed or g["name"] == MATRIX for p in g["params"]]
        rest = [p for g in params if problem.routed and g["name"] != MATRIX for p in g["params"]]
        if arm.accepts is not None:      # tensors the rule cannot take join the shared fallback
            rest += [p for p in rule if not arm.accepts(p)]
            rule = [p for p in rule if arm.accepts(p)]
        # μP (Problem.mup_width_mult = m): the hidden matrices' lr per the arm's rule (mup_lr_factor); the
        # fallback's vector-like tensors keep theirs
        self.rule = arm.make([{"params": rule}], lr * mup_lr_factor(arm.name, problem.mup_width_mult))
        if problem.with_optimizer is not None:      # a fine-tuning method acting on the optimizer (bench/finetune.py)
            self.rule = problem.with_optimizer(self.rule)
        if arm.hessian == "gnb":
            for g in self.rule.param_groups:
                g["bs"] = problem.tokens
        self.optimizers = [self.rule]
        if rest:
            self.optimizers.append(AdamW([{"params": rest}], lr=lr if problem.tied_fallback else FALLBACK_LR,
                                         weight_decay=0.0))
        warmup = max(1, int(warmup_fraction * total_steps))
        if arm.name in OWN_SCHEDULE:
            for g in self.rule.param_groups:
                g["warmup_steps"] = warmup
        curve = curve or SCHEDULES[schedule_for(arm.name, schedule)][1]   # ``curve``: an explicit multiplier
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: curve(step, total_steps, warmup))
                           for o in self.optimizers]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def after_step(self, step: int) -> None:
        for s in self.schedulers:
            s.step()
        if self.arm.hessian and step % HESSIAN_PERIOD == HESSIAN_PERIOD - 1:
            self.zero_grad()
            if self.arm.hessian == "gnb":
                if self.problem.logits is None:      # GNB needs a likelihood over classes
                    return
                gnb_sampled_loss(self.problem.logits(step)).backward()
                self.rule.update_hessian()
            else:   # Hutchinson needs double backward: CPU flash attention has none, the math kernel does
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
                    self.rule.update_hessian(lambda: self.problem.train_loss(step))
            self.zero_grad()

    def state_bytes(self) -> int:
        """Exact optimizer-state bytes of the arm and the shared fallback (:func:`torchstep.state_bytes`)."""
        return sum(state_bytes(o) for o in self.optimizers)
