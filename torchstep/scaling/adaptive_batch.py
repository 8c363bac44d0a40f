"""Adaptive batch sizes (AdAdaGrad, arXiv 2402.11215; algorithms.md §16, schedules_scaling.md §9).

The batch grows when the per-sample gradients of the current batch say its mean is too noisy.  With ``g_i``
the per-sample gradients of a batch of ``b ≥ 2`` samples, ``ḡ = mean_i g_i`` and unbiased (``b − 1``)
variances over the samples:

* norm test:           ``b_new = ‖Var_i(g_i)‖₁ / (η_n² ‖ḡ‖²)``  (per-coordinate variances, summed);
* inner-product test:  ``b_new = Var_i(⟨g_i, ḡ⟩) / (θ² ‖ḡ‖⁴)``;
* orthogonality test:  ``b_new = Σ_j Var_i(g_i − ⟨g_i, ḡ⟩/‖ḡ‖² · ḡ)_j / (ν² ‖ḡ‖²)``;
* augmented test:      ``max(inner-product, orthogonality)``;

and the next batch size is ``b_{k+1} = min(⌈max(b_k, b_new)⌉, max_batch_size)`` — it never decreases.
A zero mean gradient proposes ``inf`` (clipped to ``max_batch_size``) unless the variance is 0 too.

Pieces: :func:`per_sample_gradients` (``torch.func``: ``functional_call`` + ``vmap(grad)``, any model and
loss), the pure statistics over a ``(b, P)`` matrix (:func:`gradient_statistics`, :func:`norm_test`,
:func:`inner_product_test`, :func:`orthogonality_test`, :func:`augmented_test`), the controller
:class:`AdaptiveBatch` and :class:`AdaptiveBatchSampler`, a batch sampler that reads the controller's batch
size for every batch it draws.  The learning rate is not touched: if a batch-size ↔ lr rule (§8) is
wanted, apply it explicitly (and log it) from :attr:`AdaptiveBatch.batch_size`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

TESTS = ("norm", "inner_product", "orthogonality", "augmented")
COMPATS = ("paper", "official")
_CHUNK_ELEMENTS = 1 << 24          # the orthogonality test's transient (b × columns) block, in elements


def _invalid(name: str, value: Any, valid: str) -> ValueError:
    return ValueError(f"Invalid {name}: {value!r} (valid range: {valid})")


def _check_positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise _invalid(name, value, "a finite number > 0")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise _invalid(name, value, f"an int >= {lo}")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise _invalid(name, value, f"one of {choices}")


# ----------------------------------------------------------------------------- per-sample gradients
def _batch_of_one(x: Any) -> Any:
    """A sample's tensors (or tuple / list / dict of them) as a batch of one."""
    if isinstance(x, Tensor):
        return x.unsqueeze(0)
    if isinstance(x, Mapping):
        return {k: _batch_of_one(v) for k, v in x.items()}
    return type(x)(_batch_of_one(v) for v in x)


