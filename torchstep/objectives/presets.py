"""Named objective presets composed from the stage functions (card ``rl_objectives.md`` §1, §3).

``preset(name, **overrides)`` returns an :class:`Objective` that chains, with no re-implementation,

    stage 0 rewards     ``rewards.overlong_penalty`` / ``rewards.truncation_penalty`` (only when configured)
    stage 1 advantages  ``advantages.*_advantages``
    stage 3 surrogate   ``surrogates.ppo_clip_loss`` / ``gspo_loss`` / ``cispo_loss`` (+ ``kl_beta``·k3)
    stage 4 aggregate   ``aggregate.aggregate`` with an **explicit global normaliser**

Calling the objective maps ``(rewards, group_ids, logp, old_logp, mask, *, normalizer, ...)`` (flat ``(B,)``
rewards / group ids, padded ``(B, T)`` token tensors) to ``(loss, diagnostics)``.

Normaliser (card §4): ``normalizer`` is a required keyword; it is the global count of the *optimisation*
batch (all micro-batches, all ranks) and :func:`global_normalizer` computes it from the full batch's mask.
Nothing divides by accumulation steps: summing the micro-batch losses gives the full-batch loss.
Batch-level advantage statistics (``scale="batch"``, REINFORCE++ whitening, BNPO's Beta parameters) depend
on the whole batch, so for micro-batching compute ``obj.advantages(...)`` once on the full batch and pass
slices via ``advantages=``.  Group statistics only need whole groups per micro-batch.

Presets and their stage choices (tag per card §3: **[code]** = the card marks it read in code; *recon* = a
choice made here that the card does not state for that method):

============  ===========================================  ===========================  =====================  =====
name          advantages                                   surrogate                    aggregation            KL
============  ===========================================  ===========================  =====================  =====
grpo          grpo(scale="group", std_eps=1e-4) [code]     ppo_clip 0.2/0.2 [code]      seq-mean-token-mean    0 [code]
                                                                                        [code]
dr_grpo       drgrpo (r - mean_g r) [code]                 ppo_clip 0.2/0.2 (recon)     seq-mean-token-sum-norm 0 (recon)
                                                                                        [code]
dapo          grpo(group, 1e-4) (recon: card names no      ppo_clip 0.2/0.28 [code]     token-mean (batch) or  none
              estimator); optional soft overlong reward                                 group-mean-token-mean  [code]
              (``overlong_max_length``/``_cache_length``)                               [code]
dler          reinforce_pp_baseline [code]; optional       ppo_clip 0.2/0.28 [code]     token-mean [code]      0 (recon)
              ``truncation_max_length`` penalty [code]
rloo          rloo [code]                                  ppo_clip 0.2/0.2 (recon)     seq-mean-token-mean    0 (recon)
                                                                                        (recon)
reinforce_pp  reinforce_pp_baseline [code]                 ppo_clip 0.2/0.2 (recon)     token-mean (recon)     0 (recon)
bnpo          bnpo (data-derived alpha/beta) [code]        ppo_clip 0.2/0.2 (recon)     seq-mean-token-mean    0 (recon)
                                                                                        (recon)
gspo          grpo(group, 1e-4) (recon)                    gspo 3e-4/4e-4 (paper's      seq-mean-token-mean    0 (recon)
                                                           clip ranges, checked in a    (per gspo_loss doc)
                                                           secondary source quoting it)
cispo         grpo(group, 1e-4) (recon)                    cispo, ``eps_max`` REQUIRED  token-mean (card §2,   0 (recon)
                                                           (card gives no default)      TRL ``cispo``)
gtpo          drgrpo r - mean_g r [code: author code];     -(pi/sg(pi))*A, no clip      gtpo-conflict-mean     none
              then entropy filter H_i > tau -> A = 0,      [code] (``gtpo_ratio=       [code] (Z = 1: sum)    [code]
              else A - gamma*H_i (tau 0.7, gamma 0.1)      'ppo_clip'`` recon)
              [code]; conflict weights 2/0 leading run
              [code per card]
ace           grpo(group, 1e-4), then ACE on incorrect     ppo_clip 0.2/0.2 (recon)     seq-mean-token-mean    0 (recon)
              A<0: A*(1 + alpha*softplus(c_i)), alpha=1,                                (recon)
              c_i = sum_t (old_logp - ref_logp) detached
              -- **unverified** (alpha placement/default,
              detaching)
copo          **reconstructed**: w_q*local GRPO +          ppo_clip 0.2/0.2 per term    seq-mean-token-mean    0 (recon)
              (1-w_q)*global (group-mean return            (reconstructed)              (reconstructed)
              standardised over prompts), w_q = H_b(p_q)/ln2
============  ===========================================  ===========================  =====================  =====

Extra inputs: ``gtpo`` needs ``token_ids=`` (B, T) and ``entropy=`` (B, T) (per-token entropies of the current
policy) at call time, and whole prompt groups per call (conflict tokens are a group property); ``ace``
needs ``ref_logp=`` (B, T) (and ``old_logp``/``mask``, which every call has) — for micro-batching compute
``obj.advantages(r, gid, old_logp=..., ref_logp=..., mask=...)`` on the full batch; ``copo``'s
``obj.advantages`` returns ``(B, 3)`` = [A_local, A_global, gate] (the global term is a batch statistic).
Missing inputs raise ``ValueError`` naming them.

GTPO details (``gtpo.py``, checked against the author code): H_i = masked mean of the per-token entropy;
the conflict weights use the sign of r - mean_g r *before* shaping; the shaping also hits A = 0
completions (−γ·H_i); the loss is Σ_i [Σ_t ℓ λ m / |o_i|] / max(n_i, 1) / Z with n_i the completion's
conflict-token count and |o_i| its mask count; ``global_normalizer`` returns Z = 1 (the author code sums
over completions) — pass B for a per-completion mean.  ``trailing=True`` adds the author code's trailing
run (multiplicative weights); the card's rule and §6 #10 use the leading run only.

Dynamic sampling (DAPO, DLER) is a loop hook (``advantages.dynamic_sampling_keep``), not part of the loss;
the diagnostics report the zero-variance group fraction it would drop.

Left out (deliberately):

* DaGRPO (Xie et al. 2025, arXiv 2512.06337): its two mechanisms need an external LLM scorer that rates
  positive/negative rollout *pairs* and an off-policy path for "anchor" responses; the paper's rule for
  turning the masked pairs into per-sequence or per-token weights was not recovered (only the abstract /
  summaries were available), so a pair-mask stage would be invented, not reconstructed.
* CAPO (Melo, Abate, Gal 2025, arXiv 2510.00819): the masking criterion (a last-layer curvature model that
  predicts which samples/tokens break a local trust region, < 8 % tokens rejected) was not recovered, and it
  needs per-sample last-layer gradients plus the update direction — an optimizer-side hook, not a loss
  stage.  No public code.

Overrides: any stage argument listed in ``Objective.stage_args`` (e.g. ``std_eps``, ``scale``, ``eps_low``,
``eps_high``, ``eps_max``, ``kl_beta``, ``aggregation``, ``max_len``, ``token_mean_scope``, ``alpha``/``beta``
(BNPO Beta parameters), ``reward_range``, ``eps`` (REINFORCE++ whitening), ``overlong_max_length``, ...;
``gtpo``: ``tau``, ``gamma``, ``pos_weight``, ``neg_weight``, ``trailing``, ``gtpo_ratio``; ``ace``:
``ace_alpha``, ``ace_correct_threshold``; ``copo``: ``copo_std_eps``, ``copo_reward_range``).
Unknown preset names or override keys raise ``ValueError`` listing the valid ones.
TRL / verl numerical parity: ``tests/test_objectives_adapters.py`` (through ``torchstep.integrations.trl`` /
``.verl``; docs/rl-objectives.md lists what matches and the deviations).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .ace import ace_advantages
from .advantages import (bnpo_advantages, drgrpo_advantages, dynamic_sampling_keep, grpo_advantages,
                         reinforce_pp_baseline_advantages, rloo_advantages)
from .aggregate import AGGREGATION_MODES, aggregate
from .copo import copo_entropy_gate, copo_global_advantages, copo_loss
from .gtpo import (gtpo_aggregate, gtpo_conflict_tokens, gtpo_conflict_token_weights, gtpo_entropy_advantages,
                   gtpo_sequence_entropy, gtpo_surrogate)
from .rewards import overlong_penalty, truncation_penalty
from .surrogates import SurrogateOutput, cispo_loss, gspo_loss, k3_kl, ppo_clip_loss

__all__ = ["Objective", "preset", "PRESETS", "global_normalizer"]

_ADV_FNS = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages, "rloo": rloo_advantages,
            "reinforce_pp_baseline": reinforce_pp_baseline_advantages, "bnpo": bnpo_advantages,
            "copo": grpo_advantages}
_ADV_KEYS = {"grpo": ("scale", "std_eps"), "drgrpo": (), "rloo": (), "reinforce_pp_baseline": ("eps",),
             "bnpo": ("reward_range", "alpha", "beta", "p_clamp", "inv_pdf_max"), "copo": ("scale", "std_eps")}
_SURR_KEYS = {"ppo_clip": ("eps_low", "eps_high"), "gspo": ("eps_low", "eps_high"), "cispo": ("eps_max",),
              "gtpo": ("eps_low", "eps_high"), "copo": ("eps_low", "eps_high")}
#: GTPO's own reduction (not an ``aggregate`` mode): Σ_i [Σ_t ℓλm/|o_i|]/max(n_i,1)/Z, see ``gtpo.gtpo_aggregate``
GTPO_AGGREGATION = "gtpo-conflict-mean"
_GTPO_RATIOS = ("detached", "ppo_clip")
_REWARD_KEYS = ("overlong_max_length", "overlong_cache_length", "truncation_max_length")
_AGG_KEYS = ("aggregation", "max_len", "token_mean_scope")


def _spec(adv, adv_kw, surr, surr_kw, agg, provenance, **extra):
    d = {"advantage": adv, "surrogate": surr, "provenance": provenance,
         "stage_args": {**adv_kw, **surr_kw, "kl_beta": 0.0, "aggregation": agg, "max_len": None,
                        "token_mean_scope": "batch", "overlong_max_length": None,
                        "overlong_cache_length": None, "truncation_max_length": None}}
    d["stage_args"].update(extra)
    return d


_GRPO_ADV = {"scale": "group", "std_eps": 1e-4}

#: preset name -> stage choices and provenance (see module docstring)
PRESETS: Dict[str, Dict[str, Any]] = {
    "grpo": _spec("grpo", _GRPO_ADV, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}, "seq-mean-token-mean",
                  {"advantage": "[code]", "surrogate": "[code]", "aggregation": "[code]", "kl": "[code] TRL β=0"}),
    "dr_grpo": _spec("drgrpo", {}, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}, "seq-mean-token-sum-norm",
                     {"advantage": "[code]", "surrogate": "recon (card: GRPO's clip)",
                      "aggregation": "[code]", "kl": "recon"}),
    "dapo": _spec("grpo", _GRPO_ADV, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.28}, "token-mean",
                  {"advantage": "recon (card names no estimator; GRPO group std)", "surrogate": "[code]",
                   "aggregation": "[code] (scope batch|group is the card's open ambiguity)", "kl": "[code] none",
                   "rewards": "[code] soft overlong, off unless overlong_* set"}),
    "dler": _spec("reinforce_pp_baseline", {"eps": 1e-8}, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.28},
                  "token-mean",
                  {"advantage": "[code]", "surrogate": "[code] eps_high 0.28 (eps_low 0.2 recon)",
                   "aggregation": "[code]", "kl": "recon",
                   "rewards": "[code] truncation penalty, off unless truncation_max_length set"}),
    "rloo": _spec("rloo", {}, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}, "seq-mean-token-mean",
                  {"advantage": "[code]", "surrogate": "recon", "aggregation": "recon", "kl": "recon"}),
    "reinforce_pp": _spec("reinforce_pp_baseline", {"eps": 1e-8}, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2},
                          "token-mean",
                          {"advantage": "[code]", "surrogate": "recon", "aggregation": "recon", "kl": "recon"}),
    "bnpo": _spec("bnpo", {"reward_range": (0.0, 1.0), "alpha": None, "beta": None, "p_clamp": 1e-6,
                           "inv_pdf_max": 1e6}, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2},
                  "seq-mean-token-mean",
                  {"advantage": "[code]", "surrogate": "recon", "aggregation": "recon", "kl": "recon"}),
    "gspo": _spec("grpo", _GRPO_ADV, "gspo", {"eps_low": 3e-4, "eps_high": 4e-4}, "seq-mean-token-mean",
                  {"advantage": "recon", "surrogate": "[code] ratio per card; eps 3e-4/4e-4 = paper (via a source quoting it)",
                   "aggregation": "recon (gspo_loss docstring)", "kl": "recon"}),
    "cispo": _spec("grpo", _GRPO_ADV, "cispo", {"eps_max": None}, "token-mean",
                   {"advantage": "recon", "surrogate": "[code]; eps_max has no card default (required)",
                    "aggregation": "[code] card §2 table (TRL cispo)", "kl": "recon"}),
    "gtpo": _spec("drgrpo", {}, "gtpo", {"eps_low": 0.2, "eps_high": 0.2}, GTPO_AGGREGATION,
                  {"advantage": "[code] r - mean_g r (author code: std division commented out)",
                   "entropy": "[code] filter H_i > tau -> A = 0, else A - gamma*H_i (tau 0.7, gamma 0.1, all signs)",
                   "token_weights": "[code] conflict runs 2.0 / 0.0, leading run (card); trailing=True = author code",
                   "surrogate": "[code] -(pi/sg(pi))*A (gtpo_ratio='detached'); 'ppo_clip' is recon",
                   "aggregation": "[code] per-seq token mean / max(n_conflict, 1), summed (Z = 1)",
                   "kl": "[code] none"},
                  tau=0.7, gamma=0.1, pos_weight=2.0, neg_weight=0.0, trailing=False, gtpo_ratio="detached"),
    "ace": _spec("grpo", _GRPO_ADV, "ppo_clip", {"eps_low": 0.2, "eps_high": 0.2}, "seq-mean-token-mean",
                 {"advantage": "unverified (card): GRPO then A*(1 + alpha*softplus(c)) on incorrect A<0; "
                               "alpha placement, alpha=1 and detached c_i are reconstruction choices",
                  "confidence": "recon: c_i = sum_t (old_logp - ref_logp), detached",
                  "surrogate": "recon (GRPO's; override eps_high=0.28, aggregation='token-mean' for ACE-DAPO)",
                  "aggregation": "recon (GRPO's)", "kl": "recon"},
                 ace_alpha=1.0, ace_correct_threshold=0.5),
    "copo": _spec("copo", _GRPO_ADV, "copo", {"eps_low": 0.2, "eps_high": 0.2}, "seq-mean-token-mean",
                  {"advantage": "reconstructed: local GRPO + global (group-mean return standardised over the "
                                "batch's prompts)", "gate": "reconstructed: w_q = H_b(p_q)/ln 2",
                   "surrogate": "reconstructed: w*clip(A_local) + (1-w)*clip(A_global)",
                   "aggregation": "reconstructed (GRPO's)", "kl": "recon"},
                  copo_std_eps=1e-6, copo_reward_range=(0.0, 1.0)),
}


def _group_count(group_ids: Tensor) -> Tensor:
    return torch.unique(group_ids).numel()


@dataclass(frozen=True)
class Objective:
    """A composed objective (see module docstring).  Build with :func:`preset`."""

    name: str
    advantage: str
    surrogate: str
    stage_args: Dict[str, Any]
    provenance: Dict[str, str] = field(default_factory=dict)

    # ---- stage 0 ---------------------------------------------------------------------------------
    def transform_rewards(self, rewards: Tensor, seq_lengths: Optional[Tensor] = None,
                          truncated: Optional[Tensor] = None) -> Tensor:
        a = self.stage_args
        if a["overlong_max_length"] is not None:
            if seq_lengths is None:
                raise ValueError(f"preset {self.name!r} with overlong_max_length needs seq_lengths")
            rewards = overlong_penalty(seq_lengths, a["overlong_max_length"], a["overlong_cache_length"], rewards)
        if a["truncation_max_length"] is not None:
            if seq_lengths is None:
                raise ValueError(f"preset {self.name!r} with truncation_max_length needs seq_lengths")
            rewards = truncation_penalty(rewards, seq_lengths, a["truncation_max_length"], truncated=truncated)
        return rewards

    # ---- stage 1 ---------------------------------------------------------------------------------
    def advantages(self, rewards: Tensor, group_ids: Tensor, *, seq_lengths: Optional[Tensor] = None,
                   truncated: Optional[Tensor] = None, old_logp: Optional[Tensor] = None,
                   ref_logp: Optional[Tensor] = None, mask: Optional[Tensor] = None) -> Tensor:
        """Stage 0 + stage 1 on the **full** batch: per-sequence advantages ``(B,)``.

        * ``ace``: GRPO advantages modified by :func:`~torchstep.objectives.ace.ace_advantages` with
          c_i = Σ_t mask·(old_logp − ref_logp) and correct_i = (raw reward ≥ ``ace_correct_threshold``);
          needs ``old_logp``, ``ref_logp`` and ``mask`` (B, T).
        * ``gtpo``: the stage-1 advantages r − mean_g r *before* entropy filtering/shaping (those need the
          loss-time entropies and are applied in :meth:`loss`, per sequence).
        * ``copo``: a ``(B, 3)`` tensor ``[A_local, A_global, gate]`` (reconstructed; see ``copo.py``).
        """
        r = self.transform_rewards(rewards, seq_lengths, truncated)
        a = self.stage_args
        kw = {k: a[k] for k in _ADV_KEYS[self.advantage]}
        A = _ADV_FNS[self.advantage](r, group_ids, **kw)
        if self.advantage == "copo":
            r0 = torch.where(torch.isnan(r), torch.zeros_like(r), r) if r.dtype.is_floating_point else r
            glob = copo_global_advantages(r0, group_ids, std_eps=a["copo_std_eps"]).to(A.dtype)
            gate = copo_entropy_gate(r0, group_ids, reward_range=a["copo_reward_range"]).to(A.dtype)
            return torch.stack([A, glob, gate], dim=-1)
        if "ace_alpha" in a:
            missing = [n for n, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)) if x is None]
            if missing:
                raise ValueError(f"preset {self.name!r} needs {missing} for ACE's confidence shift "
                                 "c_i = Σ_t mask·(old_logp − ref_logp)")
            correct = rewards >= a["ace_correct_threshold"]
            A = ace_advantages(A, correct, old_logp, ref_logp, mask, alpha=a["ace_alpha"])
        return A

    # ---- stages 3 + 4 ----------------------------------------------------------------------------
    def loss(self, logp: Tensor, old_logp: Tensor, mask: Tensor, advantages: Tensor, *, normalizer,
             group_ids: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None,
             token_weights: Optional[Tensor] = None, token_ids: Optional[Tensor] = None,
             entropy: Optional[Tensor] = None) -> Tuple[Tensor, SurrogateOutput]:
        """Stages (2 +) 3 + 4 on this call's (micro-)batch.  ``gtpo`` needs ``token_ids``, ``entropy`` and
        ``group_ids`` (whole groups per call); ``copo`` takes the ``(B, 3)`` advantages of :meth:`advantages`."""
        return self._loss(logp, old_logp, mask, advantages, normalizer=normalizer, group_ids=group_ids,
                          ref_logp=ref_logp, token_weights=token_weights, token_ids=token_ids,
                          entropy=entropy)[:2]

    def _gtpo_loss(self, logp, old_logp, mask, advantages, normalizer, group_ids, ref_logp, token_weights,
                   token_ids, entropy):
        a = self.stage_args
        missing = [n for n, x in (("token_ids", token_ids), ("entropy", entropy), ("group_ids", group_ids))
                   if x is None]
        if missing:
            raise ValueError(f"preset 'gtpo' needs {missing}: token_ids (B, T) for the conflict tokens, "
                             "entropy (B, T) per-token entropies for the entropy filter/shaping, group_ids (B,)")
        lead, trail = gtpo_conflict_tokens(token_ids, mask, advantages, group_ids, trailing=a["trailing"])
        n_conf = (lead | trail).sum(-1).to(logp.dtype)
        lam = gtpo_conflict_token_weights(token_ids, mask, advantages, group_ids, pos_weight=a["pos_weight"],
                                          neg_weight=a["neg_weight"], trailing=a["trailing"]).to(logp.dtype)
        if token_weights is not None:
            if token_weights.shape != logp.shape:
                raise ValueError(f"token_weights must be {tuple(logp.shape)}, got {tuple(token_weights.shape)}")
            lam = lam * token_weights.to(logp.dtype)
        if entropy.shape != logp.shape:
            raise ValueError(f"entropy must be {tuple(logp.shape)}, got {tuple(entropy.shape)}")
        H = gtpo_sequence_entropy(entropy, mask)
        A = gtpo_entropy_advantages(advantages, H, tau=a["tau"], gamma=a["gamma"])
        if a["gtpo_ratio"] == "detached":
            per_tok = gtpo_surrogate(logp, A)
            if a["kl_beta"] != 0:
                if ref_logp is None:
                    raise ValueError("kl_beta != 0 needs ref_logp")
                per_tok = per_tok + a["kl_beta"] * k3_kl(logp, ref_logp)
            none = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
            out = SurrogateOutput(per_tok, torch.exp(logp - logp.detach()), none, none)
        else:
            out = ppo_clip_loss(logp, old_logp, A, a["eps_low"], a["eps_high"], ref_logp=ref_logp,
                                beta=a["kl_beta"])
        loss = gtpo_aggregate(out.loss, lam, mask, n_conf, normalizer)
        m = mask.bool()
        extra = {"gtpo_filtered_frac": (H > a["tau"]).to(logp.dtype).mean(),
                 "gtpo_conflict_token_frac": n_conf.sum() / m.sum().clamp(min=1).to(logp.dtype),
                 "gtpo_seq_entropy_mean": H.mean()}
        return loss, out, extra, A

    def _loss(self, logp, old_logp, mask, advantages, *, normalizer, group_ids=None, ref_logp=None,
              token_weights=None, token_ids=None, entropy=None):
        a = self.stage_args
        if not isinstance(mask, Tensor) or mask.shape != logp.shape or logp.dim() != 2:
            raise ValueError(f"logp and mask must be padded (B, T) tensors of the same shape, got "
                             f"{tuple(getattr(logp, 'shape', ()))} and {tuple(getattr(mask, 'shape', ()))}")
        want = (logp.shape[0], 3) if self.surrogate == "copo" else (logp.shape[0],)
        if not isinstance(advantages, Tensor) or advantages.shape != want:
            raise ValueError(f"advantages must be {want}, got {tuple(getattr(advantages, 'shape', ()))}"
                             + (" (copo: [A_local, A_global, gate] from obj.advantages)"
                                if self.surrogate == "copo" else ""))
        if self.surrogate == "gtpo":
            return self._gtpo_loss(logp, old_logp, mask, advantages, normalizer, group_ids, ref_logp,
                                   token_weights, token_ids, entropy)
        kl = {"ref_logp": ref_logp, "beta": a["kl_beta"]}
        eff_adv = advantages
        if self.surrogate == "copo":
            out = copo_loss(logp, old_logp, advantages[:, 0], advantages[:, 1], advantages[:, 2],
                            a["eps_low"], a["eps_high"], **kl)
            eff_adv = advantages[:, 0]
        elif self.surrogate == "ppo_clip":
            out = ppo_clip_loss(logp, old_logp, advantages, a["eps_low"], a["eps_high"], **kl)
        elif self.surrogate == "gspo":
            out = gspo_loss(logp, old_logp, advantages, mask, a["eps_low"], a["eps_high"], **kl)
        elif self.surrogate == "cispo":
            out = cispo_loss(logp, old_logp, advantages, a["eps_max"], **kl)
        w = mask.to(logp.dtype)
        if token_weights is not None:
            if token_weights.shape != logp.shape:
                raise ValueError(f"token_weights must be {tuple(logp.shape)}, got {tuple(token_weights.shape)}")
            w = w * token_weights.to(logp.dtype)
        mode = self.aggregation_mode
        kw = {}
        if mode == "seq-mean-token-sum-norm" and a["max_len"] is not None:
            kw["max_len"] = a["max_len"]
        if mode == "group-mean-token-mean":
            if group_ids is None:
                raise ValueError("token_mean_scope='group' needs group_ids")
            kw["group_ids"] = group_ids
        return aggregate(out.loss, w, mode, normalizer, **kw), out, {}, eff_adv

    @property
    def aggregation_mode(self) -> str:
        mode = self.stage_args["aggregation"]
        if mode == "token-mean" and self.stage_args["token_mean_scope"] == "group":
            return "group-mean-token-mean"
        return mode

    # ---- full call -------------------------------------------------------------------------------
    def __call__(self, rewards: Tensor, group_ids: Tensor, logp: Tensor, old_logp: Tensor, mask: Tensor, *,
                 normalizer, ref_logp: Optional[Tensor] = None, seq_lengths: Optional[Tensor] = None,
                 truncated: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
                 token_weights: Optional[Tensor] = None, token_ids: Optional[Tensor] = None,
                 advantages: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Return ``(loss, diagnostics)``.  ``advantages`` (full-batch slice) skips stages 0-1.

        Extra inputs per preset: ``gtpo`` needs ``token_ids`` (B, T) and ``entropy`` (B, T) (whole groups per
        call); ``ace`` needs ``ref_logp`` (B, T) unless ``advantages`` is given; ``copo``'s ``advantages`` is
        the ``(B, 3)`` output of :meth:`advantages`.  Missing inputs raise ``ValueError`` naming them.

        Diagnostics (detached tensors, over this call's valid tokens / sequences / groups):
        ``clip_frac_low``, ``clip_frac_high``, ``zero_var_group_frac`` (groups whose transformed reward has
        population std 0, i.e. what dynamic sampling drops; singletons count as zero-variance),
        ``adv_abs_mean`` (mean |A| over sequences), ``num_tokens``, ``num_seqs``, and ``entropy`` (masked
        token mean) when ``entropy`` (B, T) is passed.
        """
        if not isinstance(rewards, Tensor) or rewards.dim() != 1 or rewards.shape[0] != logp.shape[0]:
            raise ValueError(f"rewards must be (B,) with B = logp.shape[0] = {logp.shape[0]}")
        if seq_lengths is None and (self.stage_args["overlong_max_length"] is not None
                                    or self.stage_args["truncation_max_length"] is not None):
            seq_lengths = mask.sum(-1)
        if advantages is None:
            advantages = self.advantages(rewards, group_ids, seq_lengths=seq_lengths, truncated=truncated,
                                         old_logp=old_logp, ref_logp=ref_logp, mask=mask)
        loss, out, extra, eff_adv = self._loss(logp, old_logp, mask, advantages, normalizer=normalizer,
                                               group_ids=group_ids, ref_logp=ref_logp,
                                               token_weights=token_weights, token_ids=token_ids,
                                               entropy=entropy)
        with torch.no_grad():
            m = mask.bool()
            n_tok = m.sum().to(logp.dtype)
            r = self.transform_rewards(rewards, seq_lengths, truncated)
            r = torch.where(torch.isnan(r), torch.zeros_like(r), r)
            keep = dynamic_sampling_keep(r, group_ids)
            _, gid = torch.unique(group_ids, return_inverse=True)
            G = int(gid.max()) + 1
            kept_g = torch.zeros(G, dtype=torch.bool, device=gid.device).index_fill_(0, gid[keep], True)
            diag = {
                "clip_frac_low": (out.clipped_low & m).sum().to(logp.dtype) / n_tok,
                "clip_frac_high": (out.clipped_high & m).sum().to(logp.dtype) / n_tok,
                "zero_var_group_frac": (~kept_g).sum().to(logp.dtype) / G,
                "adv_abs_mean": eff_adv.detach().abs().mean(),
                "num_tokens": n_tok,
                "num_seqs": torch.tensor(float(logp.shape[0]), dtype=logp.dtype),
            }
            if entropy is not None:
                if entropy.shape != logp.shape:
                    raise ValueError(f"entropy must be {tuple(logp.shape)}, got {tuple(entropy.shape)}")
                diag["entropy"] = (entropy.detach() * m).sum() / n_tok
            diag.update({k: v.detach() for k, v in extra.items()})
        return loss, diag


