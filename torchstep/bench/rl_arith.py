"""``rl-arith``: a real (tiny) RL post-training run on CPU — the card's toy task (``rl_objectives.md`` §5).

The policy is the harness' causal GPT (:mod:`.gpt`: pre-LN, 2 layers, d = 64, 4 heads, vocabulary 14, context
11; 101,120 parameters — the card's 102,606-parameter model differs in details the card does not give).
Prompts are ``"ab+cd="`` with zero-padded 2-digit operands; the answer is the unpadded sum followed by
``<eos>`` (2–4 tokens); completions are capped at 5 tokens, so truncation exists.  Reward: exact match
(0/1).  Metric: greedy accuracy on 512 held-out problems (``val`` = 1 − accuracy, lower is better).

Per trial (seed s):

1. **SFT warm start** (also the reference policy for ACE's ``ref_logp``): teacher-forced cross-entropy on
   2,000 problems, AdamW 1e-3, batches of 64, until greedy accuracy on a separate 256-problem SFT-validation
   set reaches ``sft_target`` (0.25) or ``sft_max_steps``; cached per process by (seed, options).
2. **RL**: each step draws ``prompts`` (16) prompts from a 1,000-prompt pool and samples ``group`` (8)
   completions each at temperature 1 (seeded by seed and step: paired across arms); rewards; the arm's
   objective preset (:func:`torchstep.objectives.preset`) gives the loss with the explicit global normaliser
   of the whole batch.  One update per batch (on-policy: ``old_logp`` is the detached current log-prob, so
   ratios are exactly 1 and PPO/DAPO clipping never binds — as in the card's run).  Arms with
   ``dynamic_sampling`` keep only groups whose rewards vary (DAPO's filter, without over-generation).

The data split (SFT set, pool, held-out set; disjoint) is fixed for every seed; the seed moves the
initialisation, the SFT batch order and the rollouts.  Besides ``val``/``accuracy`` the evaluation reports,
cumulatively over the steps so far, ``zero_var_frac`` (fraction of rollouts in groups whose rewards are all
equal — the wasted rollouts) and ``train_reward`` (mean rollout reward).
"""
from __future__ import annotations

import copy
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..objectives import dynamic_sampling_keep, global_normalizer, preset
from .gpt import GPT, GPTConfig

PLUS, EQUALS, EOS, PAD = 10, 11, 12, 13
VOCAB, PROMPT_LEN, MAX_NEW = 14, 6, 5
CONTEXT = PROMPT_LEN + MAX_NEW
DATA_SEED = 20261201


def prompt_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n,)`` operand tensors → ``(n, 6)`` prompts ``a1 a2 + b1 b2 =``."""
    return torch.stack([a // 10, a % 10, torch.full_like(a, PLUS), b // 10, b % 10, torch.full_like(a, EQUALS)], 1)


def answer_tokens(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n, MAX_NEW)``: the unpadded digits of a + b, ``<eos>``, then ``<pad>``."""
    out = torch.full((a.numel(), MAX_NEW), PAD, dtype=torch.long)
    for i, s in enumerate((a + b).tolist()):
        digits = [int(c) for c in str(s)] + [EOS]
        out[i, :len(digits)] = torch.tensor(digits)
    return out


@lru_cache(maxsize=4)
def split(sft: int, pool: int, held_out: int, sft_val: int = 256) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint problem sets from all 10,000 (a, b) pairs, fixed for every seed.  Taken in the order SFT-validation,
    SFT, pool, held-out, so the SFT sets (and the warm start) do not depend on the pool or held-out sizes."""
    perm = torch.randperm(10_000, generator=torch.Generator().manual_seed(DATA_SEED))
    sizes = {"sft_val": sft_val, "sft": sft, "pool": pool, "held_out": held_out}
    if sum(sizes.values()) > 10_000:
        raise ValueError(f"rl-arith: sft + pool + held_out + {sft_val} problems exceed the 10,000 pairs")
    out, start = {}, 0
    for name, n in sizes.items():
        ids = perm[start:start + n]
        out[name], start = (ids // 100, ids % 100), start + n
    return out


def completion_mask(completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mask, truncated)``: tokens up to and including the first ``<eos>``; no ``<eos>`` ⇒ truncated."""
    is_eos = completions == EOS
    before = torch.cumsum(is_eos.long(), 1) - is_eos.long() == 0      # no eos strictly before this position
    return before, ~is_eos.any(1)


