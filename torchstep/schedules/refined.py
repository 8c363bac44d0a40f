"""Refined schedules from observed gradient norms (Defazio, Cutkosky, Mehta, Mishchenko, arXiv 2310.07831).

Run once with any schedule while :class:`GradNormRecorder` records the gradient norm of every step; then
``refined_schedule(norms, steps)`` gives the next run's per-step multipliers (pass them to
:class:`torchstep.schedules.Refined`).  The closed form of the official ``find_closed_form_schedule``:
``η_t ∝ w_t · Σ_{p>t} w_p`` with ``w = G⁻²`` (ℓ2 norms, SGD-type) or ``G⁻¹`` (ℓ1 norms, Adam-type), ``η_{T−1} = 0``,
normalised to a peak of 1 — after resampling the norms to the new run's length and a median filter over
``smoothing`` of the run (the paper's 10 %; edges reflect-padded: our choice where the card leaves it open).
"""
from __future__ import annotations

import numpy as np
import torch


def _median_filter(x: np.ndarray, window: int) -> np.ndarray:
    if window <= 1:
        return x
    half = window // 2
    padded = np.pad(x, (half, half), mode="reflect" if len(x) > half else "edge")
    return np.median(np.lib.stride_tricks.sliding_window_view(padded, window), axis=1)


def refined_schedule(norms, steps: int | None = None, norm: str = "l2", smoothing: float = 0.1) -> list[float]:
    """Per-step multipliers (peak 1, last 0) for a run of ``steps`` (default: as many as ``norms``).

    Args:
        norms: the previous run's per-step gradient norms (positive).
        steps: length of the new run.
        norm: ``l2`` (SGD-type: weights G⁻²) or ``l1`` (Adam-type: weights G⁻¹), as recorded.
        smoothing: median-filter window as a fraction of the run (default 0.1; 0 = none).
    """
    g = np.asarray(norms, dtype=np.float64)
    if g.ndim != 1 or len(g) < 2 or not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError("Invalid norms: (valid range: at least 2 finite positive values)")
    if norm not in ("l1", "l2"):
        raise ValueError(f"Invalid norm: {norm!r} (valid range: one of ('l1', 'l2'))")
    if not 0 <= smoothing < 1:
        raise ValueError(f"Invalid smoothing: {smoothing!r} (valid range: [0, 1))")
    steps = len(g) if steps is None else steps
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"Invalid steps: {steps!r} (valid range: an int >= 2)")
    if steps != len(g):
        g = np.interp(np.linspace(0, len(g) - 1, steps), np.arange(len(g)), g)
    g = _median_filter(g, 2 * int(smoothing * steps / 2) + 1)
    w = g ** (-2.0 if norm == "l2" else -1.0)
    tail = np.concatenate([np.cumsum(w[::-1])[::-1][1:], [0.0]])      # Σ_{p>t} w_p
    sched = w * tail
    return (sched / sched.max()).tolist()


class GradNormRecorder:
    """Records the total gradient norm after each backward, without a host sync per step (norms stay on the
    device until :meth:`norms` is read).

    Args:
        params: the parameters (or a model) whose ``.grad`` is measured.
        norm: ``l2`` or ``l1`` (use ``l1`` for Adam-type optimizers, as the paper).
    """

    def __init__(self, params, norm: str = "l2") -> None:
        if norm not in ("l1", "l2"):
            raise ValueError(f"Invalid norm: {norm!r} (valid range: one of ('l1', 'l2'))")
        self.params = list(params.parameters() if isinstance(params, torch.nn.Module) else params)
        self.ord = 2.0 if norm == "l2" else 1.0
        self._norms: list[torch.Tensor] = []

    @torch.no_grad()
    def record(self) -> None:
        grads = [p.grad for p in self.params if p.grad is not None]
        if grads:
            self._norms.append(torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(g.float(), self.ord) for g in grads]), self.ord))

    def norms(self) -> list[float]:
        return torch.stack(self._norms).tolist() if self._norms else []


__all__ = ["refined_schedule", "GradNormRecorder"]
