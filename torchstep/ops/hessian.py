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


def _probe(p: Tensor, distribution: str, generator: torch.Generator | None) -> Tensor:
    if distribution == "rademacher":
        return torch.randint(0, 2, p.shape, generator=generator, device=p.device).to(p.dtype) * 2 - 1
    return torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)


def hutchinson_diagonal_groups(loss: Tensor, groups: Sequence[tuple[Sequence[Tensor], int, str]], *,
                               generator: torch.Generator | None = None) -> list[list[Tensor]]:
    """Hutchinson estimates for several parameter groups, each with its own ``(params, samples, distribution)``.

    One gradient with ``create_graph=True`` for all parameters, then per group ``samples`` probes over that
    group's parameters only (``E[u ⊙ H_gg u] = diag(H)`` still holds).  A parameter the loss does not
    depend on — or whose gradient does not depend on the parameters — gets an estimate of exactly 0
    (zero curvature) instead of an autograd error.
    """
    for _, _, distribution in groups:
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"Invalid distribution: {distribution!r} (valid range: 'rademacher' or 'gaussian')")
    flat = [p for params, _, _ in groups for p in params]
    grads = dict(zip(map(id, flat), torch.autograd.grad(loss, flat, create_graph=True, allow_unused=True)))
    last = max((k for k, (params, samples, _) in enumerate(groups)
                if any(grads[id(p)] is not None and grads[id(p)].requires_grad for p in params)), default=-1)
    out = []
    for k, (params, samples, distribution) in enumerate(groups):
        estimate = [torch.zeros_like(p) for p in params]
        live = [i for i, p in enumerate(params) if grads[id(p)] is not None and grads[id(p)].requires_grad]
        for s in range(samples if live else 0):
            probes = [_probe(params[i], distribution, generator) for i in live]
            hvps = torch.autograd.grad([grads[id(params[i])] for i in live], [params[i] for i in live], probes,
                                       retain_graph=k < last or s < samples - 1, allow_unused=True)
            for i, u, hu in zip(live, probes, hvps):
                if hu is not None:
                    estimate[i].add_(u * hu, alpha=1.0 / samples)
        out.append(estimate)
    return out


def hutchinson_diagonal(loss: Tensor, params: Sequence[Tensor], *, samples: int = 1,
                        distribution: str = "rademacher",
                        generator: torch.Generator | None = None) -> list[Tensor]:
    """Unbiased estimate of the Hessian diagonal of ``loss`` w.r.t. ``params``.

    ``loss`` must still hold its graph (do not call ``backward`` first).  Averages ``samples``
    probes; costs one gradient with ``create_graph=True`` plus one HVP per probe.  Unused
    parameters get 0 (see :func:`hutchinson_diagonal_groups`).
    """
    return hutchinson_diagonal_groups(loss, [(list(params), samples, distribution)], generator=generator)[0]


def gnb_sampled_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Mean cross-entropy of ``logits`` (…, C) against labels sampled from ``softmax(logits)``."""
    flat = logits.reshape(-1, logits.shape[-1])
    with torch.no_grad():
        labels = torch.multinomial(flat.float().softmax(-1), 1, generator=generator).squeeze(-1)
    return F.cross_entropy(flat, labels)