def rewards_of(completions: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Exact match (0/1) of the completion up to its ``<eos>`` with the answer."""
    mask, truncated = completion_mask(completions)
    same = torch.where(mask, completions == answers, torch.ones_like(mask))
    return (same.all(1) & ~truncated).float()


@torch.no_grad()
def generate(model: GPT, prompts: torch.Tensor, generator: torch.Generator | None, temperature: float = 1.0
             ) -> torch.Tensor:
    """``(n, MAX_NEW)`` completions: sampled at ``temperature`` (greedy when ``generator`` is None)."""
    seq = prompts
    for _ in range(MAX_NEW):
        logits = model(seq)[:, -1].float()
        if generator is None:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator).squeeze(1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq[:, PROMPT_LEN:]


def accuracy(model: GPT, a: torch.Tensor, b: torch.Tensor) -> float:
    was = model.training
    model.eval()
    acc = rewards_of(generate(model, prompt_tokens(a, b), None), answer_tokens(a, b)).mean().item()
    model.train(was)
    return acc


def token_logp_entropy(model: GPT, prompts: torch.Tensor, completions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log-probabilities of ``completions`` and the policy's entropy at each position, ``(n, MAX_NEW)``."""
    seq = torch.cat([prompts, completions], 1)
    logits = model(seq[:, :-1])[:, PROMPT_LEN - 1:].float()
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, completions.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def policy_config() -> GPTConfig:
    return GPTConfig(vocab=VOCAB, context=CONTEXT, width=64, depth=2, heads=4)


@lru_cache(maxsize=4)
def warm_start(seed: int, sft: int, target: float, max_steps: int) -> tuple[dict, int, float]:
    """SFT weights (state dict), SFT steps taken and the SFT-validation accuracy reached, for ``seed``."""
    data = split(sft, 0, 0)
    torch.manual_seed(seed)
    model = GPT(policy_config())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    a, b = data["sft"]
    x = torch.cat([prompt_tokens(a, b), answer_tokens(a, b)], 1)
    targets = x[:, 1:].clone()
    targets[:, :PROMPT_LEN - 1] = -100                              # loss on the answer (eos, pad included)
    g = torch.Generator().manual_seed(seed)
    acc, step = 0.0, 0
    while step < max_steps:
        idx = torch.randint(0, len(a), (64,), generator=g)
        loss = F.cross_entropy(model(x[idx, :-1]).flatten(0, 1), targets[idx].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 25 == 0:
            acc = accuracy(model, *data["sft_val"])
            if acc >= target:
                break
    return copy.deepcopy(model.state_dict()), step, acc


class ArithRL:
    """The RL problem's state: policy, frozen reference, data, running rollout statistics; ``objective`` (an arm's
    spec ``{"preset": name, "overrides": {...}, "dynamic_sampling": bool}``) is set by the harness before training."""

    def __init__(self, seed: int, o: dict):
        self.seed, self.o = seed, o
        self.data = split(o["sft_problems"], o["pool"], o["held_out"])
        state, self.sft_steps, self.sft_acc = warm_start(seed, o["sft_problems"], o["sft_target"], o["sft_max_steps"])
        self.model = GPT(policy_config())
        self.model.load_state_dict(state)
        self.ref = GPT(policy_config()).requires_grad_(False)
        self.ref.load_state_dict(state)
        self.ref.eval()
        self.objective_spec = None
        self._objective = None
        self.rollouts = self.zero_var_rollouts = 0
        self.reward_sum = 0.0

    def set_objective(self, spec: dict) -> None:
        self.objective_spec = spec
        self._objective = preset(spec["preset"], **spec.get("overrides", {}))

    def rollout(self, step: int) -> dict[str, torch.Tensor]:
        o = self.o
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        a, b = self.data["pool"]
        pick = torch.randint(0, len(a), (o["prompts"],), generator=g).repeat_interleave(o["group"])
        prompts, answers = prompt_tokens(a[pick], b[pick]), answer_tokens(a[pick], b[pick])
        completions = generate(self.model, prompts, g, o["temperature"])
        mask, truncated = completion_mask(completions)
        group_ids = torch.arange(o["prompts"]).repeat_interleave(o["group"])
        return {"prompts": prompts, "completions": completions, "mask": mask, "truncated": truncated,
                "rewards": rewards_of(completions, answers), "group_ids": group_ids}

    def train_loss(self, step: int) -> torch.Tensor:
        if self._objective is None:
            raise ValueError("rl-arith needs an objective arm (an arm with an objective preset)")
        r = self.rollout(step)
        keep = dynamic_sampling_keep(r["rewards"], r["group_ids"])
        n = r["rewards"].numel()
        self.rollouts += n
        self.zero_var_rollouts += int(n - keep.sum())
        self.reward_sum += float(r["rewards"].sum())
        if self.objective_spec.get("dynamic_sampling"):
            r = {k: v[keep] for k, v in r.items()}
        logp, entropy = token_logp_entropy(self.model, r["prompts"], r["completions"])
        if not r["mask"].any():                                 # every group filtered out: no signal this step
            return logp.sum() * 0.0
        mask = r["mask"].float()
        extra = {}
        if self._objective.name == "ace" or self._objective.stage_args["kl_beta"]:   # the reference forward
            with torch.no_grad():
                extra["ref_logp"] = token_logp_entropy(self.ref, r["prompts"], r["completions"])[0]
        loss, _ = self._objective(r["rewards"], r["group_ids"], logp, logp.detach(), mask,
                                  normalizer=global_normalizer(self._objective, mask, r["group_ids"]),
                                  entropy=entropy.detach(), token_ids=r["completions"], seq_lengths=mask.sum(1),
                                  truncated=r["truncated"], **extra)
        return loss

    def evaluate(self) -> dict[str, float]:
        acc = accuracy(self.model, *self.data["held_out"])
        out = {"val": 1.0 - acc, "accuracy": acc}
        if self.rollouts:
            out.update(zero_var_frac=self.zero_var_rollouts / self.rollouts,
                       train_reward=self.reward_sum / self.rollouts)
        return out