def per_sample_gradients(model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any, *,
                         chunk_size: int | None = None, randomness: str = "different") -> dict[str, Tensor]:
    """Per-sample gradients ``{name: (b, *param.shape)}`` of every parameter that requires grad.

    Sample ``i``'s loss is ``loss_fn(model(x_i[None]), y_i[None])`` (a batch of one, so any mean-reduced loss
    works), evaluated with ``torch.func.functional_call`` at the current parameters and buffers and
    differentiated with ``vmap(grad(...))``.

    Args:
        model: any module; run it in the mode the test should see (batch norm in train mode cannot be
            vmapped sample by sample: use eval mode or per-sample normalisation).
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        inputs: a tensor, or a tuple of tensors, batched along dim 0 (passed to the model positionally).
        targets: a tensor (or a tuple / list / dict of tensors) batched along dim 0.
        chunk_size: samples per vectorised chunk (``vmap``'s ``chunk_size``; default: all at once).
        randomness: ``vmap``'s randomness for dropout-like layers (default ``"different"``: each sample its
            own draw, as in a real batch).
    Nothing is written to ``.grad``; the parameters are read detached.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def loss_of_one(params, buffers, sample, target):
        batch = tuple(x.unsqueeze(0) for x in sample)
        return loss_fn(torch.func.functional_call(model, (params, buffers), batch), _batch_of_one(target))

    per_sample = torch.func.vmap(torch.func.grad(loss_of_one), in_dims=(None, None, 0, 0), chunk_size=chunk_size,
                                 randomness=randomness)
    return per_sample(params, buffers, args, targets)


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class GradientStatistics:
    """The sums every test is a ratio of (0-dim tensors; unbiased variances over the ``samples`` rows).

    Attributes:
        samples: rows of the per-sample matrix (b).
        variance_l1: ``‖Var_i(g_i)‖₁``.
        grad_sq_norm: ``‖ḡ‖²``.
        inner_product_variance: ``Var_i(⟨g_i, ḡ⟩)``.
        orthogonal_variance: ``Σ_j Var_i(g_i − ⟨g_i, ḡ⟩/‖ḡ‖² · ḡ)_j``.
    """

    samples: int
    variance_l1: Tensor
    grad_sq_norm: Tensor
    inner_product_variance: Tensor
    orthogonal_variance: Tensor

    def __add__(self, other: GradientStatistics) -> GradientStatistics:
        """Sum block statistics (the official code's per-tensor tests)."""
        return GradientStatistics(self.samples, *(getattr(self, f.name) + getattr(other, f.name)
                                                  for f in fields(self)[1:]))

    def as_floats(self) -> dict[str, float]:
        """The sums as Python floats (one host sync)."""
        names = [f.name for f in fields(self)[1:]]
        values = torch.stack([getattr(self, n).double() for n in names]).tolist()
        return dict(zip(names, values))


def _items(per_sample: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
    if isinstance(per_sample, Tensor):
        return [per_sample]
    return list(per_sample.values()) if isinstance(per_sample, Mapping) else list(per_sample)


def _rows(per_sample: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> int:
    items = _items(per_sample)
    return items[0].shape[0] if items and items[0].dim() else 0


def _blocks(per_sample: Tensor | Sequence[Tensor] | Mapping[str, Tensor]) -> list[Tensor]:
    """``(b, P_l)`` matrices (low-precision rows in float32) from a matrix, a sequence or a name → tensor dict."""
    items = _items(per_sample)
    if not items:
        raise ValueError("Invalid per_sample: no gradients (valid range: a (b, P) matrix or per-tensor (b, ...) ones)")
    rows = _rows(items)
    if rows < 2 or any(g.dim() == 0 or g.shape[0] != rows for g in items):
        raise ValueError(f"Invalid per_sample: shapes {[tuple(g.shape) for g in items]} (valid range: every block "
                         f"(b, ...) with the same b >= 2 samples; unbiased variances need two)")
    return [(g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).reshape(rows, -1) for g in items]


def _statistics(blocks: list[Tensor]) -> GradientStatistics:
    """Whole-vector statistics of the concatenation of ``blocks`` (never materialised)."""
    means = [g.mean(dim=0) for g in blocks]
    grad_sq = sum(torch.dot(m, m) for m in means)
    variance_l1 = sum(g.var(dim=0, correction=1).sum() for g in blocks)
    inner = sum(g @ m for g, m in zip(blocks, means))                   # ⟨g_i, ḡ⟩, (b,)
    coefficient = torch.where(grad_sq > 0, inner / grad_sq, torch.zeros_like(inner))
    orthogonal = inner.new_zeros(())
    for g, m in zip(blocks, means):     # column chunks bound the transient g − c ḡᵀ (the variances are per column)
        step = max(1, _CHUNK_ELEMENTS // g.shape[0])
        for j in range(0, g.shape[1], step):
            block = g[:, j:j + step] - torch.outer(coefficient, m[j:j + step])
            orthogonal = orthogonal + block.var(dim=0, correction=1).sum()
    return GradientStatistics(blocks[0].shape[0], variance_l1, grad_sq, inner.var(correction=1), orthogonal)


def gradient_statistics(per_sample: Tensor | Sequence[Tensor] | Mapping[str, Tensor], *,
                        blockwise: bool = False) -> GradientStatistics:
    """The test statistics of a ``(b, P)`` per-sample gradient matrix (or per-tensor ``(b, ...)`` blocks).

    Args:
        per_sample: a ``(b, P)`` matrix, a sequence of ``(b, ...)`` blocks or the dict of
            :func:`per_sample_gradients`; ``b >= 2``.  fp16/bf16 are computed in float32, other dtypes in their own.
        blockwise: False (default): the blocks are one vector ``g_i`` (the paper's tests).  True: each
            block's inner-product and orthogonality statistics against its own mean, summed over blocks (the
            official code's per-tensor loop); the norm test's sums are the same either way.
    """
    blocks = _blocks(per_sample)
    if not blockwise:
        return _statistics(blocks)
    parts = [_statistics([g]) for g in blocks]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def _ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator``; for a zero denominator ``inf`` (or 0 when the numerator is 0 too)."""
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    fallback = torch.where(numerator > 0, torch.full_like(numerator, math.inf), torch.zeros_like(numerator))
    return torch.where(denominator > 0, numerator / safe, fallback)


def proposed_batch_size(stats: GradientStatistics, test: str = "norm", eta: float = 0.1, theta: float = 0.1,
                        nu: float = 0.1) -> Tensor:
    """``b_new`` of ``test`` (one of :data:`TESTS`) from the statistics: a 0-dim tensor, not yet rounded,
    not yet compared with the current batch size."""
    _check_choice("test", test, TESTS)
    if test == "norm":
        return _ratio(stats.variance_l1, eta ** 2 * stats.grad_sq_norm)
    inner = _ratio(stats.inner_product_variance, theta ** 2 * stats.grad_sq_norm.square())
    if test == "inner_product":
        return inner
    orthogonal = _ratio(stats.orthogonal_variance, nu ** 2 * stats.grad_sq_norm)
    return orthogonal if test == "orthogonality" else torch.maximum(inner, orthogonal)


def norm_test(per_sample: Tensor, eta: float = 0.1) -> Tensor:
    """``‖Var_i(g_i)‖₁ / (η² ‖ḡ‖²)`` of a ``(b, P)`` per-sample gradient matrix."""
    return proposed_batch_size(gradient_statistics(per_sample), "norm", eta=eta)


def inner_product_test(per_sample: Tensor, theta: float = 0.1) -> Tensor:
    """``Var_i(⟨g_i, ḡ⟩) / (θ² ‖ḡ‖⁴)`` of a ``(b, P)`` per-sample gradient matrix."""
    return proposed_batch_size(gradient_statistics(per_sample), "inner_product", theta=theta)


def orthogonality_test(per_sample: Tensor, nu: float = 0.1) -> Tensor:
    """``Σ_j Var_i(g_i − ⟨g_i, ḡ⟩/‖ḡ‖² ḡ)_j / (ν² ‖ḡ‖²)`` of a ``(b, P)`` per-sample gradient matrix."""
    return proposed_batch_size(gradient_statistics(per_sample), "orthogonality", nu=nu)


def augmented_test(per_sample: Tensor, theta: float = 0.1, nu: float = 0.1) -> Tensor:
    """``max(inner-product test, orthogonality test)`` of a ``(b, P)`` per-sample gradient matrix."""
    return proposed_batch_size(gradient_statistics(per_sample), "augmented", theta=theta, nu=nu)


def next_batch_size(batch_size: int, proposed: float, max_batch_size: int) -> int:
    """``min(⌈max(b_k, b_new)⌉, max_batch_size)``; a NaN proposal keeps ``b_k``."""
    if math.isnan(proposed) or proposed <= batch_size:
        return min(batch_size, max_batch_size)
    return max_batch_size if proposed >= max_batch_size else min(math.ceil(proposed), max_batch_size)


# ----------------------------------------------------------------------------- the controller
class AdaptiveBatch:
    """The AdAdaGrad batch-size controller: run a test on the current batch's per-sample gradients, grow.

    Args:
        batch_size: b₀, the first batch size (an int ≥ 2: the variances are unbiased).
        max_batch_size: the cap (an int ≥ ``batch_size``; e.g. the dataset size or what fits in memory).
        test: ``"norm"`` (default), ``"inner_product"``, ``"orthogonality"`` or ``"augmented"``.
        eta: η_n of the norm test (default 0.1, the card's and the official default).
        theta: θ of the inner-product test (default 0.1).
        nu: ν of the orthogonality test (default 0.1).
        interval: run the test every ``interval``-th :meth:`update` (default 1: every step, as the official
            ``test_interval``); calls in between keep the batch size.
        compat: ``"paper"`` (default) — the tests over the whole gradient vector; ``"official"`` — the
            inner-product and orthogonality statistics per tensor and summed (timlautk/AdAdaGrad ``tests.py``;
            the norm test is the same in both).

    Loop (one test per step, on the batch the optimizer steps on; official ``main.py`` order)::

        controller = AdaptiveBatch(batch_size=2, max_batch_size=len(dataset))
        sampler = AdaptiveBatchSampler(len(dataset), controller, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler)          # num_workers=0: no prefetch lag
        for epoch in range(epochs):
            for x, y in loader:
                controller.step(model, loss_fn, x, y)    # when due: per-sample grads at these parameters, test
                opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()

    ``b_k`` in the update is the controller's batch size, not the rows handed in (an epoch's shorter last
    batch cannot lower it).  The test costs ``b × #params`` transient memory for the per-sample gradients
    (slice the batch to test on fewer samples: the statistics are per-sample variances) and two host syncs
    per test (the statistics and the proposed size are read as Python numbers); the statistics are computed in the gradients' dtype (fp16/bf16 in
    float32).  Once the batch size reaches ``max_batch_size`` no test runs (as the official loop).
    Not implemented: the distributed variants (law of total variance across workers) — under DDP run it on
    one rank's batch and broadcast the size; the paper's coordinate-wise test for AdaGrad.
    """

    def __init__(self, batch_size: int, max_batch_size: int, test: str = "norm", eta: float = 0.1,
                 theta: float = 0.1, nu: float = 0.1, interval: int = 1, compat: str = "paper") -> None:
        self._configure(dict(batch_size=batch_size, max_batch_size=max_batch_size, test=test, eta=eta, theta=theta,
                             nu=nu, interval=interval, compat=compat, calls=0))
        self.last: dict[str, float] = {}

    def _configure(self, config: Mapping[str, Any]) -> None:
        _check_int("batch_size", config["batch_size"], 2)
        _check_int("max_batch_size", config["max_batch_size"], config["batch_size"])
        _check_choice("test", config["test"], TESTS)
        for name in ("eta", "theta", "nu"):
            _check_positive(name, config[name])
        _check_int("interval", config["interval"], 1)
        _check_choice("compat", config["compat"], COMPATS)
        _check_int("calls", config["calls"], 0)
        self.batch_size: int = config["batch_size"]
        self.max_batch_size: int = config["max_batch_size"]
        self.test, self.eta, self.theta, self.nu = config["test"], config["eta"], config["theta"], config["nu"]
        self.interval, self.compat, self.calls = config["interval"], config["compat"], config["calls"]

    @property
    def due(self) -> bool:
        """Whether the next :meth:`update` runs a test (so per-sample gradients are worth computing)."""
        return self.calls % self.interval == 0 and self.batch_size < self.max_batch_size

    def update(self, per_sample: Tensor | Sequence[Tensor] | Mapping[str, Tensor] | None) -> int:
        """Advance one call; when :attr:`due`, test ``per_sample`` (the current batch's per-sample gradients:
        a ``(b, P)`` matrix, blocks, or :func:`per_sample_gradients`' dict; ignored, may be None, when not due)
        and return the new batch size.  A batch of one sample (an epoch's remainder) is not tested."""
        due = self.due
        self.calls += 1
        if due and per_sample is None:
            raise ValueError("Invalid per_sample: None while a test is due (valid range: the batch's per-sample "
                             "gradients; check .due first)")
        if not due or _rows(per_sample) < 2:          # an epoch's one-sample remainder has no unbiased variance
            return self.batch_size
        stats = gradient_statistics(per_sample, blockwise=self.compat == "official")
        proposed = proposed_batch_size(stats, self.test, self.eta, self.theta, self.nu)
        self.last = {**stats.as_floats(), "proposed": float(proposed), "samples": stats.samples}
        self.batch_size = next_batch_size(self.batch_size, self.last["proposed"], self.max_batch_size)
        return self.batch_size

    def step(self, model: nn.Module, loss_fn: Callable[[Any, Any], Tensor], inputs: Any, targets: Any,
             **options: Any) -> int:
        """:meth:`update` with :func:`per_sample_gradients` of ``(inputs, targets)`` (computed only when due;
        ``options`` go to it)."""
        per_sample = per_sample_gradients(model, loss_fn, inputs, targets, **options) if self.due else None
        return self.update(per_sample)

    def state_dict(self) -> dict[str, Any]:
        """Plain data (loads with ``weights_only=True``): the configuration, the batch size and the call count."""
        return dict(batch_size=self.batch_size, max_batch_size=self.max_batch_size, test=self.test, eta=self.eta,
                    theta=self.theta, nu=self.nu, interval=self.interval, compat=self.compat, calls=self.calls,
                    last=dict(self.last))

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._configure(state)
        self.last = dict(state.get("last", {}))

    def __repr__(self) -> str:
        return (f"AdaptiveBatch(batch_size={self.batch_size}, max_batch_size={self.max_batch_size}, "
                f"test={self.test!r}, calls={self.calls})")


class AdaptiveBatchSampler(Sampler[list[int]]):
    """A ``DataLoader`` batch sampler whose batch size is the controller's, read for every batch it draws.

    Epoch semantics: an epoch is one pass over a permutation of ``range(n)`` (``shuffle=True``: seeded by
    ``seed + epoch``, so any epoch's order can be rebuilt; else in order).  Each batch takes the next
    ``controller.batch_size`` indices of it, so a batch size that grows mid-epoch applies from the next
    batch on and no sample is seen twice in an epoch; the epoch's last batch is shorter (dropped with
    ``drop_last=True``) and a batch size larger than what is left of the epoch takes the rest.  One
    ``iter()`` runs to the end of the current epoch: stop early and the next ``iter()`` resumes at the same
    place; run to the end and the next ``iter()`` starts the next epoch.  There is no ``len()`` (the number
    of batches depends on future tests).  ``state_dict`` / ``load_state_dict`` restore the place (epoch and
    position): with ``DataLoader(num_workers > 0)`` the loader draws indices ahead (``prefetch_factor ×
    num_workers`` batches), so those batches keep the old size and the saved position is ahead of training —
    use ``num_workers=0`` for exact sizes.

    Args:
        data_source: the dataset (its ``len``) or the number of samples n.
        controller: the :class:`AdaptiveBatch` (anything with an int ``batch_size``).
        shuffle: permute every epoch (default True).
        seed: base seed of the permutations (default 0).
        drop_last: drop an epoch's last, shorter batch (default False).
    """

    def __init__(self, data_source: Any, controller: AdaptiveBatch, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False) -> None:
        self.num_samples = data_source if isinstance(data_source, int) else len(data_source)
        _check_int("data_source", self.num_samples, 1)
        _check_int("seed", seed, 0)
        self.controller, self.shuffle, self.seed, self.drop_last = controller, bool(shuffle), seed, bool(drop_last)
        self.epoch, self.position = 0, 0
        self._order: tuple[int, Tensor] | None = None

    def order(self, epoch: int) -> Tensor:
        """The index order of ``epoch``."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                self._order = (epoch, torch.randperm(self.num_samples, generator=gen))
            else:
                self._order = (epoch, torch.arange(self.num_samples))
        return self._order[1]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        while self.position < self.num_samples:
            end = min(self.position + self.controller.batch_size, self.num_samples)
            if self.drop_last and end - self.position < self.controller.batch_size:
                break
            batch = order[self.position:end].tolist()
            self.position = end
            yield batch
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        _check_int("epoch", state["epoch"], 0)
        _check_int("position", state["position"], 0)
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state.get("seed", self.seed)
        self._order = None                            # a cached permutation may belong to another seed


__all__ = ["AdaptiveBatch", "AdaptiveBatchSampler", "GradientStatistics", "per_sample_gradients",
           "gradient_statistics", "proposed_batch_size", "norm_test", "inner_product_test", "orthogonality_test",
           "augmented_test", "next_batch_size", "TESTS"]
