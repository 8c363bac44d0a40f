"""Loop-level utilities for GRPO-style training: DAPO's accumulate-until-full dynamic-sampling buffer, plus
re-exports of the rollout allocators / prompt samplers in :mod:`torchstep.objectives.samplers`.

Not a trainer: generation stays with the caller; these objects only decide what to keep / allocate / sample.
Every stateful object has ``state_dict()`` / ``load_state_dict()`` holding plain Python data and tensors
(loadable with ``torch.load(..., weights_only=True)``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from .advantages import dynamic_sampling_keep
from .samplers import (CurESPromptSampler, VADEThompsonSampler, cures_allocate, cures_prompt_probs, cures_sigma,
                       gvm_allocate, knapsack_allocate, knapsack_value, proportional_allocate, sample_beta)

__all__ = ["DynamicSamplingBuffer", "knapsack_value", "knapsack_allocate", "gvm_allocate", "cures_sigma",
           "cures_allocate", "cures_prompt_probs", "CurESPromptSampler", "VADEThompsonSampler", "sample_beta",
           "proportional_allocate"]


class DynamicSamplingBuffer:
    """DAPO dynamic sampling with accumulate-until-full (Yu et al. 2025, arXiv 2503.14476) **[code]**.

    ``add(rewards, group_ids, indices)`` takes one generation round (flat ``(B,)`` tensors; ``group_ids`` are
    local to the call), drops groups whose reward population std is ``<= tol`` via
    :func:`~torchstep.objectives.advantages.dynamic_sampling_keep` (all-correct / all-wrong groups for binary
    rewards), and queues the surviving groups in arrival order (ascending group id within a call).
    ``pop()`` returns a batch of **exactly** ``target_groups`` groups once ``ready``, else ``None``; the surplus
    stays queued for the next batch (and across a ``state_dict`` round trip).

    A batch is a dict: ``rewards`` (float, flat), ``group_ids`` (int64, relabelled 0..target_groups−1),
    ``indices`` (int64 payload indices the caller uses to fetch the completions), ``group_sizes`` (int64).

    Args:
        target_groups: groups per emitted batch (> 0).
        tol: std threshold (default 0.0). keep_singletons: keep size-1 groups (default False; see
            :func:`dynamic_sampling_keep`).
    Counters ``groups_seen`` / ``groups_dropped`` / ``batches_emitted`` are kept for logging.
    """

    def __init__(self, target_groups: int, tol: float = 0.0, keep_singletons: bool = False):
        if isinstance(target_groups, bool) or int(target_groups) != target_groups or target_groups <= 0:
            raise ValueError(f"target_groups must be a positive integer, got {target_groups!r}")
        if not (tol >= 0):
            raise ValueError(f"tol must be >= 0, got {tol}")
        self.target_groups = int(target_groups)
        self.tol = float(tol)
        self.keep_singletons = bool(keep_singletons)
        self._rewards: List[torch.Tensor] = []
        self._indices: List[torch.Tensor] = []
        self.groups_seen = 0
        self.groups_dropped = 0
        self.batches_emitted = 0

    def __len__(self) -> int:
        """Number of kept groups currently queued."""
        return len(self._rewards)

    @property
    def ready(self) -> bool:
        return len(self._rewards) >= self.target_groups

    def add(self, rewards: torch.Tensor, group_ids: torch.Tensor, indices: Optional[torch.Tensor] = None) -> int:
        """Queue the non-degenerate groups of one round; returns how many groups were kept.

        ``indices`` (default ``arange(B)``) are the payload indices carried with each completion.
        """
        if not isinstance(rewards, torch.Tensor) or not isinstance(group_ids, torch.Tensor):
            raise ValueError("rewards and group_ids must be torch tensors")
        if indices is None:
            indices = torch.arange(rewards.numel(), device=rewards.device)
        indices = torch.as_tensor(indices)
        if indices.shape != rewards.shape:
            raise ValueError(f"indices shape {tuple(indices.shape)} does not match rewards shape "
                             f"{tuple(rewards.shape)}")
        if indices.dtype.is_floating_point or indices.dtype == torch.bool:
            raise ValueError("indices must be an integer tensor")
        keep = dynamic_sampling_keep(rewards, group_ids, self.tol, keep_singletons=self.keep_singletons)
        gid = group_ids.long()
        uniq = torch.unique(gid)                      # sorted ascending
        kept = 0
        for g in uniq.tolist():
            m = gid == g
            if bool(keep[m][0]):
                self._rewards.append(rewards[m].detach().clone())
                self._indices.append(indices[m].long().clone())
                kept += 1
        self.groups_seen += int(uniq.numel())
        self.groups_dropped += int(uniq.numel()) - kept
        return kept

    def pop(self) -> Optional[Dict[str, torch.Tensor]]:
        """Return exactly ``target_groups`` groups (FIFO) if ready, else ``None``."""
        if not self.ready:
            return None
        T = self.target_groups
        r, ix = self._rewards[:T], self._indices[:T]
        self._rewards, self._indices = self._rewards[T:], self._indices[T:]
        sizes = torch.tensor([t.numel() for t in r], dtype=torch.long)
        self.batches_emitted += 1
        return {"rewards": torch.cat(r), "indices": torch.cat(ix),
                "group_ids": torch.repeat_interleave(torch.arange(T), sizes), "group_sizes": sizes}

    def state_dict(self) -> Dict[str, Any]:
        return {"target_groups": self.target_groups, "tol": self.tol, "keep_singletons": self.keep_singletons,
                "rewards": [t.clone() for t in self._rewards], "indices": [t.clone() for t in self._indices],
                "groups_seen": self.groups_seen, "groups_dropped": self.groups_dropped,
                "batches_emitted": self.batches_emitted}

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if len(sd["rewards"]) != len(sd["indices"]):
            raise ValueError("state_dict rewards / indices lists differ in length")
        for a, b in zip(sd["rewards"], sd["indices"]):
            if a.shape != b.shape:
                raise ValueError("state_dict group reward / index shapes differ")
        self.target_groups = int(sd["target_groups"])
        self.tol = float(sd["tol"])
        self.keep_singletons = bool(sd["keep_singletons"])
        self._rewards = [t.clone() for t in sd["rewards"]]
        self._indices = [t.long().clone() for t in sd["indices"]]
        self.groups_seen = int(sd["groups_seen"])
        self.groups_dropped = int(sd["groups_dropped"])
        self.batches_emitted = int(sd["batches_emitted"])
