"""Gradient and Hessian alignment between training domains (the quantities Hessian-alignment penalises).

Hemati, Zhang, Estiri, Chen, "Understanding Hessian Alignment for Domain Generalization" (ICCV 2023,
arXiv 2308.11778); official code huawei-noah/Federated-Learning, folder ``HessianAlignment`` (DomainBed fork,
``domainbed/algorithms.py`` classes ``HGP`` and ``Hutchinson``), read, not run.

Domains e = 1…E, each with a batch; ``ℓ_e`` its mean loss; φ the parameters measured (the paper: the
classifier head only — pass ``params=model.classifier``).  ``g_e = ∇_φ ℓ_e``, ``H_e = ∇²_φ ℓ_e``; the targets are
those of the mean loss ``ℓ̄ = mean_e ℓ_e``: ``ḡ = mean_e g_e``, ``H̄ = mean_e H_e``.

* gradient dispersion    ``(1/E) Σ_e ‖g_e − ḡ‖²``;
* HGP dispersion         ``(1/E) Σ_e ‖H_e g_e − H̄ ḡ‖²`` — the paper's HGP vector ``‖g‖·∇‖g‖ = H g`` (exact
  identity), computed here as one Hessian-vector product instead (defined at g = 0 too; the official code adds
  1e-16 to every gradient entry inside the norm);
* Hutchinson dispersion  ``(1/E) Σ_e ‖D_e − D̄‖²`` with ``D_e = (1/R) Σ_r z_r ⊙ H_e z_r`` (Rademacher z_r);
  deviation: the *same* probes for every domain (common random numbers), so ``D̄ = mean_e D_e`` exactly —
  the official code draws fresh probes for D̄ and for each domain;
* exact (small φ only): ``(1/E) Σ_e ‖diag H_e − diag H̄‖²`` and the spectral gap ``max_{e,e'} ‖H_e − H_e'‖₂``
  that the paper's transfer bound is stated in (for heads).

The official per-step penalty is ``α·HGP (or Hutchinson) dispersion + β·gradient dispersion`` (HGP α = 1e-4,
β = 5e-3; Hutchinson α = 1e-3, β = 5e-3, R = 300), added to ``ℓ̄`` and differentiated (third order); this
module reports the dispersions only (no graph is kept).
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from ..ops.hessian import hutchinson_diagonal
from ..optim._base import check_choice
from .monitor import LossFn


@dataclass(frozen=True)
class DomainAlignment:
    """The result of :func:`domain_alignment` (floats; None where not requested)."""
    losses: list[float]                      # ℓ_e per domain
    grad_dispersion: float                   # (1/E) Σ ‖g_e − ḡ‖²
    hgp_dispersion: float                    # (1/E) Σ ‖H_e g_e − H̄ ḡ‖²
    hutchinson_dispersion: float | None      # (1/E) Σ ‖D_e − D̄‖² (common probes)
    diag_dispersion: float | None            # exact: (1/E) Σ ‖diag H_e − diag H̄‖²
    spectral_gap: float | None               # exact: max_{e, e'} ‖H_e − H_e'‖₂


def _flat(ts: Iterable[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(ts, like)])


def _dispersion(vectors: list[Tensor]) -> float:
    mean = torch.stack(vectors).mean(0)
    return float(sum((v - mean).square().sum() for v in vectors) / len(vectors))


def _hvp(grads: Sequence[Tensor | None], phi: list[Tensor], v: Tensor) -> Tensor:
    """``H v`` (flat) from a gradient that holds its graph; parameters the gradient does not depend on give 0."""
    live = [i for i, gr in enumerate(grads) if gr is not None and gr.requires_grad]
    chunks = v.split([p.numel() for p in phi])
    out = torch.autograd.grad([grads[i] for i in live], [phi[i] for i in live],
                              [chunks[i].view_as(phi[i]) for i in live], retain_graph=True,
                              allow_unused=True) if live else []
    full: list[Tensor | None] = [None] * len(phi)
    for i, o in zip(live, out):
        full[i] = o
    return _flat(full, phi).detach()


@contextlib.contextmanager
def _mode(model: nn.Module, mode: str):
    modes = {m: m.training for m in model.modules()}
    if mode == "eval":
        model.eval()
    try:
        yield
    finally:
        for m, was in modes.items():
            m.train(was)


def domain_alignment(model: nn.Module, loss_fn: LossFn, batches: Sequence[tuple[Tensor, Tensor]],
                     params: nn.Module | Iterable[nn.Parameter] | None = None, *, hutchinson_samples: int = 0,
                     exact: bool = False, generator: torch.Generator | None = None, reduction: str = "mean",
                     mode: str = "eval") -> DomainAlignment:
    """Gradient / Hessian dispersion across domains at the current parameters (arXiv 2308.11778).

    Args:
        model: the network; ``outputs = model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        batches: one ``(inputs, targets)`` batch per domain (at least 2).
        params: φ — a submodule (its parameters) or parameters of ``model`` (default None: every parameter with
            ``requires_grad``; the paper uses the classifier head).
        hutchinson_samples: R Rademacher probes for the Hutchinson diagonal dispersion (default 0: not computed;
            the official code uses 300).  The same R probes serve every domain: ``generator`` is re-wound to its
            state at the call for each domain (default None: a generator seeded once from the global RNG).
        exact: also form each dense ``H_e`` (dim φ HVPs, one per basis vector; memory dim(φ)² per domain) for
            the exact diagonal dispersion and the spectral gap (default False).
        generator: ``torch.Generator`` for the probes (see ``hutchinson_samples``).
        reduction: ``"mean"`` (default: ``loss_fn`` returns the batch mean) or ``"sum"`` (divided here by
            ``targets.shape[0]``).
        mode: ``"eval"`` (default: BatchNorm/dropout in eval mode while measuring, restored after) or
            ``"train"`` (as the modules are).

    Cost per domain: one forward, one gradient with ``create_graph``, two HVPs (along g_e and ḡ); Hutchinson
    adds one gradient and R HVPs (``torchstep.ops.hessian.hutchinson_diagonal``); ``exact`` dim φ HVPs.
    Memory: every domain's graph is held until its HVPs are done (all domains at once).
    """
    check_choice("reduction", reduction, ("mean", "sum"))
    check_choice("mode", mode, ("eval", "train"))
    if len(batches) < 2:
        raise ValueError(f"Invalid batches: {len(batches)} domains (valid range: at least 2)")
    if not isinstance(hutchinson_samples, int) or hutchinson_samples < 0:
        raise ValueError(f"Invalid hutchinson_samples: {hutchinson_samples!r} (valid range: an int >= 0)")
    phi = [p for p in model.parameters() if p.requires_grad] if params is None else \
        list(params.parameters() if isinstance(params, nn.Module) else params)
    owned = {id(p) for p in model.parameters()}
    if not phi or any(id(p) not in owned for p in phi):
        raise ValueError("Invalid params: give at least one parameter, all of them parameters of model")

    def domain_loss(out: Tensor, targets: Tensor) -> Tensor:
        loss = loss_fn(out, targets)
        return loss / targets.shape[0] if reduction == "sum" else loss

    if hutchinson_samples and generator is None:
        # seeded from the global RNG without advancing it: a diagnostic inside a training loop must not change
        # the run (different probes per call come from the caller's generator if wanted)
        with torch.random.fork_rng(devices=[]):
            seed = int(torch.randint(2 ** 62, ()))
        generator = torch.Generator(device=phi[0].device).manual_seed(seed)
    state = generator.get_state() if generator is not None else None
    with _mode(model, mode), torch.enable_grad():
        graphs = []
        for inputs, targets in batches:
            loss = domain_loss(model(inputs), targets)
            graphs.append((loss, torch.autograd.grad(loss, phi, create_graph=True, allow_unused=True)))
        g = [_flat(grads, phi).detach() for _, grads in graphs]
        g_mean = torch.stack(g).mean(0)
        hg = [_hvp(grads, phi, g_e) for (_, grads), g_e in zip(graphs, g)]
        hbar_gbar = torch.stack([_hvp(grads, phi, g_mean) for _, grads in graphs]).mean(0)
        eye = torch.eye(g_mean.numel(), dtype=g_mean.dtype, device=g_mean.device) if exact else None
        dense = [torch.stack([_hvp(grads, phi, row) for row in eye]) for _, grads in graphs] if exact else []
        diag = []
        for loss, _ in graphs if hutchinson_samples else ():       # last: hutchinson_diagonal frees the graph
            generator.set_state(state)
            diag.append(_flat(hutchinson_diagonal(loss, phi, samples=hutchinson_samples, generator=generator),
                              phi).detach())
        losses = [float(loss.detach()) for loss, _ in graphs]
        del graphs
    return DomainAlignment(
        losses=losses, grad_dispersion=_dispersion(g),
        hgp_dispersion=float(sum((h - hbar_gbar).square().sum() for h in hg) / len(hg)),
        hutchinson_dispersion=_dispersion(diag) if hutchinson_samples else None,
        diag_dispersion=_dispersion([H.diagonal() for H in dense]) if exact else None,
        spectral_gap=max(float(torch.linalg.eigvalsh(a - b).abs().max())
                         for a, b in itertools.combinations(dense, 2)) if exact else None)


__all__ = ["DomainAlignment", "domain_alignment"]
