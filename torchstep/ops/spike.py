"""Gradient-spike clipping (SPAM's second-moment rule, Stable-SPAM's AdaClip).

Both return new tensors and never modify their input (optimizers must not write ``p.grad``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .materialise import materialise


def clip_spikes(grad: Tensor, exp_avg_sq: Tensor, threshold: float) -> Tensor:
    """SPAM: entries with ``g² > threshold·v`` become ``sign(g)·sqrt(threshold·v)``.

    ``v`` is the second-moment estimate from the previous step (arXiv 2501.06842, Alg. 1).
    """
    bound = exp_avg_sq.mul(threshold).sqrt_()
    return torch.where(grad.square() > bound.square(), grad.sign() * bound, grad)


def clip_to_running_max(grad: Tensor, running_max_hat: Tensor, grad_absmax: Tensor) -> Tensor:
    """Stable-SPAM AdaClip: entries with ``|g| > M̂`` are rescaled by ``M̂ / max|g|``.

    The largest entry lands exactly on ``M̂``; entries at or below ``M̂`` are untouched.
    """
    running_max_hat = materialise(running_max_hat)
    scale = materialise(running_max_hat / grad_absmax.clamp_min(torch.finfo(grad.dtype).tiny))
    return torch.where(grad.abs() > running_max_hat, grad * scale, grad)
