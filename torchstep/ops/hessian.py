"""Hessian-diagonal estimators used by Sophia-type methods.

* :func:`hutchinson_diagonal` – ``u ⊙ (H u)`` with Rademacher or Gaussian probes, an unbiased
  estimate of ``diag(H)`` (Hutchinson 1989), via one Hessian-vector product per probe.
* :func:`gnb_sampled_loss` – the Gauss–Newton–Bartlett loss of Sophia-G (arXiv 2305.14342,
  Alg. 2): cross-entropy against labels **sampled from the model's own softmax**; the squared
  gradient of this loss (times the batch size) estimates the Gauss–Newton diagonal.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def hutchinson_diagonal(loss: Tensor, params: Sequence[Tensor], *, samples: int = 1,
                        distribution: str = "rademacher",
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """Unbiased estimate of the Hessian diagonal of ``loss`` w.r.t. ``params``.

    ``loss`` must still hold its graph (do not call ``backward`` first).  Averages ``samples``
    probes; costs one gradient with ``create_graph=True`` plus one HVP per probe.
    """
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"Invalid distribution: {distribution!r} (valid range: 'rademacher' or 'gaussian')")
    params = list(params)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    estimate = [torch.zeros_like(p) for p in params]
    for i in range(samples):
        probes = []
        for p in params:
            if distribution == "rademacher":
                u = torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
            else:
                u = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
            probes.append(u)
        hvps = torch.autograd.grad(grads, params, probes, retain_graph=i < samples - 1)
        for e, u, hu in zip(estimate, probes, hvps):
            e.add_(u * hu, alpha=1.0 / samples)
    return estimate


def gnb_sampled_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy of ``logits`` (…, C) against labels sampled from ``softmax(logits)``."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(flat.float().softmax(-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)
