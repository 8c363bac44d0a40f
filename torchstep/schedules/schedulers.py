"""``torch.optim.lr_scheduler.LRScheduler`` subclasses over the closed-form multipliers of :mod:`.functions`.

Each scales **every group's own base lr** (``initial_lr``), so hybrid groups (a matrix rule at 0.02 and its AdamW
fallback at 3e-4) and layer-wise lrs keep their ratios; ``state_dict`` holds only numbers and strings (the
multiplier is recomputed from ``last_epoch``), so a resume is bit-exact; they compose with ``SequentialLR`` and
``ChainedScheduler`` like torch's own.  Arguments are validated at construction (``ValueError``).
"""
from __future__ import annotations

from typing import Any

from torch.optim.lr_scheduler import LRScheduler

from . import functions as F


class MultiplierLR(LRScheduler):
    """Base: ``lr_g = initial_lr_g · self.multiplier(last_epoch)`` for every group ``g``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        last_epoch: as torch's schedulers (-1: start).
    """

    def __init__(self, optimizer, last_epoch: int = -1) -> None:
        self.multiplier(0)                        # validates the arguments before torch's first step
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        s = self.multiplier(self.last_epoch)
        return [base * s for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


class WSD(MultiplierLR):
    """Warm-up, stable, decay: :func:`torchstep.schedules.wsd` per step.

    Args:
        optimizer: the optimizer.
        total_steps, warmup_steps, decay_fraction, decay_shape, final, warmup_start: as :func:`~.functions.wsd`
            (defaults 0, 0.2, ``1-sqrt``, 0, 0.01).
        last_epoch: as torch's schedulers.
    """

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, decay_fraction: float = 0.2,
                 decay_shape: str = "1-sqrt", final: float = 0.0, warmup_start: float = 0.01,
                 last_epoch: int = -1) -> None:
        self.kw: dict[str, Any] = dict(total_steps=total_steps, warmup_steps=warmup_steps,
                                       decay_fraction=decay_fraction, decay_shape=decay_shape, final=final,
                                       warmup_start=warmup_start)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step):
        return F.wsd(step, **self.kw)


class _WarmupDecayLR(MultiplierLR):
    """Warm-up then a decay to ``final`` given by the class's ``function`` (subclasses: the two below)."""

    function = staticmethod(F.linear_decay)

    def __init__(self, optimizer, total_steps: int, warmup_steps: int = 0, final: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.kw = dict(total_steps=total_steps, warmup_steps=warmup_steps, final=final)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step):
        return self.function(step, **self.kw)


class LinearDecay(_WarmupDecayLR):
    """Warm-up then linear decay to ``final``: :func:`torchstep.schedules.linear_decay`.

    Args:
        optimizer: the optimizer.
        total_steps, warmup_steps, final: as the function (defaults 0, 0).
        last_epoch: as torch's schedulers.
    """

    function = staticmethod(F.linear_decay)


class Cosine(_WarmupDecayLR):
    """Warm-up then cosine to ``final``: :func:`torchstep.schedules.cosine`.

    Args:
        optimizer: the optimizer.
        total_steps, warmup_steps, final: as the function (defaults 0, 0).
        last_epoch: as torch's schedulers.
    """

    function = staticmethod(F.cosine)


class Constant(MultiplierLR):
    """1 after an optional linear warm-up.

    Args:
        optimizer: the optimizer.
        warmup_steps: W (default 0).
        last_epoch: as torch's schedulers.
    """

    def __init__(self, optimizer, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        self.kw = dict(warmup_steps=warmup_steps)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step):
        return F.constant(step, **self.kw)


class Power(MultiplierLR):
    """The Power scheduler: :func:`torchstep.schedules.power`; set the groups' lr to ``lr_max``.

    Args:
        optimizer: the optimizer (its lrs are η_max: the multiplier is η(n)/η_max).
        lr_max, a, b, warmup_steps, tokens_per_step, batch_size, decay_steps, total_steps, decay_shape, final,
            compat: as the function (IBM defaults: 0.02, 4, −0.51, 2500, 4 194 304, 1024, 0, None, ``exp``,
            1e-3, ``paper``).
        last_epoch: as torch's schedulers.
    """

    def __init__(self, optimizer, lr_max: float = 0.02, a: float = 4.0, b: float = -0.51, warmup_steps: int = 2500,
                 tokens_per_step: float = 4_194_304, batch_size: int | None = 1024, decay_steps: int = 0,
                 total_steps: int | None = None, decay_shape: str = "exp", final: float = 1e-3,
                 compat: str = "paper", last_epoch: int = -1) -> None:
        self.kw = dict(lr_max=lr_max, a=a, b=b, warmup_steps=warmup_steps, tokens_per_step=tokens_per_step,
                       batch_size=batch_size, decay_steps=decay_steps, total_steps=total_steps,
                       decay_shape=decay_shape, final=final, compat=compat)
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step):
        return F.power(step, **self.kw)


class Refined(MultiplierLR):
    """A schedule given as per-step multipliers (e.g. :func:`torchstep.schedules.refined_schedule`'s output);
    steps past its end hold the last value.

    Args:
        optimizer: the optimizer.
        schedule: the multipliers, one per step (a list of floats; stored in ``state_dict``).
        last_epoch: as torch's schedulers.
    """

    def __init__(self, optimizer, schedule, last_epoch: int = -1) -> None:
        self.schedule = [float(x) for x in schedule]
        if not self.schedule or any(not (x >= 0) for x in self.schedule):
            raise ValueError("Invalid schedule: (valid range: a non-empty sequence of finite values >= 0)")
        super().__init__(optimizer, last_epoch)

    def multiplier(self, step):
        return self.schedule[min(step, len(self.schedule) - 1)]


__all__ = ["MultiplierLR", "WSD", "LinearDecay", "Cosine", "Constant", "Power", "Refined"]
