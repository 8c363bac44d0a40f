"""Batch-size ↔ learning-rate rules, regime adaptation and ghost batch norm (schedules_scaling.md §8)."""
from __future__ import annotations

import math

import torch
from torch import nn


def _ratio(batch_size: float, base_batch_size: float) -> float:
    if not (batch_size > 0 and base_batch_size > 0):
        raise ValueError(f"Invalid batch_size: {batch_size!r} / base {base_batch_size!r} (valid range: both > 0)")
    return batch_size / base_batch_size


def granziol_sgd_linear(lr: float, batch_size: float, base_batch_size: float) -> float:
    """SGD: the largest stable lr grows linearly with the batch (Granziol et al., arXiv 2006.09092): ``η₀·k``."""
    return lr * _ratio(batch_size, base_batch_size)


def granziol_adam_sqrt(lr: float, batch_size: float, base_batch_size: float) -> float:
    """Adaptive methods: ``η₀·√k`` (Granziol et al., same paper)."""
    return lr * math.sqrt(_ratio(batch_size, base_batch_size))


def hoffer_sqrt(lr: float, batch_size: float, ghost_batch_size: float) -> float:
    """``η₀·√(B/B_ghost)`` (Hoffer, Hubara, Soudry, arXiv 1705.08741; bigBatch ``--lr_bb_fix``)."""
    return lr * math.sqrt(_ratio(batch_size, ghost_batch_size))


def regime_adaptation(milestones, batch_size: int, ghost_batch_size: int) -> list[int]:
    """Hoffer's regime adaptation: every epoch milestone (and the total epochs) × ⌈B/B_ghost⌉, so the large
    batch makes as many updates as the small one (bigBatch ``--regime_bb_fix``)."""
    k = math.ceil(_ratio(batch_size, ghost_batch_size))
    return [int(m) * k for m in milestones]


class GhostBatchNorm(nn.Module):
    """Batch norm whose statistics are taken over chunks of ``ghost_batch_size`` samples (Hoffer et al.).

    Args:
        num_features: channels (as ``nn.BatchNorm1d/2d``: dimension 1).
        ghost_batch_size: samples per chunk (the last chunk may be smaller).
        running_stats: ``"per_chunk"`` — one running-statistics update per chunk (as applying ``nn.BatchNorm``
            to each chunk in turn); ``"average"`` — one update with the chunks' averaged mean and variance.
        eps, momentum, affine: as ``nn.BatchNorm``.
    In eval mode (or without chunks to split) it is plain batch norm with the running statistics.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, running_stats: str = "per_chunk", eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True) -> None:
        super().__init__()
        if not isinstance(ghost_batch_size, int) or ghost_batch_size < 1:
            raise ValueError(f"Invalid ghost_batch_size: {ghost_batch_size!r} (valid range: an int >= 1)")
        if running_stats not in ("per_chunk", "average"):
            raise ValueError(f"Invalid running_stats: {running_stats!r} (valid range: 'per_chunk' or 'average')")
        self.ghost_batch_size, self.running_stats_mode = ghost_batch_size, running_stats
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=affine)

    def _norm(self, x: torch.Tensor, update: bool) -> torch.Tensor:
        bn = self.bn
        return nn.functional.batch_norm(x, bn.running_mean if update else None, bn.running_var if update else None,
                                        bn.weight, bn.bias, True, bn.momentum, bn.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            bn = self.bn
            return nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        chunks = x.split(self.ghost_batch_size)
        per_chunk = self.running_stats_mode == "per_chunk"
        out = torch.cat([self._norm(c, per_chunk) for c in chunks])
        if not per_chunk:
            with torch.no_grad():
                dims = [d for d in range(x.dim()) if d != 1]
                means = torch.stack([c.mean(dims) for c in chunks]).mean(0)
                variances = torch.stack([c.var(dims, unbiased=True) for c in chunks]).mean(0)
                m = self.bn.momentum
                self.bn.running_mean.mul_(1 - m).add_(means, alpha=m)
                self.bn.running_var.mul_(1 - m).add_(variances, alpha=m)
        self.bn.num_batches_tracked += len(chunks) if per_chunk else 1
        return out


__all__ = ["granziol_sgd_linear", "granziol_adam_sqrt", "hoffer_sqrt", "regime_adaptation", "GhostBatchNorm"]
