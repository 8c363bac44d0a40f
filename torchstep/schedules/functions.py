"""Learning-rate multipliers as closed-form functions of the step (``s(t)``, applied to each group's base lr).

Every function is pure: ``s = wsd(step, total_steps, ...)``; the schedulers in :mod:`.schedulers` call them.
Worked numbers of ``../shared/reference/schedules_scaling.md`` are pinned by ``tests/test_schedules.py``.
"""
from __future__ import annotations

import math

from ..ops.curves import DECAY_SHAPES, cosine as _cosine_curve, decay


def _check_int(name: str, value, lo: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise ValueError(f"Invalid {name}: {value!r} (valid range: an int >= {lo})")


def _check_fraction(name: str, value, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value if lo_open else 0 <= value) \
        and value <= 1
    if not ok:
        raise ValueError(f"Invalid {name}: {value!r} (valid range: {'(' if lo_open else '['}0, 1])")


def _warmup(step: int, warmup_steps: int, start: float) -> float:
    """Linear from ``start`` (step 0) to 1 (step ``warmup_steps``)."""
    x = step / warmup_steps
    return x + (1 - x) * start


def wsd(step: int, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2, decay_shape: str = "1-sqrt",
        final: float = 0.0, warmup_start: float = 0.01) -> float:
    """Warm-up, stable, decay (Hägele et al., arXiv 2405.18392, ``wsd_schedule``).

    ``t < W``: linear from ``warmup_start`` (the reference's 1/k_init = 0.01; 0 gives the transformers form) to 1;
    then 1 until ``H = T − ⌊f_d·T⌋``; then ``decay(shape, (t − H)/⌊f_d·T⌋, final)``; ``final`` for ``t ≥ T``.
    Shapes: ``linear``, ``cosine``, ``1-sqrt`` (default, the paper's best), ``square``, ``exp``, ``mirror-cos``."""
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps)
    _check_fraction("decay_fraction", decay_fraction)
    _check_fraction("final", final)
    _check_fraction("warmup_start", warmup_start)
    if decay_shape not in DECAY_SHAPES:
        raise ValueError(f"Invalid decay_shape: {decay_shape!r} (valid range: one of {DECAY_SHAPES})")
    if decay_shape == "exp" and final <= 0:
        raise ValueError(f"Invalid final: {final!r} (valid range: (0, 1] for the exp decay)")
    decay_steps = math.floor(decay_fraction * total_steps)
    hold_end = total_steps - decay_steps
    if warmup_steps > hold_end:
        raise ValueError(f"Invalid warmup_steps: {warmup_steps} (valid range: <= total_steps − decay steps = {hold_end})")
    if step < warmup_steps:
        return _warmup(step, warmup_steps, warmup_start)
    if step >= total_steps:
        return final
    if step < hold_end:
        return 1.0
    return decay(decay_shape, (step - hold_end) / decay_steps, final)


def linear_decay(step: int, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warm-up ``t/W``, then ``1 − (t − W)/(T − W)`` down to ``final``
    (Defazio et al., arXiv 2310.07831: the last-iterate optimal shape)."""
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps)
    _check_fraction("final", final)
    if step < warmup_steps:
        return step / warmup_steps
    return decay("linear", (step - warmup_steps) / max(1, total_steps - warmup_steps), final)


def cosine(step: int, total_steps: int, warmup_steps: int = 0, final: float = 0.0) -> float:
    """Linear warm-up ``t/W``, then ``final + (1 − final)·½(1 + cos(π(t − W)/(T − W)))``; ``final`` after T."""
    _check_int("total_steps", total_steps, 1)
    _check_int("warmup_steps", warmup_steps)
    _check_fraction("final", final)
    if step < warmup_steps:
        return step / warmup_steps
    x = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final + (1 - final) * _cosine_curve(x)


def constant(step: int, warmup_steps: int = 0) -> float:
    """1 after an optional linear warm-up ``t/W``."""
    _check_int("warmup_steps", warmup_steps)
    return step / warmup_steps if step < warmup_steps else 1.0


def power(step: int, *, lr_max: float = 0.02, a: float = 4.0, b: float = -0.51, warmup_steps: int = 2500,
          tokens_per_step: float = 4_194_304, batch_size: int | None = 1024, decay_steps: int = 0,
          total_steps: int | None = None, decay_shape: str = "exp", final: float = 1e-3,
          compat: str = "paper") -> float:
    """The Power scheduler (Shen et al., arXiv 2408.13359) as a multiplier of ``lr_max``.

    ``η_pow(n) = min(η_max, a·β_B·n^b)`` with ``n = step·tokens_per_step`` tokens seen and β_B the batch size in
    sequences; linear warm-up to ``η_pow(n_W)``; with ``decay_steps > 0`` (paper form) the last ``decay_steps``
    of ``total_steps`` follow ``decay(decay_shape, x, final)·η_pow(N − N_d)``.  ``compat="official"``
    (IBM dolomite-engine ``PowerScheduler``): ``a`` already includes the batch size (``batch_size`` must be
    None) and there is no decay phase.  The decay's shape and fraction are not confirmed from the paper
    (our defaults: exponential to ``final`` = 1e-3); the IBM recipe runs the decay as a separate phase."""
    if compat not in ("paper", "official"):
        raise ValueError(f"Invalid compat: {compat!r} (valid range: one of ('paper', 'official'))")
    if not b < 0:
        raise ValueError(f"Invalid b: {b!r} (valid range: (-inf, 0))")
    for name, value in (("lr_max", lr_max), ("a", a), ("tokens_per_step", tokens_per_step)):
        if not value > 0:
            raise ValueError(f"Invalid {name}: {value!r} (valid range: (0, inf))")
    _check_int("warmup_steps", warmup_steps)
    _check_int("decay_steps", decay_steps)
    if compat == "official":
        if batch_size is not None or decay_steps:
            raise ValueError("Invalid batch_size/decay_steps for compat='official' (valid range: batch_size=None, "
                             "decay_steps=0: the official a includes the batch and there is no decay phase)")
        amplitude = a
    else:
        _check_int("batch_size", batch_size, 1)
        amplitude = a * batch_size

    def eta_pow(s: float) -> float:
        return min(1.0, (amplitude / lr_max) * (s * tokens_per_step) ** b) if s > 0 else 1.0

    if step <= warmup_steps and warmup_steps > 0:
        return eta_pow(warmup_steps) * step / warmup_steps
    if decay_steps:
        if total_steps is None or total_steps < decay_steps + warmup_steps:
            raise ValueError(f"Invalid total_steps: {total_steps!r} (valid range: >= warmup_steps + decay_steps)")
        start = total_steps - decay_steps
        if step > start:
            return decay(decay_shape, (step - start) / decay_steps, final) * eta_pow(start)
    return eta_pow(step)


__all__ = ["wsd", "linear_decay", "cosine", "constant", "power", "DECAY_SHAPES"]
