"""Parameter groups for Hugging Face ``peft`` models (LoRA, DoRA, LoRA+) — with or without peft installed.

``groups, report = torchstep.integrations.peft.param_groups(model, lr=1e-4, loraplus_ratio=16)``
then ``torchstep.create("adamw", groups)`` (or ``torch.optim.AdamW(groups)``); ``print(report)`` shows which
tensor got which role, lr, weight decay and group.

Roles come from the module structure, never from name substrings alone: a *tuner layer* is a peft
``BaseTunerLayer`` (checked only when ``peft`` is already imported — a model holding peft layers has imported it)
or any module with ``lora_A`` and ``lora_B`` ``nn.ModuleDict`` attributes (duck typing, so fake modules work);
a *modules_to_save wrapper* is a module with a ``modules_to_save`` ``nn.ModuleDict`` and an ``original_module``.
Inside a tuner layer: ``lora_A.<adapter>.weight`` → ``lora_A``, ``lora_B.<adapter>.weight`` → ``lora_B``,
``lora_embedding_A/B.<adapter>`` → ``lora_embedding_A/B``, ``lora_magnitude_vector.<adapter>.weight`` →
``magnitude``, any other trainable 1-D tensor (``lora_B`` bias of ``lora_bias=True``, a ``base_layer`` bias of
``bias="all"``) → ``bias``.  Trainable tensors of ``modules_to_save.<adapter>`` → ``modules_to_save``; every
other trainable tensor → ``other``.  Frozen tensors never enter a group; tied tensors appear once.

Two modes (``compat``):

* ``"peft"`` reproduces ``peft.optimizers.create_loraplus_optimizer`` (peft 0.21.2) exactly: always four
  groups ``A, embedding, B, B_no_decay`` in that order (some possibly empty) with lrs ``lr, embedding_lr
  (default 1e-6), lr·ratio, lr·ratio``.  Membership: a tensor whose name minus its last two components is a LoRA
  ``Embedding`` layer → ``embedding``; else a name containing ``lora_B`` **or any 1-D tensor** (DoRA magnitude,
  biases) → ``B`` if in transformers' decay set (names outside ``nn.LayerNorm`` modules, minus names containing
  ``"bias"``), otherwise ``B_no_decay``; everything else → ``A``.  ``weight_decay`` plays peft's
  ``loraplus_weight_decay``: it is set on ``A``, ``embedding`` and ``B``; ``B_no_decay`` gets 0.  (peft ignores a
  plain ``weight_decay=`` optimizer kwarg: every group sets its own.)  Swapping the optimizer class is the
  only change.
* ``"torchstep"`` (default): one group per role family, only non-empty groups —
  ``lora_A`` (lr), ``lora_B`` (lr·ratio, ratio default 1), ``lora_embedding`` (``embedding_lr`` or lr),
  ``magnitude`` (DoRA magnitudes and tuner-layer biases: ``magnitude_lr`` or lr, wd 0),
  ``modules_to_save`` / ``modules_to_save_no_decay`` and ``other`` / ``no_decay`` (lr; norms — LayerNorm,
  RMSNorm, … — and 1-D tensors get wd 0, by :mod:`torchstep.partition`'s router).  The report warns when a
  non-zero ``weight_decay`` would have been ignored by peft.

Hybrid matrix optimizers (``rule=``): LoRA factors are rank-r matrices (r ≪ d), for which orthogonalising
rules such as Muon are rarely sensible, so every LoRA role goes to the AdamW fallback by default.
``rule="muon"`` (the hybrid's matrix-rule name) adds ``algo`` / ``use_fallback`` keys to every group: full-rank
hidden matrices of ``modules_to_save`` / ``other`` (partitioner label ``matrix``) → ``"muon"``, everything else →
``"adamw"``.  A mapping routes roles explicitly, e.g. ``rule={"matrix": "muon", "lora_B": "muon"}`` (keys:
the roles, ``"matrix"``, and ``"fallback"`` for the fallback's name, default ``"adamw"``).  Without ``rule``
no routing keys are written (plain optimizers reject unknown group keys) — a hybrid optimizer then splits
each group per tensor and would send 2-D LoRA factors to its matrix rule.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from ..partition import DEFAULT_HEAD_PATTERN, MATRIX, NO_DECAY, module_param_kind

__all__ = ["param_groups", "RoutingReport", "ROLES", "LORA_ROLES", "PEFT_GROUPS", "PEFT_DEFAULT_EMBEDDING_LR",
           "peft_decay_parameter_names"]

LORA_A, LORA_B, EMB_A, EMB_B = "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"
MAGNITUDE, BIAS, MODULES_TO_SAVE, OTHER = "magnitude", "bias", "modules_to_save", "other"
ROLES = (LORA_A, LORA_B, EMB_A, EMB_B, MAGNITUDE, BIAS, MODULES_TO_SAVE, OTHER)
LORA_ROLES = (LORA_A, LORA_B, EMB_A, EMB_B, MAGNITUDE, BIAS)
PEFT_GROUPS = ("A", "embedding", "B", "B_no_decay")   # create_loraplus_optimizer's order
PEFT_DEFAULT_EMBEDDING_LR = 1e-6                      # create_loraplus_optimizer's loraplus_lr_embedding default
FALLBACK = "adamw"
_COMPATS = ("torchstep", "peft")
# torchstep mode: group name → the roles it holds, in output order.
_TORCHSTEP_GROUPS = ("lora_A", "lora_B", "lora_embedding", "magnitude", "modules_to_save",
                     "modules_to_save_no_decay", "other", "no_decay")


# ---------------------------------------------------------------------------------------------- structure
def _peft_classes() -> tuple[type | None, type | None]:
    """(BaseTunerLayer, lora Embedding) if peft is already imported, else (None, None) — never imports peft."""
    if "peft" not in sys.modules or sys.modules["peft"] is None:
        return None, None
    try:
        from peft.tuners.lora.layer import Embedding
        from peft.tuners.tuners_utils import BaseTunerLayer
    except Exception:   # pragma: no cover - a broken or very different peft: fall back to duck typing
        return None, None
    return BaseTunerLayer, Embedding


def _is_tuner_layer(module: nn.Module, base_cls: type | None) -> bool:
    if base_cls is not None and isinstance(module, base_cls):
        return True
    return (isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict))


def _is_lora_embedding(module: Any, base_cls: type | None, emb_cls: type | None) -> bool:
    """peft's test ``isinstance(module, lora.layer.Embedding)``; duck-typed for non-peft modules."""
    if module is None:
        return False
    if emb_cls is not None and isinstance(module, emb_cls):
        return True
    if base_cls is not None and isinstance(module, base_cls):
        return False   # a real peft tuner layer that is not a LoRA Embedding
    if not _is_tuner_layer(module, None):
        return False
    emb_a = getattr(module, "lora_embedding_A", None)
    return (isinstance(getattr(module, "base_layer", None), nn.Embedding)
            or (isinstance(emb_a, nn.ParameterDict) and len(emb_a) > 0))


