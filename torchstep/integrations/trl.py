"""TRL adapter: torchstep objectives that reproduce TRL 1.16.0 ``GRPOTrainer`` conventions by numbers.

:func:`trl_objective` maps ``GRPOConfig`` settings (``loss_type``, ``scale_rewards``, ``epsilon``,
``epsilon_high``, ``beta``, ``max_completion_length``, ``importance_sampling_level``) to a torchstep
:class:`~torchstep.objectives.Objective` built with :func:`~torchstep.objectives.preset` + overrides;
:func:`trl_normalizer` / :func:`trl_loss` give the per-micro-batch normaliser that makes the torchstep loss
equal TRL's ``_compute_loss`` value (TRL divides by ``current_gradient_accumulation_steps`` for
``grpo``/``bnpo``/``dr_grpo``/``luspo`` and by ``num_items_in_batch / num_processes · accum /
steps_per_generation`` for ``dapo``/``cispo``); :func:`torchstep_grpo_trainer` builds a ``GRPOTrainer``
subclass whose ``_compute_loss`` uses a torchstep objective.  Parity is tested against TRL's own code in
``tests/test_objectives_adapters.py``.  TRL is imported only inside :func:`torchstep_grpo_trainer`.

Mapping (TRL -> torchstep):

==========================  =====================================================================
TRL                         torchstep
==========================  =====================================================================
advantages (std ε = 1e-4)   ``grpo_advantages(scale=scale_rewards, std_eps=1e-4)``; NaN reward -> 0
``loss_type="grpo"``        ppo_clip + ``seq-mean-token-mean``, Z = local B · accum
``"dr_grpo"``               ppo_clip + ``seq-mean-token-sum-norm``, ``max_len=max_completion_length``,
                            Z = local B · accum
``"dapo"``                  ppo_clip + ``token-mean``, Z = num_items_in_batch / processes · accum / spg
``"bnpo"``                  ppo_clip + ``trl-bnpo`` (local token mean), then / accum
``"cispo"``                 cispo with ``eps_max = epsilon_high`` + ``token-mean`` (Z as dapo)
``"luspo"``                 gspo surrogate (needs ``importance_sampling_level="sequence"``) + ``luspo``
``importance_sampling_level="sequence"`` with grpo    gspo surrogate + ``seq-mean-token-mean``
``epsilon`` / ``epsilon_high``  ``eps_low`` / ``eps_high`` (``epsilon_high=None`` -> ``epsilon``)
``beta``                    ``kl_beta`` (k3 on the current log-probs, + ``ref_logp``)
==========================  =====================================================================

Not supported (raise ``ValueError``): ``loss_type`` ``sapo``/``vespo``, ``delta`` (two-sided clip: the
presets have no ``delta`` stage argument), ``use_bias_correction_kl``, ``multi_objective_aggregation=
"normalize_then_sum"``; the entropy bonus, top-entropy masking, off-policy masks and vLLM IS correction are
trainer-side and not reproduced.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from ..objectives import Objective, grpo_advantages, preset

__all__ = ["TRL_LOSS_TYPES", "trl_objective", "trl_advantages", "trl_normalizer", "trl_loss",
           "torchstep_grpo_trainer"]

#: TRL ``loss_type`` values this adapter reproduces
TRL_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "luspo")
_TRL_STD_EPS = 1e-4


def trl_objective(loss_type: str = "dapo", *, scale_rewards: str = "group", epsilon: float = 0.2,
                  epsilon_high: Optional[float] = None, beta: float = 0.0, max_completion_length: int = 256,
                  importance_sampling_level: str = "token") -> Objective:
    """A torchstep objective reproducing TRL 1.16.0 ``GRPOTrainer`` for these ``GRPOConfig`` values.

    Args (TRL ``GRPOConfig`` names and defaults):
        loss_type: one of :data:`TRL_LOSS_TYPES` (TRL default ``"dapo"``).
        scale_rewards: ``"group"`` | ``"batch"`` | ``"none"`` -> ``grpo_advantages(scale=...)``, std ε 1e-4.
        epsilon: lower clip width (``eps_low``).
        epsilon_high: upper clip width (``None`` -> ``epsilon``); for ``cispo`` the absolute IS-weight cap.
        beta: k3 KL coefficient (``kl_beta``); pass ``ref_logp`` to the objective when > 0.
        max_completion_length: Dr.GRPO's constant (``max_len``), used by ``loss_type="dr_grpo"`` only.
        importance_sampling_level: ``"token"`` or ``"sequence"`` (GSPO ratio; required by ``luspo``, and
            TRL rejects it for ``bnpo``/``dr_grpo``/``dapo``/``cispo``).
    Returns: an :class:`~torchstep.objectives.Objective` named ``"trl_<loss_type>"``; use its normaliser
    from :func:`trl_normalizer` (or call :func:`trl_loss`).
    """
    if loss_type not in TRL_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} not reproduced; supported: {TRL_LOSS_TYPES}")
    if scale_rewards not in ("group", "batch", "none"):
        raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    if loss_type == "luspo" and importance_sampling_level != "sequence":
        raise ValueError("TRL's luspo requires importance_sampling_level='sequence'")
    if importance_sampling_level == "sequence" and loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        raise ValueError(f"TRL rejects importance_sampling_level='sequence' with loss_type={loss_type!r}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    adv = {"scale": scale_rewards, "std_eps": _TRL_STD_EPS, "kl_beta": float(beta)}
    if loss_type == "cispo":
        obj = preset("cispo", eps_max=float(eps_high), aggregation="token-mean", **adv)
    else:
        agg = {"grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm", "dapo": "token-mean",
               "bnpo": "trl-bnpo", "luspo": "luspo"}[loss_type]
        extra = {"max_len": int(max_completion_length)} if loss_type == "dr_grpo" else {}
        base = "gspo" if importance_sampling_level == "sequence" else "grpo"
        obj = preset(base, eps_low=float(epsilon), eps_high=float(eps_high), aggregation=agg, **extra, **adv)
    return dataclasses.replace(obj, name=f"trl_{loss_type}")


def trl_advantages(rewards: Tensor, group_ids: Tensor, scale_rewards: str = "group") -> Tensor:
    """TRL's GRPO advantages ``(r - mean_g r) / (nanstd + 1e-4)`` (``scale_rewards`` group/batch/none).

    NaN rewards (unscorable completions) are excluded from the statistics and get advantage 0, as in TRL.
    Unlike TRL, groups need not be contiguous or of equal size (``group_ids`` labels them).
    """
    return grpo_advantages(rewards, group_ids, scale=scale_rewards, std_eps=_TRL_STD_EPS)


def trl_normalizer(loss_type: str, mask: Tensor, *, gradient_accumulation_steps: int = 1,
                   num_items_in_batch=None, num_processes: int = 1, steps_per_generation: Optional[int] = None):
    """The torchstep normaliser that makes one micro-batch's loss equal TRL's ``_compute_loss`` (train mode).

    Args:
        loss_type: TRL loss type.
        mask: this micro-batch's ``(B, T)`` completion mask.
        gradient_accumulation_steps: TRL's ``current_gradient_accumulation_steps``.
        num_items_in_batch: ``inputs["num_items_in_batch"]`` (tokens of the whole generation batch, all
            processes); required for ``dapo``/``cispo``.
        num_processes: ``accelerator.num_processes``.
        steps_per_generation: ``args.steps_per_generation`` (``None`` -> ``gradient_accumulation_steps``,
            TRL's default).
    Returns: ``B · accum`` (grpo, dr_grpo — whose objective multiplies by ``max_len`` —, luspo);
    ``num_items_in_batch / num_processes · accum / steps_per_generation`` (dapo, cispo); ``None`` for bnpo
    (local token mean; :func:`trl_loss` then divides by ``accum``).
    """
    accum = int(gradient_accumulation_steps)
    if loss_type in ("grpo", "dr_grpo", "luspo"):
        return float(mask.shape[0] * accum)
    if loss_type in ("dapo", "cispo"):
        if num_items_in_batch is None:
            raise ValueError(f"loss_type {loss_type!r} needs num_items_in_batch (TRL inputs['num_items_in_batch'])")
        spg = accum if steps_per_generation is None else int(steps_per_generation)
        n = num_items_in_batch if isinstance(num_items_in_batch, Tensor) else torch.tensor(float(num_items_in_batch))
        return n.clamp(min=1.0) / num_processes * accum / spg
    if loss_type == "bnpo":
        return None
    raise ValueError(f"loss_type {loss_type!r} not reproduced; supported: {TRL_LOSS_TYPES}")


def trl_loss(objective: Objective, loss_type: str, logp: Tensor, old_logp: Tensor, mask: Tensor,
             advantages: Tensor, *, ref_logp: Optional[Tensor] = None, gradient_accumulation_steps: int = 1,
             num_items_in_batch=None, num_processes: int = 1, steps_per_generation: Optional[int] = None):
    """One micro-batch's loss with TRL's normalisation: ``objective.loss`` with :func:`trl_normalizer`
    (and ``/ accum`` for ``bnpo``).  Returns ``(loss, SurrogateOutput)``."""
    z = trl_normalizer(loss_type, mask, gradient_accumulation_steps=gradient_accumulation_steps,
                       num_items_in_batch=num_items_in_batch, num_processes=num_processes,
                       steps_per_generation=steps_per_generation)
    loss, out = objective.loss(logp, old_logp, mask, advantages, normalizer=z, ref_logp=ref_logp)
    if loss_type == "bnpo":
        loss = loss / gradient_accumulation_steps
    return loss, out


def torchstep_grpo_trainer(base=None):
    """A ``GRPOTrainer`` subclass whose ``_compute_loss`` is a torchstep objective (TRL conventions).

    The objective is ``self.torchstep_objective`` if set, else :func:`trl_objective` from the trainer's own
    ``loss_type``/``scale``/``epsilon``/``beta``/``max_completion_length``/``importance_sampling_level``.
    Log-probs come from TRL's ``_get_per_token_logps_and_entropies``; advantages and the old/ref log-probs
    from TRL's ``inputs``.  Training-time extras of TRL's ``_compute_loss`` (entropy bonus/mask,
    off-policy mask, vLLM IS correction, MoE aux loss, metrics) are not reproduced.

    Args:
        base: the trainer class to subclass (default ``trl.GRPOTrainer``; TRL imported here).
    """
    if base is None:
        from trl import GRPOTrainer as base  # lazy: torchstep imports without TRL

    class TorchstepGRPOTrainer(base):
        torchstep_objective: Optional[Objective] = None

        def _torchstep_objective(self) -> Objective:
            if self.torchstep_objective is not None:
                return self.torchstep_objective
            return trl_objective(self.loss_type, scale_rewards=self.scale_rewards, epsilon=self.epsilon_low,
                                 epsilon_high=self.epsilon_high, beta=self.beta,
                                 max_completion_length=self.max_completion_length,
                                 importance_sampling_level=self.importance_sampling_level)

        def _compute_loss(self, model, inputs):
            completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
            input_ids = torch.cat([inputs["prompt_ids"], completion_ids], dim=1)
            attention_mask = torch.cat([inputs["prompt_mask"], completion_mask], dim=1)
            logp, _, _ = self._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                                 completion_ids.size(1))
            old = inputs.get("old_per_token_logps")
            old = logp.detach() if old is None else old
            adv = inputs["advantages"]
            if adv.dim() != 1:
                raise ValueError("the torchstep trainer expects per-sequence advantages (B,)")
            training = getattr(self.model, "training", True)
            loss, _ = trl_loss(self._torchstep_objective(), self.loss_type, logp, old, completion_mask, adv,
                               ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                               gradient_accumulation_steps=self.current_gradient_accumulation_steps
                               if training else 1,
                               num_items_in_batch=inputs.get("num_items_in_batch"),
                               num_processes=self.accelerator.num_processes,
                               steps_per_generation=self.args.steps_per_generation if training else 1)
            return loss

    return TorchstepGRPOTrainer
