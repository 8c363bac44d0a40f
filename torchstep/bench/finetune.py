"""``finetune-bytes``: adapt a pretrained byte GPT to a new text domain with each fine-tuning method as an arm.

* **Pretraining, once**: the harness' byte GPT (default d64 L2 h4, ctx 64; 135,488 parameters — small so that
  the 2-core CI machine runs the whole arm × lr × seed matrix) trained on the frozen CPython stdlib snapshot (:mod:`.corpus`) with AdamW (lr ``pretrain_lr``, 5 % warm-up + cosine,
  ``pretrain_steps`` steps, batch 32, seed 0).  Cached as ``pretrained-<hash>.pt`` in the results directory
  (the harness passes it; else ``~/.cache/torchstep``), the hash over the pretraining configuration, the corpus
  hash and the torch version; a file lock makes concurrent trials wait for one pretraining instead of repeating
  it, and the file is loaded with ``weights_only=True``.
* **Target domain**: the Python 3.11.7 language-reference topics (``pydoc_data.topics``, the text ``help()``
  shows — English prose with grammar snippets, unlike the source code of pretraining), frozen in the package
  (``data/pydoc-topics-3.11.7.json.xz``, 79 topics, 487 KB; PSF licence, ``data/PSF-LICENSE.txt``, hash checked).
  Every 5th topic in name order is held out (435,130 training bytes, 30,987 held-out).
* **Arms** (``Arm.adapter``; bench/arms.py: ``FINETUNE_ARMS``) apply their method to the pretrained model in
  :meth:`FineTune.configure`; every arm trains with torch AdamW on whatever the method leaves trainable.
* **Metrics**: ``val`` = held-out target-domain loss (nats/byte), ``original`` = loss on the stdlib validation
  batches, ``forgetting`` = ``original`` − the pretrained model's, ``trainable`` = trainable parameters.  The
  harness adds optimizer-state bytes and step time.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from ..ops.curves import warmup_cosine
from . import corpus
from .gpt import GPT, GPTConfig
from .tasks import byte_windows

TOPICS = "pydoc-topics-3.11.7.json.xz"
TOPICS_SHA256 = "4594d824487ea711258725d3dd158b2a0bfdea6bccd9f358421913684e2dfcfd"
#: the Linear layers adapters attach to (every block's attention and MLP matrices)
TARGETS = ["qkv", "proj", "fc", "fc_proj"]
#: the fine-tuning methods (arms' ``adapter["method"]``)
METHODS = ("full", "lora", "dora", "allora", "mgpo", "hut", "hft")
_cache_dir: Path | None = None


def set_cache_dir(path: str | Path | None) -> None:
    """Where pretrained weights are cached (the harness: the results directory)."""
    global _cache_dir
    _cache_dir = Path(path) if path is not None else None


@lru_cache(maxsize=1)
def domain_text() -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, held-out bytes) of the target domain; raises if the snapshot was altered."""
    raw = lzma.decompress((resources.files("torchstep.bench") / "data" / TOPICS).read_bytes())
    if hashlib.sha256(raw).hexdigest() != TOPICS_SHA256:
        raise RuntimeError("pydoc topics snapshot hash mismatch")
    topics = json.loads(raw)
    train, val = bytearray(), bytearray()
    for i, name in enumerate(sorted(topics)):
        (val if i % 5 == 4 else train).extend(topics[name].encode())
    return torch.frombuffer(train, dtype=torch.uint8), torch.frombuffer(val, dtype=torch.uint8)


def model_config(o: dict) -> GPTConfig:
    return GPTConfig(context=o["context"], width=o["width"], depth=o["depth"], heads=o["heads"])


