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