def global_normalizer(objective: Objective, mask: Tensor, group_ids: Optional[Tensor] = None):
    """The global normaliser for ``objective`` from the **full** optimisation batch's ``(B, T)`` mask.

    * ``token-mean``: active tokens Σ mask;  ``group-mean-token-mean``: number of distinct groups (needs
      ``group_ids``);  sequence modes: B;
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): B when the preset has ``max_len`` (aggregate then uses
      C = B·max_len, TRL), else B·T with T the padded length (TRL's C with max_len = T).
    * ``gtpo-conflict-mean`` (``gtpo``): 1.0 — the author code **sums** the per-completion terms; pass B
      yourself for a per-completion mean.
    Under DDP mean-reduction divide the result by world size (card §2).  Returns a Python number.
    """
    mode = objective.aggregation_mode
    B, T = mask.shape
    if mode == "token-mean":
        return float(mask.bool().sum())
    if mode == "group-mean-token-mean":
        if group_ids is None:
            raise ValueError("group-mean-token-mean normaliser needs group_ids")
        return float(_group_count(group_ids))
    if mode == "seq-mean-token-sum-norm":
        return float(B) if objective.stage_args["max_len"] is not None else float(B * T)
    if mode == "trl-bnpo":
        return None
    if mode == GTPO_AGGREGATION:
        return 1.0
    return float(B)