def batches(source: torch.Tensor, context: int, batch: int, seed: int):
    """``step → (inputs, targets)``: random windows of ``source``, the same for every arm (paired seeds)."""
    def draw(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return byte_windows(source, context, batch, torch.Generator().manual_seed(seed * 1_000_003 + step))
    return draw


def _pretrain_key(o: dict) -> dict:
    return {k: o[k] for k in ("context", "width", "depth", "heads", "pretrain_steps", "pretrain_lr")} | {
        "batch": 32, "corpus": corpus.SHA256, "torch": torch.__version__.split("+")[0]}


def pretrain(o: dict) -> dict:
    """Train the base model on the stdlib corpus (seed 0) and return its state dict."""
    torch.manual_seed(0)
    model = GPT(model_config(o))
    opt = torch.optim.AdamW(model.parameters(), lr=o["pretrain_lr"], weight_decay=0.0)
    steps = o["pretrain_steps"]
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: warmup_cosine(t, steps, warm))
    draw = batches(corpus.load()[0], o["context"], 32, seed=0)
    for step in range(steps):
        loss = model.loss(*draw(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.state_dict()


def pretrained(o: dict) -> dict:
    """The cached pretrained weights for ``o`` (pretraining them under a file lock if absent)."""
    key = _pretrain_key(o)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = _cache_dir or Path.home() / ".cache" / "torchstep"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"pretrained-{digest}.pt"
    with open(root / f"pretrained-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)                # a second trial waits here, then loads
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            torch.save({"config": key, "state": pretrain(o)}, tmp)
            os.replace(tmp, path)                       # atomic: never a half-written file
        return torch.load(path, weights_only=True)["state"]


def _mean_loss(model: GPT, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        return sum(model.loss(x, y, train=False).item() for x, y in data) / len(data)


def _lora(model: GPT, seed: int, spec: dict, use_dora: bool = False):
    from peft import LoraConfig, get_peft_model    # the `peft` extra; imported only by the LoRA-family arms
    torch.manual_seed(seed)
    r = spec.get("rank", 8)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=spec.get("alpha", 2 * r), lora_dropout=0.0,
                                            target_modules=TARGETS, use_dora=use_dora))


class FineTune:
    """The fine-tuning problem: pretrained model, both domains' batches, and the arm's method once configured."""

    def __init__(self, seed: int, o: dict):
        self.seed, self.o = seed, o
        self.model = GPT(model_config(o))
        self.model.load_state_dict(pretrained(o))
        T = o["context"]
        self.train_batch = batches(domain_text()[0], T, o["batch"], seed)
        held_out = batches(domain_text()[1], T, o["batch"], seed=10_000)
        original = batches(corpus.load()[1], T, o["batch"], seed=10_000)
        self.held_out = [held_out(i) for i in range(o["val_batches"])]
        self.original = [original(i) for i in range(o["val_batches"])]
        self.original_before = _mean_loss(self.model, self.original)
        self.method = self.spec = None
        self.mgpo = self.hft = None
        self._perturbation = contextlib.ExitStack()

    def configure(self, spec: dict) -> None:
        """Apply the arm's method to the pretrained model (``spec["method"]``, see :data:`METHODS`)."""
        method = spec["method"]
        if method not in METHODS:
            raise ValueError(f"unknown fine-tuning method {method!r}; valid: {', '.join(METHODS)}")
        if method in ("lora", "mgpo"):
            _lora(self.model, self.seed, spec)
        elif method == "allora":              # ALLoRA is scaling-free and dropout-free: α = r
            _lora(self.model, self.seed, {**spec, "alpha": spec.get("rank", 8)})
        elif method == "dora":
            from ..peft.dora import patch_peft_dora
            _lora(self.model, self.seed, spec, use_dora=True)
            patch_peft_dora(self.model)       # torchstep's factored norm instead of peft's dense one
        elif method == "hut":
            from ..peft.hut import apply_hut
            torch.manual_seed(self.seed)
            apply_hut(self.model, TARGETS, r=spec.get("rank", 8))
        elif method == "hft":
            from ..peft.hft import HalfFineTuning
            self.hft = HalfFineTuning(self.model, p=0.5, seed=self.seed, state=spec.get("state", "keep"))
        self.method, self.spec = method, spec

    def with_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The methods that act on the optimizer: ALLoRA wraps it, MGPO reads its first moment, HFT its state."""
        if self.method == "allora":
            from ..peft.allora import ALLoRA
            return ALLoRA(optimizer, self.model, eta=self.spec.get("eta", 1.0))
        if self.method == "mgpo":
            from ..peft.mgpo import MGPO
            self.mgpo = MGPO(self.model, optimizer, profile="nlu")
        if self.method == "hft":
            self.optimizer = optimizer
        return optimizer

    def train_loss(self, step: int) -> torch.Tensor:
        if self.method is None:
            raise ValueError("finetune-bytes needs an adapter arm (an arm with an adapter spec)")
        if self.hft is not None and step % self.spec.get("round_steps", 75) == 0:   # a new round: a new half
            self.hft.apply(step // self.spec.get("round_steps", 75), self.optimizer)
        if self.mgpo is not None:             # forward and backward at W + ε (closed in :meth:`backward`)
            self._perturbation.enter_context(self.mgpo.perturbed())
        return self.model.loss(*self.train_batch(step))

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        self._perturbation.close()           # MGPO: restore W, update its gradient-norm EMA

    def evaluate(self) -> dict[str, float]:
        original = _mean_loss(self.model, self.original)
        return {"val": _mean_loss(self.model, self.held_out), "original": original,
                "forgetting": original - self.original_before,
                "trainable": float(sum(p.numel() for p in self.model.parameters() if p.requires_grad))}