def _is_mts_wrapper(module: nn.Module) -> bool:
    return isinstance(getattr(module, "modules_to_save", None), nn.ModuleDict) and hasattr(module, "original_module")


def _active(module: nn.Module) -> list[str] | None:
    act = getattr(module, "active_adapters", None)
    if act is None:
        act = getattr(module, "active_adapter", None)
    if act is None:
        return None
    return [act] if isinstance(act, str) else list(act)


def peft_decay_parameter_names(model: nn.Module) -> set[str]:
    """transformers' ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus names containing ``"bias"``
    (the decay set of ``create_loraplus_optimizer``), without importing transformers.  transformers 5.24 has
    ``ALL_LAYERNORM_LAYERS = [nn.LayerNorm]``: RMSNorm weights count as *decay* there."""
    def names(module: nn.Module) -> list[str]:
        out = []
        for child_name, child in module.named_children():
            if isinstance(child, nn.LayerNorm):
                continue
            out += [f"{child_name}.{n}" for n in names(child)]
        return out + list(module._parameters)
    return {n for n in names(model) if "bias" not in n}


@dataclass
class _Tensor:
    name: str
    param: nn.Parameter
    role: str
    module_name: str     # owning module
    kind: str            # partitioner label (matrix/embedding/head/no_decay) of the tensor in its owning module
    adapter: str | None
    active: bool
    lora_embedding_layer: bool   # peft's "name minus last two components is a LoRA Embedding"


