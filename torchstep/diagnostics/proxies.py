"""Small-scale proxies for Transformer training instabilities: LR sensitivity, attention-logit growth, output-logit
divergence (and the z-loss that curbs the latter).

Wortsman et al., "Small-scale proxies for large-scale Transformer training instabilities" (Google DeepMind 2023,
arXiv 2309.14322; no official code found).  Mitigations: qk-layernorm (Dehghani et al. 2023, ViT-22B,
arXiv 2302.05442) and z-loss (Chowdhery et al. 2022, PaLM, arXiv 2204.02311).  torchstep's byte GPT
(``torchstep.bench.gpt``) has both as ``GPTConfig(qk_norm=…, z_loss=…)``.

The two monitors follow :class:`~torchstep.diagnostics.monitor.Monitor`: every ``every`` steps they run one extra
``model(inputs)`` of the batch under ``no_grad`` in eval mode (no BatchNorm update, no dropout draw; every
module's flag restored) and return floats.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..optim._base import check_range
from .hessian import diagnostic_mode
from .monitor import LossFn, Monitor


def lr_sensitivity(sweep: Sequence[tuple[float, float]], initial_loss: float, *,
                   lr_range: tuple[float, float] | None = None) -> float:
    """Learning-rate sensitivity of one algorithm from a learning-rate sweep (arXiv 2309.14322).

    ``LRS = mean_η [min(ℓ(η), ℓ0) − ℓ*]`` with ``ℓ*  = min_η min(ℓ(η), ℓ0)``: the expected excess final loss
    over the sweep, each run's loss capped at the loss at initialisation ℓ0; a diverged run (NaN or ±∞ final
    loss) counts as ℓ0.  0 when every run reaches the same loss; at most ``ℓ0 − ℓ*``.

    Args:
        sweep: ``(lr, final_loss)`` pairs, one per run.  The expectation is the plain mean over the given
            points, so give a grid uniform in log η (the paper's E over η ∈ [a, b]; its exact grid —
            half-decades? — is unverified).
        initial_loss: ℓ0, the loss at initialisation (e.g. ``ln V`` for a uniform start over V tokens).
        lr_range: keep only runs with ``a ≤ lr ≤ b`` (default None: every run; the paper uses
            a = 3e-4, b = 3e-1 [secondary source]).

    Cost: one training run per grid point (none here: this only reduces their results).
    """
    check_range("initial_loss", initial_loss)
    if lr_range is not None:
        a, b = lr_range
        sweep = [(lr, loss) for lr, loss in sweep if a <= lr <= b]
    if not sweep:
        raise ValueError("Invalid sweep: no (lr, final_loss) pairs (in lr_range)")
    for lr, _ in sweep:
        check_range("lr", lr, 0.0, lo_open=True)
    capped = [min(float(loss), initial_loss) if math.isfinite(float(loss)) else initial_loss
              for _, loss in sweep]
    best = min(capped)
    return sum(c - best for c in capped) / len(capped)


def z_loss(logits: Tensor, weight: float = 1e-4) -> Tensor:
    """PaLM's auxiliary z-loss ``weight · mean_tokens (log Z)²`` with ``log Z = logsumexp(z)`` over the last dim.

    Pins log Z near 0 (cross-entropy alone is invariant to adding a constant to all logits; this is not).
    ``∂/∂z = 2·weight·log Z·softmax(z)/N`` for N tokens.  Default weight 1e-4 (PaLM, arXiv 2204.02311).
    """
    check_range("weight", weight, 0.0)
    return weight * logits.logsumexp(-1).square().mean()


def gpt_attention_sites(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module, float | None]]:
    """``{block name: (q module, k module, scale)}`` for every torchstep-GPT-style attention block in ``model``.

    A block is any submodule with ``q_norm``, ``k_norm`` and ``heads`` attributes (``torchstep.bench.gpt.Block``):
    the outputs of ``q_norm`` / ``k_norm`` are exactly the (B, heads, T, d_h) queries and keys its
    scaled-dot-product attention sees (after qk-layernorm when enabled); the scale is ``attn_scale`` (μP) or
    None (SDPA's default 1/√d_h).
    """
    return {name: (m.q_norm, m.k_norm, getattr(m, "attn_scale", None)) for name, m in model.named_modules()
            if all(hasattr(m, a) for a in ("q_norm", "k_norm", "heads"))}


class AttentionLogitMonitor(Monitor):
    """Attention-logit growth: max ``|s_ij|``, ``s_ij = ⟨q_i, k_j⟩·scale``, and attention entropy, per layer.

    The first failure mode of arXiv 2309.14322: at high learning rates the attention logits grow until the
    softmax is one-hot (entropy collapse); qk-layernorm bounds them (``|s_ij| ≤ d_h·scale = √d_h`` with
    scale 1/√d_h when LN has unit gain).

    Records per site ``attn_logit_max/<name>`` (max |s| over batch, heads and allowed (i, j)),
    ``attn_entropy/<name>`` (mean over batch, heads and queries of ``−Σ_j p_ij log p_ij``, natural log; the
    first query of a causal mask always has entropy 0 and is included), and over all sites
    ``attn_logit_max`` (max) and ``attn_entropy_min`` (the smallest per-site mean).

    Args:
        every: measure every ``every`` steps (default 1).
        sites: ``{name: (q_module, k_module, scale)}`` whose forward outputs are the queries and keys, shaped
            ``(B, heads, T, d_h)``; scale None means ``1/√d_h``.  Default None: :func:`gpt_attention_sites`
            of the model at the first measurement.
        causal: mask ``j > i`` (default True, as the GPT).

    Cost: one forward of the batch plus O(B·heads·T²·d_h) per site to recompute the logits (SDPA does not
    expose them); memory B·heads·T² per site.
    """

    name = "attention_logits"

    def __init__(self, every: int = 1, sites: Mapping[str, tuple[nn.Module, nn.Module, float | None]] | None = None,
                 causal: bool = True) -> None:
        super().__init__(every)
        self.sites, self.causal = (dict(sites) if sites is not None else None), causal

    def measure(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                batch: tuple[Any, Any], step: int) -> dict[str, float]:
        sites = self.sites if self.sites is not None else gpt_attention_sites(model)
        if not sites:
            raise ValueError("Invalid model: no attention sites found (pass sites={name: (q_mod, k_mod, scale)})")
        seen: dict[tuple[str, str], Tensor] = {}
        hooks = []
        for name, (qm, km, _) in sites.items():
            for role, mod in (("q", qm), ("k", km)):
                hooks.append(mod.register_forward_hook(
                    lambda _m, _i, out, key=(name, role): seen.__setitem__(key, out.detach())))
        try:
            with torch.no_grad(), diagnostic_mode(model, "eval"):
                model(batch[0])
        finally:
            for h in hooks:
                h.remove()
        out: dict[str, float] = {}
        for name, (_, _, scale) in sites.items():
            q, k = seen[(name, "q")].double(), seen[(name, "k")].double()
            s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
            if self.causal:
                T, S = s.shape[-2], s.shape[-1]
                allowed = torch.ones(T, S, dtype=torch.bool, device=s.device).tril(S - T)
                s_abs = s.abs().masked_fill(~allowed, 0.0)
                s = s.masked_fill(~allowed, -math.inf)
            else:
                s_abs = s.abs()
            logp = s.log_softmax(-1)
            entropy = -(logp.exp() * logp.masked_fill(torch.isinf(logp), 0.0)).sum(-1)
            out[f"attn_logit_max/{name}"] = float(s_abs.max())
            out[f"attn_entropy/{name}"] = float(entropy.mean())
        out["attn_logit_max"] = max(out[f"attn_logit_max/{n}"] for n in sites)
        out["attn_entropy_min"] = min(out[f"attn_entropy/{n}"] for n in sites)
        return out


class OutputLogitMonitor(Monitor):
    """Output-logit divergence: ``log Z = logsumexp(z)`` per token, its drift, and the max logit.

    The second failure mode of arXiv 2309.14322: without weight decay / z-loss, log Z drifts far below 0 late in
    training (cross-entropy is invariant to it, so nothing in the loss holds it).  Records ``log_z_mean``,
    ``log_z_min``, ``log_z_max``, ``log_z_sq_mean`` (the z-loss term before its weight), ``logit_max`` (largest logit) and
    ``log_z_drift`` (``log_z_mean`` minus the first record's — 0 at the first measurement).

    Args:
        every: measure every ``every`` steps (default 1).

    The model's output must be logits with the vocabulary last (``(B, T, V)`` for the GPT, or ``(N, V)``).
    Cost: one forward of the batch plus a logsumexp (the training loss already computes one).
    """

    name = "output_logits"

    def measure(self, *, model: nn.Module, optimizer: torch.optim.Optimizer | None, loss_fn: LossFn,
                batch: tuple[Any, Any], step: int) -> dict[str, float]:
        with torch.no_grad(), diagnostic_mode(model, "eval"):
            logits = model(batch[0]).double()
        log_z = logits.logsumexp(-1)
        mean = float(log_z.mean())
        first = self.history[0]["log_z_mean"] if self.history else mean
        return {"log_z_mean": mean, "log_z_min": float(log_z.min()), "log_z_max": float(log_z.max()),
                "log_z_sq_mean": float(log_z.square().mean()), "logit_max": float(logits.max()),
                "log_z_drift": mean - first}


__all__ = ["lr_sensitivity", "z_loss", "gpt_attention_sites", "AttentionLogitMonitor", "OutputLogitMonitor"]
