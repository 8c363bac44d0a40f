"""A small byte-level GPT with the normalisation placements our papers study.

``norm`` selects where LayerNorm sits in each block:

* ``pre``  (Pre-LN):  x + f(LN(x))
* ``post`` (Post-LN): LN(x + f(x))
* ``peri`` (Peri-LN): x + LN(f(LN(x)))  — normalises both the input and the output of each sub-layer
* ``mix``  (Mix-LN):  Post-LN in the first ``mix_post_fraction`` of the blocks, Pre-LN after

``qk_norm`` applies LayerNorm to queries and keys per head; ``z_loss`` adds ``z·logsumexp(logits)²``
to the training loss.  Learned positions, GELU MLP (4×), no biases, untied head.  ``mup_base_width`` > 0 makes
it μP relative to that width (MuReadout head, hidden init std × m^-½, attention 1/d_head); the μP learning
rates come from :func:`torchstep.scaling.mup_param_groups` (the harness: ``Problem.mup_width_mult``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..scaling.mup import MuReadout, attention_scale, make_mup

NORMS = ("pre", "post", "peri", "mix")


@dataclass(frozen=True)
class GPTConfig:
    vocab: int = 256
    context: int = 64
    width: int = 64
    depth: int = 2
    heads: int = 4
    norm: str = "pre"
    qk_norm: bool = False
    z_loss: float = 0.0
    mix_post_fraction: float = 0.25
    mup_base_width: int = 0      # > 0: μP relative to this width (torchstep.scaling.mup), 0: standard parametrisation

    @property
    def width_mult(self) -> float:
        return self.width / self.mup_base_width if self.mup_base_width else 1.0


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, placement: str):
        super().__init__()
        self.placement, self.heads = placement, cfg.heads
        d = cfg.width
        self.ln1, self.ln2 = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        if placement == "peri":
            self.ln1_out, self.ln2_out = nn.LayerNorm(d, bias=False), nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.fc_proj = nn.Linear(4 * d, d, bias=False)
        head_dim = d // cfg.heads
        # μP: logits ∝ 1/d_head (√d₀/d_head, the usual 1/√d_head at the base width); SP: SDPA's default
        self.attn_scale = attention_scale(head_dim, cfg.mup_base_width // cfg.heads) if cfg.mup_base_width else None
        self.q_norm = nn.LayerNorm(head_dim, bias=False) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, bias=False) if cfg.qk_norm else nn.Identity()

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, is_causal=True,
                                           scale=self.attn_scale)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_proj(F.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "post":
            x = self.ln1(x + self.attention(x))
            return self.ln2(x + self.mlp(x))
        if self.placement == "peri":
            x = x + self.ln1_out(self.attention(self.ln1(x)))
            return x + self.ln2_out(self.mlp(self.ln2(x)))
        x = x + self.attention(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.norm not in NORMS:
            raise ValueError(f"Invalid norm: {cfg.norm!r} (valid range: one of {NORMS})")
        if cfg.width % cfg.heads:
            raise ValueError(f"Invalid heads: {cfg.heads} must divide width {cfg.width}")
        if cfg.mup_base_width < 0 or cfg.mup_base_width % cfg.heads:
            raise ValueError(f"Invalid mup_base_width: {cfg.mup_base_width} (valid range: 0, or a multiple of heads "
                             f"{cfg.heads})")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.pos = nn.Embedding(cfg.context, cfg.width)
        n_post = round(cfg.depth * cfg.mix_post_fraction) if cfg.norm == "mix" else 0
        placements = ["post"] * n_post + ["pre" if cfg.norm == "mix" else cfg.norm] * (cfg.depth - n_post)
        self.blocks = nn.ModuleList(Block(cfg, p) for p in placements)
        self.ln_f = nn.LayerNorm(cfg.width, bias=False) if cfg.norm != "post" else nn.Identity()
        # μP: a MuReadout head (logits × 1/m, constant-std init) and hidden std × m^-½ (init variance ∝ 1/fan-in)
        self.head = MuReadout(cfg.width, cfg.vocab, bias=False) if cfg.mup_base_width else \
            nn.Linear(cfg.width, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.depth) if name.endswith(("proj.weight", "fc_proj.weight")) else 0.02
                hidden = name.startswith("blocks.")
                nn.init.normal_(p, std=std / math.sqrt(cfg.width_mult) if hidden else std)
        if cfg.mup_base_width:
            with torch.device("meta"):                    # shapes only: no memory, no RNG draws
                base = GPT(replace(cfg, width=cfg.mup_base_width, mup_base_width=0))
            make_mup(self, base, rescale_params=False)   # shapes + the readout's width_mult; init done above

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, train: bool = True) -> torch.Tensor:
        logits = self(idx)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        if train and self.cfg.z_loss > 0:
            loss = loss + self.cfg.z_loss * logits.logsumexp(-1).square().mean()
        return loss