def _structure(model: nn.Module) -> tuple[list[_Tensor], bool]:
    """Trainable tensors with their roles; and whether any adapter structure was found."""
    base_cls, emb_cls = _peft_classes()
    modules = dict(model.named_modules())
    tuners = {n for n, m in modules.items() if _is_tuner_layer(m, base_cls)}
    wrappers = {n for n, m in modules.items() if _is_mts_wrapper(m)}
    head = re.compile(DEFAULT_HEAD_PATTERN)
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.split(".")
        owner = ".".join(parts[:-1])
        kind = module_param_kind(owner, modules.get(owner, model), p, head)
        role, adapter, holder = OTHER, None, None
        for i in range(len(parts) - 1, -1, -1):   # innermost structure wins
            prefix = ".".join(parts[:i])
            sub = parts[i] if i < len(parts) else ""
            if prefix in wrappers and sub == "modules_to_save" and i + 1 < len(parts):
                role, adapter, holder = MODULES_TO_SAVE, parts[i + 1], modules[prefix]
                break
            if prefix in tuners:
                holder = modules[prefix]
                adapter = parts[i + 1] if i + 1 < len(parts) else None
                if sub == "lora_A" and p.ndim >= 2:
                    role = LORA_A
                elif sub == "lora_B" and p.ndim >= 2:
                    role = LORA_B
                elif sub in (EMB_A, EMB_B):
                    role = sub
                elif sub == "lora_magnitude_vector":
                    role = MAGNITUDE
                elif p.ndim <= 1:
                    role, adapter = BIAS, (adapter if sub in ("lora_A", "lora_B") else None)
                else:
                    role, adapter = OTHER, None
                break
        if role in (OTHER, BIAS) and adapter is None:
            active = True
        else:
            act = _active(holder) if holder is not None else None
            active = act is None or adapter in act
        mname = ".".join(parts[:-2])
        emb_layer = bool(mname) and _is_lora_embedding(modules.get(mname), base_cls, emb_cls)
        out.append(_Tensor(name, p, role, owner, kind, adapter, active, emb_layer))
    return out, bool(tuners or wrappers)