def preset(name: str, **overrides) -> Objective:
    """Build the named :class:`Objective`; ``overrides`` replace stage arguments (see module docstring)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {sorted(PRESETS)}")
    spec = PRESETS[name]
    args = copy.deepcopy(spec["stage_args"])
    bad = sorted(set(overrides) - set(args))
    if bad:
        raise ValueError(f"unknown override(s) {bad} for preset {name!r}; valid: {sorted(args)}")
    args.update(overrides)
    if (spec["surrogate"] == "gtpo") != (args["aggregation"] == GTPO_AGGREGATION):
        raise ValueError(f"aggregation {GTPO_AGGREGATION!r} is GTPO's own reduction and preset 'gtpo' uses only "
                         f"it; got aggregation={args['aggregation']!r} for preset {name!r}")
    if spec["surrogate"] == "gtpo":
        if args["token_mean_scope"] != "batch":
            raise ValueError("token_mean_scope does not apply to preset 'gtpo' (GTPO's own reduction)")
        if args["gtpo_ratio"] not in _GTPO_RATIOS:
            raise ValueError(f"gtpo_ratio must be one of {_GTPO_RATIOS}, got {args['gtpo_ratio']!r}")
        for k in ("tau", "gamma", "pos_weight", "neg_weight"):
            v = args[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{k} must be a finite number >= 0, got {v!r}")
        return Objective(name=name, advantage=spec["advantage"], surrogate=spec["surrogate"], stage_args=args,
                         provenance=dict(spec["provenance"]))
    if "ace_alpha" in args:
        v = args["ace_alpha"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"ace_alpha must be a finite number >= 0, got {v!r}")
    if args["aggregation"] not in AGGREGATION_MODES or args["aggregation"] == "group-mean-token-mean":
        raise ValueError(f"aggregation must be one of {sorted(set(AGGREGATION_MODES) - {'group-mean-token-mean'})} "
                         "(use token_mean_scope='group' for the per-group token mean)")
    if args["token_mean_scope"] not in ("batch", "group"):
        raise ValueError(f"token_mean_scope must be 'batch' or 'group', got {args['token_mean_scope']!r}")
    if args["token_mean_scope"] == "group" and args["aggregation"] != "token-mean":
        raise ValueError("token_mean_scope='group' only applies to aggregation='token-mean'")
    if spec["surrogate"] == "cispo" and args["eps_max"] is None:
        raise ValueError("preset 'cispo' needs an explicit eps_max override (the card gives no default)")
    if (args["overlong_max_length"] is None) != (args["overlong_cache_length"] is None):
        raise ValueError("give both overlong_max_length and overlong_cache_length, or neither")
    return Objective(name=name, advantage=spec["advantage"], surrogate=spec["surrogate"], stage_args=args,
                     provenance=dict(spec["provenance"]))
