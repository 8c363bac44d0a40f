"""Scalar curves of a progress fraction, written once (schedules, SPAM warm-ups, Stable-SPAM's anneal)."""
from __future__ import annotations

import math


def cosine(progress: float) -> float:
    """½(1 + cos(π·progress)): 1 at progress 0, 0 at progress 1."""
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Linear warm-up over ``warmup_steps`` (``(step+1)/warmup``), then cosine from 1 to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return cosine(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))


DECAY_SHAPES = ("linear", "cosine", "1-sqrt", "square", "exp", "mirror-cos")


def decay(shape: str, progress: float, final: float = 0.0) -> float:
    """A decay from 1 (progress 0) to ``final`` (progress 1): ``linear`` f+(1−f)(1−x), ``cosine``
    f+(1−f)(1+cos πx)/2, ``1-sqrt`` f+(1−f)(1−√x), ``square`` f+(1−f)(1−x²), ``exp`` f^x (needs f > 0),
    ``mirror-cos`` 2·linear − cosine (Hägele et al., arXiv 2405.18392)."""
    x = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return final + (1 - final) * (1 - x)
    if shape == "cosine":
        return final + (1 - final) * cosine(x)
    if shape == "1-sqrt":
        return final + (1 - final) * (1 - math.sqrt(x))
    if shape == "square":
        return final + (1 - final) * (1 - x * x)
    if shape == "exp":
        if final <= 0:
            raise ValueError(f"Invalid final: {final!r} (valid range: (0, 1] for the exp decay)")
        return final ** x
    if shape == "mirror-cos":
        return 2 * decay("linear", x, final) - decay("cosine", x, final)
    raise ValueError(f"Invalid decay: {shape!r} (valid range: one of {DECAY_SHAPES})")