# ---------------------------------------------------------------------------------------------- report
@dataclass
class RoutingReport:
    """Tensor name → role / lr / weight decay / group (/ algo), plus warnings.  ``str(report)`` is a table."""

    compat: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    frozen: int = 0

    def __getitem__(self, name: str) -> dict[str, Any]:
        for row in self.rows:
            if row["name"] == name:
                return row
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(row["name"] == name for row in self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        return {row["name"]: {k: v for k, v in row.items() if k != "name"} for row in self.rows}

    def lr_wd(self) -> dict[str, tuple[float, float]]:
        """name → (lr, weight_decay)."""
        return {row["name"]: (row["lr"], row["weight_decay"]) for row in self.rows}

    def __str__(self) -> str:
        cols = ["name", "shape", "role", "group", "lr", "weight_decay"]
        if any("algo" in row for row in self.rows):
            cols.append("algo")
        table = [[str(row.get(c, "")) if c != "lr" else f"{row['lr']:.4g}" for c in cols] for row in self.rows]
        widths = [max([len(c)] + [len(r[i]) for r in table]) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()   # noqa: E731
        lines = [f"peft param groups (compat={self.compat!r}; {len(self.rows)} trainable tensors, "
                 f"{self.frozen} frozen left out)", line(cols), line(["-" * w for w in widths])]
        lines += [line(r) for r in table]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- groups
def _check_number(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite number >= 0)")


def _router(rule: str | Mapping[str, str] | None) -> Mapping[str, str] | None:
    if rule is None:
        return None
    if isinstance(rule, str):
        return {"matrix": rule}
    if not isinstance(rule, Mapping):
        raise ValueError(f"Invalid rule: {rule!r} (a matrix-rule name such as 'muon', or a role → algo mapping)")
    unknown = set(rule) - set(ROLES) - {"matrix", "fallback"}
    if unknown:
        raise ValueError(f"Invalid rule keys {sorted(unknown)}; valid: {sorted(ROLES) + ['fallback', 'matrix']}")
    return dict(rule)


def _algo(t: _Tensor, router: Mapping[str, str]) -> str:
    fallback = router.get("fallback", FALLBACK)
    if t.role in router:
        return router[t.role]
    if t.role in (MODULES_TO_SAVE, OTHER) and t.kind == MATRIX:
        return router.get("matrix", fallback)
    return fallback


def _peft_group(t: _Tensor, decay: set[str]) -> str:
    if t.lora_embedding_layer:
        return "embedding"
    if "lora_B" in t.name or t.param.ndim == 1:
        return "B" if t.name in decay else "B_no_decay"
    return "A"


def _torchstep_group(t: _Tensor) -> str:
    if t.role == LORA_A:
        return "lora_A"
    if t.role == LORA_B:
        return "lora_B"
    if t.role in (EMB_A, EMB_B):
        return "lora_embedding"
    if t.role in (MAGNITUDE, BIAS):
        return "magnitude"
    no_decay = t.kind == NO_DECAY
    if t.role == MODULES_TO_SAVE:
        return "modules_to_save_no_decay" if no_decay else "modules_to_save"
    return "no_decay" if no_decay else "other"


def param_groups(model: nn.Module, *, lr: float, loraplus_ratio: float | None = None,
                 embedding_lr: float | None = None, magnitude_lr: float | None = None,
                 weight_decay: float = 0.0, rule: str | Mapping[str, str] | None = None,
                 compat: str = "torchstep") -> tuple[list[dict[str, Any]], RoutingReport]:
    """Dict parameter groups (explicit ``lr`` and ``weight_decay``, ``name``, ``param_names``) and a
    :class:`RoutingReport` for a peft(-shaped) model; see the module docstring for the two ``compat`` modes.

    Args:
        model: a ``PeftModel`` or any module with LoRA-shaped sub-modules.
        lr: the base learning rate (LoRA A factors).
        loraplus_ratio: ηB/ηA of LoRA+ (required for ``compat="peft"``; default 1 otherwise).
        embedding_lr: lr of LoRA embedding factors (peft default 1e-6; torchstep default ``lr``).
        magnitude_lr: lr of DoRA magnitudes and tuner-layer biases (torchstep mode only; default ``lr``).
        weight_decay: torchstep: decay of decaying groups; peft: ``loraplus_weight_decay``.
        rule: routing for hybrid matrix optimizers (adds ``algo``/``use_fallback``); ``None`` adds nothing.
        compat: ``"torchstep"`` or ``"peft"``.

    Raises:
        ValueError: unknown ``compat``, invalid numbers (negative or non-finite ``lr`` / ratio / lrs / decay),
            ``compat="peft"`` without ``loraplus_ratio`` or with ``magnitude_lr``, a model without adapter
            structure or without trainable tensors.
    """
    if compat not in _COMPATS:
        raise ValueError(f"Unknown compat {compat!r}; valid: {list(_COMPATS)}")
    for n, v in (("lr", lr), ("loraplus_ratio", loraplus_ratio), ("embedding_lr", embedding_lr),
                 ("magnitude_lr", magnitude_lr), ("weight_decay", weight_decay)):
        _check_number(n, v)
    if compat == "peft":
        if loraplus_ratio is None:
            raise ValueError("compat='peft' needs loraplus_ratio (create_loraplus_optimizer's loraplus_lr_ratio)")
        if magnitude_lr is not None:
            raise ValueError("compat='peft' has no magnitude_lr: peft puts DoRA magnitudes (1-D) at lr·ratio; "
                             "use compat='torchstep'")
    router = _router(rule)
    if not isinstance(model, nn.Module):
        raise ValueError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    tensors, has_adapters = _structure(model)
    if not has_adapters:
        raise ValueError("No peft adapters found in the model (no module with lora_A/lora_B ModuleDicts, "
                         "no peft BaseTunerLayer, no modules_to_save wrapper)")
    if not tensors:
        raise ValueError("The model has no trainable parameters (every tensor has requires_grad=False)")
    frozen = sum(1 for _ in model.parameters()) - sum(1 for p in model.parameters() if p.requires_grad)
    report = RoutingReport(compat=compat, frozen=frozen)
    ratio = 1.0 if loraplus_ratio is None else float(loraplus_ratio)

    if compat == "peft":
        decay = peft_decay_parameter_names(model)
        emb = PEFT_DEFAULT_EMBEDDING_LR if embedding_lr is None else embedding_lr
        settings = {"A": (lr, weight_decay), "embedding": (emb, weight_decay),
                    "B": (lr * ratio, weight_decay), "B_no_decay": (lr * ratio, 0.0)}
        members: dict[str, list[_Tensor]] = {g: [] for g in PEFT_GROUPS}
        for t in tensors:
            members[_peft_group(t, decay)].append(t)
        keyed = [(g, g, members[g]) for g in PEFT_GROUPS]
        if weight_decay:
            report.warnings.append(
                f"compat='peft': weight_decay={weight_decay} acts as peft's loraplus_weight_decay (groups A, "
                "embedding, B); peft ignores a plain weight_decay= optimizer kwarg")
    else:
        emb = lr if embedding_lr is None else embedding_lr
        mag = lr if magnitude_lr is None else magnitude_lr
        settings = {"lora_A": (lr, weight_decay), "lora_B": (lr * ratio, weight_decay),
                    "lora_embedding": (emb, weight_decay), "magnitude": (mag, 0.0),
                    "modules_to_save": (lr, weight_decay), "modules_to_save_no_decay": (lr, 0.0),
                    "other": (lr, weight_decay), "no_decay": (lr, 0.0)}
        by_key: dict[tuple[str, str | None], list[_Tensor]] = {}
        for t in tensors:
            g = _torchstep_group(t)
            by_key.setdefault((g, _algo(t, router) if router else None), []).append(t)
        keyed = []
        for g in _TORCHSTEP_GROUPS:
            keys = [k for k in by_key if k[0] == g]
            for j, k in enumerate(keys):
                keyed.append((g if j == 0 else f"{g}.{k[1]}", g, by_key[k]))
        if weight_decay:
            report.warnings.append(
                f"weight_decay={weight_decay} would be ignored by peft's create_loraplus_optimizer(weight_decay=...): "
                "every peft group sets its own weight_decay (loraplus_weight_decay, default 0.0) — pass "
                "loraplus_weight_decay there to match")

    groups = []
    for name, setting, ts in keyed:
        g_lr, g_wd = settings[setting]
        group: dict[str, Any] = {"name": name, "params": [t.param for t in ts], "param_names": [t.name for t in ts],
                                 "lr": g_lr, "weight_decay": g_wd}
        if router is not None:
            fallback = router.get("fallback", FALLBACK)
            algos = {_algo(t, router) for t in ts}
            algo = next(iter(algos)) if len(algos) == 1 else fallback
            if len(algos) > 1:   # mixed routes: only in compat='peft', whose four groups are fixed
                report.warnings.append(f"group {name!r} mixes routes {sorted(algos)}; all of it goes to {fallback!r}")
            group["algo"], group["use_fallback"] = algo, algo == fallback
        groups.append(group)
        for t in ts:
            row = {"name": t.name, "shape": tuple(t.param.shape), "role": t.role, "group": name,
                   "lr": g_lr, "weight_decay": g_wd}
            if router is not None:
                row["algo"] = group["algo"]
            report.rows.append(row)
    inactive = sorted({t.adapter for t in tensors if not t.active and t.adapter})
    if inactive:
        report.warnings.append(f"adapter(s) {inactive} are trainable but not active: their tensors are grouped "
                               "but get no gradient from the forward pass")
    order = {t.name: i for i, t in enumerate(tensors)}
    report.rows.sort(key=lambda r: order[r["name"]])
    return groups, report
