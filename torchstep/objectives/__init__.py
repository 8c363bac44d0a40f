"""RL objectives for LLM post-training as composable stages over flat tensors with explicit ``group_ids``
(depends on torch only; ``optim`` never imports it): reward transforms, advantage estimators, surrogates and
an aggregation with an explicit global normaliser (no hidden division by accumulation steps).

``preset(name)`` composes them into an objective ``(rewards, group_ids, logp, old_logp, mask, normalizer=…) →
(loss, diagnostics)``; ``loop`` holds the loop-level pieces (DAPO's accumulate-until-full buffer, rollout
allocators, prompt samplers).  Method modules: ``gtpo`` (GTPO conflict tokens, entropy filter/shaping and
its conflict-normalised loss, checked against the author code), ``ace`` (ACE confidence-shift advantages,
unverified details marked), ``copo`` (COPO, reconstructed).  DaGRPO and CAPO are left out (reasons in
``presets``).  Ecosystem adapters live outside (``torchstep.integrations.verl`` / ``.trl``, parity-tested against
verl's ``core_algos`` and TRL's ``GRPOTrainer._compute_loss``); the ``rl-arith`` harness task trains every preset
(``torchstep bench --suite rl``).  See docs/rl-objectives.md.
"""
from .advantages import (bnpo_advantages, bnpo_beta_params, drgrpo_advantages, dynamic_sampling_keep,
                         group_mean, grpo_advantages, reinforce_pp_baseline_advantages, rloo_advantages)
from .ace import ace_advantages, ace_confidence_shift
from .aggregate import AGGREGATION_MODES, aggregate, gtpo_conflict_token_weights
from .copo import copo_entropy_gate, copo_global_advantages, copo_loss
from .gtpo import (gtpo_aggregate, gtpo_conflict_tokens, gtpo_entropy_advantages, gtpo_entropy_filter,
                   gtpo_entropy_shaping, gtpo_num_conflict_tokens, gtpo_sequence_entropy, gtpo_surrogate)
from .loop import (CurESPromptSampler, DynamicSamplingBuffer, VADEThompsonSampler, cures_allocate, cures_prompt_probs,
                   cures_sigma, gvm_allocate, knapsack_allocate, knapsack_value, proportional_allocate, sample_beta)
from .presets import PRESETS, Objective, global_normalizer, preset
from .rewards import (ensemble_mean, ensemble_rewards, ensemble_uwo, ensemble_wco, overlong_penalty,
                      truncation_penalty)
from .surrogates import (SurrogateOutput, cispo_loss, gspo_loss, gspo_sequence_ratio, k3_kl, ppo_clip_loss,
                         two_sided_clip_loss)

__all__ = ["bnpo_advantages", "bnpo_beta_params", "drgrpo_advantages", "dynamic_sampling_keep", "group_mean",
           "grpo_advantages", "reinforce_pp_baseline_advantages", "rloo_advantages", "AGGREGATION_MODES",
           "aggregate", "gtpo_conflict_token_weights", "ensemble_mean", "ensemble_rewards", "ensemble_uwo",
           "ensemble_wco", "overlong_penalty", "truncation_penalty", "SurrogateOutput", "cispo_loss", "gspo_loss",
           "gspo_sequence_ratio", "k3_kl", "ppo_clip_loss", "two_sided_clip_loss", "CurESPromptSampler",
           "DynamicSamplingBuffer", "VADEThompsonSampler", "cures_allocate", "cures_prompt_probs", "cures_sigma",
           "gvm_allocate", "knapsack_allocate", "knapsack_value", "proportional_allocate", "sample_beta",
           "PRESETS", "Objective", "global_normalizer", "preset", "ace_advantages", "ace_confidence_shift",
           "copo_entropy_gate", "copo_global_advantages", "copo_loss", "gtpo_aggregate", "gtpo_conflict_tokens",
           "gtpo_entropy_advantages", "gtpo_entropy_filter", "gtpo_entropy_shaping", "gtpo_num_conflict_tokens",
           "gtpo_sequence_entropy", "gtpo_surrogate"]
