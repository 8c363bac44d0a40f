"""Split a model's parameters into named groups: hidden matrices vs everything else.

The default router (documented, overridable):

* ``matrix``  – parameters with ``ndim >= 2`` that are not embeddings or the output head;
* ``embedding`` – weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` modules;
* ``head`` – the output layer: names matching ``head_pattern`` (default ``lm_head|head|classifier|fc_out|output``
  as the last module name) — gets weight decay like a matrix but never a matrix-only rule;
* ``no_decay`` – biases, norm weights (``*Norm*`` modules), 0-D and 1-D tensors: weight decay 0.

Frozen parameters (``requires_grad=False``) are left out.  Every group records ``param_names``
and a ``name``, so a checkpoint and a routing report say which tensor got which rule.
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Iterator

from torch import nn

DEFAULT_HEAD_PATTERN = r"(^|\.)(lm_head|head|classifier|fc_out|output)(\.|$)"

# The one routing vocabulary: partitioner group names, hybrid optimizers and the benchmark all use these.
MATRIX, EMBEDDING, HEAD, NO_DECAY = "matrix", "embedding", "head", "no_decay"
LABELS = (MATRIX, EMBEDDING, HEAD, NO_DECAY)
FALLBACK_LABELS = (EMBEDDING, HEAD, NO_DECAY)   # never a matrix-only rule


def tensor_label(p) -> str:
    """The label of a tensor seen without its module: ``matrix`` if ``ndim >= 2``, else ``no_decay``."""
    return MATRIX if p.dim() >= 2 else NO_DECAY


def split_by_tensor_label(group: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(label, sub-group)`` pairs of a group seen without its modules (:func:`tensor_label` per tensor),
    ``param_names`` split alongside; labels in sorted order (``matrix`` before ``no_decay``), so group
    order is stable.  Hybrid optimizers use it for a plain parameter list."""
    params = group["params"]
    params = [params] if hasattr(params, "dim") else list(params)
    names = group.get("param_names")
    split: dict[str, list[int]] = {}
    for i, p in enumerate(params):
        split.setdefault(tensor_label(p), []).append(i)
    out = []
    for label in sorted(split):
        idx = split[label]
        sub = {**group, "params": [params[i] for i in idx]}
        if names is not None:
            sub["param_names"] = [names[i] for i in idx]
        out.append((label, sub))
    return out
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase,
               nn.RMSNorm)


def _trainable(model: nn.Module) -> Iterator[tuple[str, str, nn.Module, nn.Parameter]]:
    """(module name, parameter name, module, parameter); tied parameters once, under their first name."""
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                yield module_name, f"{module_name}.{pname}" if module_name else pname, module, p


def module_param_kind(module_name: str, module: nn.Module, p: nn.Parameter, head: re.Pattern) -> str:
    """The label (``matrix, embedding, head, no_decay``) of parameter ``p`` owned by ``module`` at ``module_name``;
    ``head`` matches output-head module names (:data:`DEFAULT_HEAD_PATTERN`)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return EMBEDDING
    if p.ndim < 2 or isinstance(module, _NORM_TYPES):
        return NO_DECAY
    return HEAD if head.search(module_name) else MATRIX


def classify(model: nn.Module, head_pattern: str = DEFAULT_HEAD_PATTERN) -> dict[str, str]:
    """Map each trainable parameter name to one of ``matrix, embedding, head, no_decay``."""
    head = re.compile(head_pattern)
    return {name: module_param_kind(mname, module, p, head) for mname, name, module, p in _trainable(model)}


def param_groups(model: nn.Module, weight_decay: float | None = None,
                 overrides: dict[str, dict[str, Any]] | None = None,
                 head_pattern: str = DEFAULT_HEAD_PATTERN, decay_keys: bool = True) -> list[dict[str, Any]]:
    """Groups for ``model``: one per kind present, with ``weight_decay=0`` for ``no_decay``.

    ``weight_decay`` (if given) is set on decaying groups; ``overrides`` maps a kind to extra
    group keys (e.g. ``{"embedding": {"lr": 3e-4}}``).  ``decay_keys=False`` writes no ``weight_decay``
    key at all (for methods without weight decay).  Tied parameters appear once.
    """
    head = re.compile(head_pattern)
    groups: dict[str, dict[str, Any]] = {}
    for module_name, name, module, p in _trainable(model):
        kind = module_param_kind(module_name, module, p, head)
        group = groups.setdefault(kind, {"name": kind, "params": [], "param_names": []})
        group["params"].append(p)
        group["param_names"].append(name)
    result = []
    for kind in LABELS:
        if kind not in groups or not groups[kind]["params"]:
            continue
        group = groups[kind]
        if decay_keys and kind == NO_DECAY:
            group["weight_decay"] = 0.0
        elif decay_keys and weight_decay is not None:
            group["weight_decay"] = weight_decay
        group.update((overrides or {}).get(kind, {}))
        result.append(group)
    return result


def routing_report(groups: Iterable[dict[str, Any]]) -> str:
    """One line per parameter: name, shape, group and its lr / weight decay."""
    lines = []
    for g in groups:
        for n, p in zip(g.get("param_names", [""] * len(g["params"])), g["params"]):
            lines.append(f"{n:40s} {str(tuple(p.shape)):18s} {g.get('name', '?'):10s} "
                         f"lr={g.get('lr', 'default')} wd={g.get('weight_decay', 'default')}")
    return "\n".join(lines)


def as_params(model_or_params: Any, **kwargs: Any) -> Any:
    """A model becomes named groups (see :func:`param_groups`); anything else passes through."""
    if isinstance(model_or_params, nn.Module):
        return param_groups(model_or_params, **kwargs)
    if kwargs:
        raise ValueError(f"partition options {sorted(kwargs)} need a model, not a parameter list")
    return model_or_params


__all__ = ["classify", "param_groups", "routing_report", "as_params", "tensor_label", "split_by_tensor_label", "DEFAULT_HEAD_PATTERN",
           "MATRIX", "EMBEDDING", "HEAD", "NO_DECAY", "LABELS", "FALLBACK_LABELS"]

