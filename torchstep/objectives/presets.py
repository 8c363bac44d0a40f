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
gspo          grpo(group, 1e-4) (recon)                    gspo 3e-4/4e-4 (eps from     seq-mean-token-mean    0 (recon)
                                                           memory, unverified)          (per gspo_loss doc)
cispo         grpo(group, 1e-4) (recon)                    cispo, ``eps_max`` REQUIRED  token-mean (card §2,   0 (recon)
                                                           (card gives no default)      TRL ``cispo``)
============  ===========================================  ===========================  =====================  =====

Dynamic sampling (DAPO, DLER) is a loop hook (``advantages.dynamic_sampling_keep``), not part of the loss;
the diagnostics report the zero-variance group fraction it would drop.

Left out (deliberately):

* ``gtpo``: the existing ``gtpo_conflict_token_weights`` covers only the conflict-token weights; GTPO's
  entropy filter / shaping (τ = 0.7, γ = 0.1) and its loss normalisation (divide by the number of conflict
  tokens) are not provided by the stage modules, so a preset would not be GTPO.  Pass the weights yourself
  via ``token_weights=`` on any preset.
* ``ace``: unverified card (placement of α and detaching of c_i unconfirmed) and no stage function exists.
* COPO, DaGRPO, CAPO: unverified cards (gate form / scorer weighting / curvature criterion not recovered).

Overrides: any stage argument listed in ``Objective.stage_args`` (e.g. ``std_eps``, ``scale``, ``eps_low``,
``eps_high``, ``eps_max``, ``kl_beta``, ``aggregation``, ``max_len``, ``token_mean_scope``, ``alpha``/``beta``
(BNPO Beta parameters), ``reward_range``, ``eps`` (REINFORCE++ whitening), ``overlong_max_length``, ...).
Unknown preset names or override keys raise ``ValueError`` listing the valid ones.
TRL/verl numerical parity of these presets is **not yet tested**.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from .advantages import (bnpo_advantages, drgrpo_advantages, dynamic_sampling_keep, grpo_advantages,
                         reinforce_pp_baseline_advantages, rloo_advantages)
from .aggregate import AGGREGATION_MODES, aggregate
from .rewards import overlong_penalty, truncation_penalty
from .surrogates import SurrogateOutput, cispo_loss, gspo_loss, ppo_clip_loss

__all__ = ["Objective", "preset", "PRESETS", "global_normalizer"]

_ADV_FNS = {"grpo": grpo_advantages, "drgrpo": drgrpo_advantages, "rloo": rloo_advantages,
            "reinforce_pp_baseline": reinforce_pp_baseline_advantages, "bnpo": bnpo_advantages}
_ADV_KEYS = {"grpo": ("scale", "std_eps"), "drgrpo": (), "rloo": (), "reinforce_pp_baseline": ("eps",),
             "bnpo": ("reward_range", "alpha", "beta", "p_clamp", "inv_pdf_max")}
_SURR_KEYS = {"ppo_clip": ("eps_low", "eps_high"), "gspo": ("eps_low", "eps_high"), "cispo": ("eps_max",)}
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
                  {"advantage": "recon", "surrogate": "[code] ratio per card; eps unverified (from memory)",
                   "aggregation": "recon (gspo_loss docstring)", "kl": "recon"}),
    "cispo": _spec("grpo", _GRPO_ADV, "cispo", {"eps_max": None}, "token-mean",
                   {"advantage": "recon", "surrogate": "[code]; eps_max has no card default (required)",
                    "aggregation": "[code] card §2 table (TRL cispo)", "kl": "recon"}),
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
                   truncated: Optional[Tensor] = None) -> Tensor:
        """Stage 0 + stage 1 on the **full** batch: per-sequence advantages ``(B,)``."""
        r = self.transform_rewards(rewards, seq_lengths, truncated)
        kw = {k: self.stage_args[k] for k in _ADV_KEYS[self.advantage]}
        return _ADV_FNS[self.advantage](r, group_ids, **kw)

    # ---- stages 3 + 4 ----------------------------------------------------------------------------
    def loss(self, logp: Tensor, old_logp: Tensor, mask: Tensor, advantages: Tensor, *, normalizer,
             group_ids: Optional[Tensor] = None, ref_logp: Optional[Tensor] = None,
             token_weights: Optional[Tensor] = None) -> Tuple[Tensor, SurrogateOutput]:
        a = self.stage_args
        if not isinstance(mask, Tensor) or mask.shape != logp.shape or logp.dim() != 2:
            raise ValueError(f"logp and mask must be padded (B, T) tensors of the same shape, got "
                             f"{tuple(getattr(logp, 'shape', ()))} and {tuple(getattr(mask, 'shape', ()))}")
        if advantages.shape != (logp.shape[0],):
            raise ValueError(f"advantages must be ({logp.shape[0]},), got {tuple(advantages.shape)}")
        kl = {"ref_logp": ref_logp, "beta": a["kl_beta"]}
        if self.surrogate == "ppo_clip":
            out = ppo_clip_loss(logp, old_logp, advantages, a["eps_low"], a["eps_high"], **kl)
        elif self.surrogate == "gspo":
            out = gspo_loss(logp, old_logp, advantages, mask, a["eps_low"], a["eps_high"], **kl)
        else:
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
        return aggregate(out.loss, w, mode, normalizer, **kw), out

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
                 token_weights: Optional[Tensor] = None,
                 advantages: Optional[Tensor] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Return ``(loss, diagnostics)``.  ``advantages`` (full-batch slice) skips stages 0-1.

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
            advantages = self.advantages(rewards, group_ids, seq_lengths=seq_lengths, truncated=truncated)
        loss, out = self.loss(logp, old_logp, mask, advantages, normalizer=normalizer, group_ids=group_ids,
                              ref_logp=ref_logp, token_weights=token_weights)
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
                "adv_abs_mean": advantages.detach().abs().mean(),
                "num_tokens": n_tok,
                "num_seqs": torch.tensor(float(logp.shape[0]), dtype=logp.dtype),
            }
            if entropy is not None:
                if entropy.shape != logp.shape:
                    raise ValueError(f"entropy must be {tuple(logp.shape)}, got {tuple(entropy.shape)}")
                diag["entropy"] = (entropy.detach() * m).sum() / n_tok
        return loss, diag


def global_normalizer(objective: Objective, mask: Tensor, group_ids: Optional[Tensor] = None):
    """The global normaliser for ``objective`` from the **full** optimisation batch's ``(B, T)`` mask.

    * ``token-mean``: active tokens Σ mask;  ``group-mean-token-mean``: number of distinct groups (needs
      ``group_ids``);  sequence modes: B;
    * ``seq-mean-token-sum-norm`` (Dr.GRPO): B when the preset has ``max_len`` (aggregate then uses
      C = B·max_len, TRL), else B·T with T the padded length (TRL's C with max_len = T).
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
