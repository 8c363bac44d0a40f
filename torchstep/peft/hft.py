r"""HFT — Half Fine-Tuning: each round, freeze a seeded, category-balanced half of the model's tensors.

The rule (selection **reconstructed** from the card, ``shared/reference/peft.md`` §5).  Units are the leaf modules
that own parameters (a module's weight and bias move together).  A *block* is a direct child of an
``nn.ModuleList`` (a transformer layer); units are put in categories:

* per block: ``attention`` (any unit under an ``attn``/``attention``/``self_attn`` submodule, else a leaf named
  q/k/v/o, ``*_proj``, fused ``qkv``, ``proj``, ``out_proj``, ``c_attn``…), ``mlp`` (under ``mlp``/``ffn``/
  ``feed_forward``/``intermediate``, else gate/up/down, ``fc``/``fc_proj``, ``fc1``/``fc2``, ``w1``–``w3``, ``c_fc``…), ``norm`` (LayerNorm,
  RMSNorm, GroupNorm, BatchNorm, any class whose name contains "Norm"), ``other`` (anything else in the block);
* outside blocks: ``embedding_head`` with two members — all ``nn.Embedding`` modules together, and the output head
  (names matching :data:`torchstep.partition.DEFAULT_HEAD_PATTERN`) — and ``other`` (e.g. a final norm).

For a category with n members per block over L blocks and frozen fraction p, T = (1−p)·n·L members are trainable:
every block gets ⌊(1−p)·n⌋, the remaining ⌊T⌋ − L·⌊(1−p)·n⌋ extras go to blocks drawn at random (balanced across
layers: Llama's 3 MLP matrices at p = ½ give 1 or 2 per block and exactly half overall), a fractional remainder is
one more member with probability frac(T); which members of a block are trainable is a uniform draw.  With p = ½:
Llama attention 2 of {q, k, v, o}, norms 1 of 2, embedding *or* head.  **torchstep's bench GPT**
(``torchstep/bench/gpt.py``: fused ``qkv``, ``proj``, ``fc``, ``fc_proj``, ``ln1``, ``ln2``) has attention
{qkv, proj} → 1 of 2 (a fused qkv is one tensor: ``requires_grad`` cannot split it, so "2 of 4" becomes "1 of 2",
the same fraction), mlp {fc, fc_proj} → 1 of 2, norm {ln1, ln2} → 1 of 2, embedding_head {embed + pos, head} → 1 of 2,
other {ln_f} → trainable with probability ½.

The draw uses a CPU ``torch.Generator`` seeded from (seed, round) only: same seed and round ⇒ same mask on every
process (no broadcast needed for DDP/FSDP — every rank must freeze the same tensors), a new round ⇒ a new draw.

Paper: Hui, Zhang, Wang, Xu, Sun, Wu, "HFT: Half Fine-Tuning for Large Language Models", arXiv 2404.18466 (ACL 2025;
no official code found).  Confirmed [abstract]: half of the parameters learn the new task, the other half are
frozen; no architecture change; SFT, DPO and continual learning.  [review, Fig. 2 caption] "In each stage, we
selectively freeze half of the parameters at the category-level and update the other half"; [reviews read 2026-12:
papernotes.org (ACL 2025 notes), themoonlight.io] the half is re-drawn at random every fine-tuning round / epoch;
p = 0.5.  **Unverified (the §3 text could not be retrieved)**: the per-category split (how 3 MLP matrices are
halved), whether embedding and head form one category, what a "round" is (stage vs epoch), and what happens to
the optimizer state of a tensor frozen in a round — hence the explicit ``state`` policy:

* ``"keep"`` (default): frozen tensors keep their optimizer state (memory held); their moments resume when they are
  trainable again.
* ``"drop"``: the state of tensors frozen in the round is deleted at the round change (memory freed: state exists
  only for trainable tensors; a tensor unfrozen later restarts from a fresh state, step 0).
* ``"reset"``: every tensor's state is deleted at each round change (a fresh optimizer per round/stage).

At the first ``apply`` (no previous round) ``"drop"`` and ``"reset"`` both delete the state of the tensors frozen
in that round and keep the rest; re-applying the current round leaves the optimizer alone.

Frozen tensors get ``requires_grad=False`` and ``.grad = None`` (so no optimizer applies a stale gradient or a
decoupled weight decay to them — torch's optimizers skip tensors without a gradient): frozen weights are bitwise
unchanged, weight-gradient compute and (with ``"drop"``/``"reset"``) optimizer memory of the frozen half are saved.
DDP needs ``find_unused_parameters=True`` (or re-wrapping) when the set of trainable tensors changes.
Memory: the mask (one bool per tensor); no tensors.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import torch
from torch import nn

from ..partition import DEFAULT_HEAD_PATTERN

ATTENTION = r"(q|k|v|o|q_proj|k_proj|v_proj|o_proj|query|key|value|qkv|qkv_proj|proj|out_proj|c_attn|wq|wk|wv|wo)"
MLP = r"(gate|up|down|gate_proj|up_proj|down_proj|fc|fc_proj|fc1|fc2|w1|w2|w3|c_fc|mlp_proj|gate_up_proj)"
ATTENTION_PATH = r"(attn|attention|self_attn|self_attention|cross_attn)"      # a path component inside the block
MLP_PATH = r"(mlp|ffn|feed_forward|feedforward|ff|intermediate)"
STATE_POLICIES = ("keep", "drop", "reset")


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) \
        or "norm" in type(m).__name__.lower()


def default_category(name: str, module: nn.Module, in_block: bool) -> str:
    """The category of a parameter-owning leaf module (see the module docstring)."""
    leaf = name.rsplit(".", 1)[-1]
    if _is_norm(module):
        return "norm" if in_block else "other"
    if not in_block:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            return "embedding_head:embeddings"
        if re.search(DEFAULT_HEAD_PATTERN, name):
            return "embedding_head:head"
        return "other"
    parts = name.split(".")[:-1]
    if any(re.fullmatch(ATTENTION_PATH, c) for c in parts):
        return "attention"
    if any(re.fullmatch(MLP_PATH, c) for c in parts):
        return "mlp"
    if re.fullmatch(ATTENTION, leaf):
        return "attention"
    if re.fullmatch(MLP, leaf):
        return "mlp"
    return "other"


class HalfFineTuning:
    r"""Seeded, category-level half freezing, redrawn per round, with an explicit optimizer-state policy.

    Usage::

        hft = HalfFineTuning(model, p=0.5, seed=0, state="drop")
        for rnd in range(n_rounds):
            hft.apply(rnd, optimizer)          # requires_grad + optimizer state for this round
            train_one_round(model, optimizer)  # any torch / torchstep optimizer over all model parameters

    Args:
        model: the full model (full fine-tuning regime).
        p: frozen fraction in [0, 1] (default 0.5; 0 ⇒ full fine-tuning, 1 ⇒ nothing trains).
        seed: the draw's seed (shared by all ranks).
        state: ``"keep"`` (default), ``"drop"`` or ``"reset"`` — see the module docstring.
        category: optional ``(name, module, in_block) -> str`` replacing :func:`default_category`; categories named
            ``"X:member"`` are grouped into category X with that member (how embeddings and head form one category).
    """

    def __init__(self, model: nn.Module, p: float = 0.5, seed: int = 0, state: str = "keep",
                 category: Callable[[str, nn.Module, bool], str] | None = None) -> None:
        if not (isinstance(p, (int, float)) and 0 <= p <= 1):
            raise ValueError(f"Invalid p: {p!r} (valid range: [0, 1])")
        if state not in STATE_POLICIES:
            raise ValueError(f"Invalid state: {state!r} (valid range: one of {STATE_POLICIES})")
        if not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (valid range: int)")
        self.model, self.p, self.seed, self.state_policy = model, float(p), seed, state
        self.category = category or default_category
        self.round: int | None = None
        self._params = dict(model.named_parameters())       # tied tensors once, under their first name
        # groups[(block, category)] = {member: [param names]}
        self.groups: dict[tuple[str, str], dict[str, list[str]]] = {}
        blocks = {f"{n}.{i}" if n else str(i) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
                  for i in range(len(m))}
        seen: set[int] = set()
        for mname, m in model.named_modules():
            own = [(k, q) for k, q in m.named_parameters(recurse=False) if id(q) not in seen]
            if not own:
                continue
            block = next((b for b in sorted(blocks, key=len)        # the outermost ModuleList child
                          if mname == b or mname.startswith(b + ".")), "")
            cat = self.category(mname, m, bool(block))
            cat, _, member = cat.partition(":")
            member = member or mname
            for k, q in own:
                seen.add(id(q))
                self.groups.setdefault((block, cat), {}).setdefault(member, []).append(f"{mname}.{k}" if mname else k)
        if not self.groups:
            raise ValueError("Invalid model: it has no parameters to select from")
        self._names = {id(q): n for n, q in self._params.items()}

    # ------------------------------------------------------------------------------------------------ the draw
    def _generator(self, round: int) -> torch.Generator:
        g = torch.Generator(device="cpu")
        g.manual_seed((self.seed * 1_000_003 + round * 7_919 + 12_345) % (2 ** 63))
        return g

    def mask(self, round: int) -> dict[str, bool]:
        """Parameter name → trainable in ``round`` (pure: nothing is changed)."""
        if not (isinstance(round, int) and round >= 0):
            raise ValueError(f"Invalid round: {round!r} (valid range: int >= 0)")
        gen = self._generator(round)
        keep = 1.0 - self.p
        by_cat: dict[str, list[tuple[str, dict[str, list[str]]]]] = {}
        for (block, cat), members in sorted(self.groups.items()):
            by_cat.setdefault(cat if block else f"<top>:{cat}", []).append((block, members))
        out: dict[str, bool] = {}
        for key in sorted(by_cat):
            entries = by_cat[key]
            sizes = [len(m) for _, m in entries]
            counts = [math.floor(keep * n + 1e-12) for n in sizes]
            total = keep * sum(sizes)
            extra = math.floor(total + 1e-12) - sum(counts)
            frac = total - math.floor(total + 1e-12)
            if frac > 1e-12 and float(torch.rand((), generator=gen)) < frac:
                extra += 1
            room = [i for i, (c, n) in enumerate(zip(counts, sizes)) if c < n]
            if extra > 0 and room:
                pick = torch.randperm(len(room), generator=gen)[:extra].tolist()
                for j in pick:
                    counts[room[j]] += 1
            for (block, members), k in zip(entries, counts):
                names = sorted(members)
                chosen = set(torch.randperm(len(names), generator=gen)[:k].tolist())
                for i, mem in enumerate(names):
                    for pname in members[mem]:
                        out[pname] = i in chosen
        return out

    # ------------------------------------------------------------------------------------------------ applying
    def apply(self, round: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """Set ``requires_grad`` for ``round``, clear the grads of frozen tensors, and apply the state policy to
        ``optimizer`` (if given).  Returns a report: ``trainable``/``frozen`` name lists and ``trainable_fraction``
        (by element count)."""
        m = self.mask(round)
        changed = self.round is not None and self.round != round
        for name, q in self._params.items():
            q.requires_grad_(m[name])
            if not m[name]:
                q.grad = None
        if optimizer is not None and (changed or self.round is None):
            if self.state_policy == "reset" and changed:
                optimizer.state.clear()
            elif self.state_policy in ("drop", "reset"):
                for q in list(optimizer.state):
                    if isinstance(q, torch.Tensor) and id(q) in self._names and not m[self._names[id(q)]]:
                        del optimizer.state[q]
        self.round = round
        n_all = sum(q.numel() for q in self._params.values())
        n_tr = sum(q.numel() for n, q in self._params.items() if m[n])
        return {"round": round, "trainable": [n for n in m if m[n]], "frozen": [n for n in m if not m[n]],
                "trainable_fraction": n_tr / n_all if n_all else 0.0}

    def state_dict(self) -> dict[str, Any]:
        """Plain Python values only (loads with ``torch.load(..., weights_only=True)``)."""
        return {"p": self.p, "seed": self.seed, "state": self.state_policy, "round": self.round}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore the settings and re-apply the saved round's ``requires_grad`` (the optimizer is not touched)."""
        self.p, self.seed, self.state_policy = float(sd["p"]), int(sd["seed"]), sd["state"]
        self.round = None
        if sd["round"] is not None:
            self.apply(int(sd["round"]))


__all__ = ["HalfFineTuning", "default_category"]
