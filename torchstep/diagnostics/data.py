"""Data Diet scores: EL2N and GraNd per training example, averaged over runs, and score-based pruning.

Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training"
(NeurIPS 2021, arXiv 2107.07075; official JAX code mansheej/data_diet).  For a model ``f`` at parameters
``θ`` (one run ``r``: an initialisation trained for ``t`` steps), softmax ``p = softmax(f(θ, x))`` and
one-hot label ``y``::

    EL2N_r(x, y)  = ‖p − y‖₂
    GraNd_r(x, y) = ‖∇_θ ℓ(f(θ, x), y)‖₂        ℓ: the loss of this one example, all (selected) parameters
    score         = (1/R) Σ_r score_r           arithmetic mean over runs / checkpoints, no per-run scaling

Since ``∇_θ ℓ = Σ_k (p_k − y_k) ∇_θ f_k`` for cross-entropy, GraNd ∝ EL2N when the logit gradients are
orthogonal with equal norms; for a linear softmax model ``z = Wx + b`` exactly
``GraNd = EL2N · √(1 + ‖x‖²)``.

Conventions (the package's: a model, ``loss_fn(outputs, targets)``, batches ``(inputs, targets)`` with
``outputs = model(inputs)``):

* Scores are returned in **dataset order** (index ``i`` of the result is example ``i`` of the data).  The
  official code sorts CIFAR by class (an unstable NumPy ``argsort``) before scoring and saves its score files in
  that order — reusing published score vectors needs that permutation, not the dataset's.
* ``mode="eval"`` by default (the official code scores with ``train=False``: BatchNorm running statistics, no
  dropout); ``mode="train"`` is a switch, and leaves the model's buffers as they were.
* Per-example gradients come from :func:`torchstep.scaling.per_sample_gradients` (``torch.func``:
  ``vmap(grad(...))`` over batches of one), so ``g_i = ∇ℓ_i`` is *not* divided by the batch size.
* Selection (:func:`prune_by_score`) ranks with a stable sort; the official code uses ``argsort`` (ties in
  unspecified order).

Pieces: :func:`data_scores` (both scores in one pass over the runs), :func:`el2n_scores`,
:func:`grand_scores`, :func:`trained_runs` (a factory + train callback as a lazy run iterator) and
:func:`prune_by_score`.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler

from ..partition import LABELS, classify
from ..scaling.adaptive_batch import _check_choice, _check_int, _invalid, per_sample_gradients
from .monitor import LossFn

SCORES = ("el2n", "grand")
MODES = ("eval", "train")
REDUCTIONS = ("mean", "sum", "none")
KEEPS = ("hard", "easy", "offset", "random")


# ----------------------------------------------------------------------------- data and runs
def _is_tensor_pair(data: Any) -> bool:
    if not (isinstance(data, tuple) and len(data) == 2 and isinstance(data[1], Tensor)):
        return False
    inputs = data[0]
    return isinstance(inputs, Tensor) or (isinstance(inputs, tuple) and len(inputs) > 0
                                          and all(isinstance(x, Tensor) for x in inputs))


def _sequential(loader: DataLoader) -> bool:
    """True if iterating ``loader`` visits its (map-style) dataset once, in index order."""
    return (isinstance(loader.sampler, SequentialSampler) and isinstance(loader.batch_sampler, BatchSampler)
            and loader.batch_sampler.sampler is loader.sampler and not loader.batch_sampler.drop_last)


def _batches(data: Any, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
    """``(inputs, targets)`` batches of ``data`` in dataset order (see :func:`data_scores`)."""
    if _is_tensor_pair(data):
        inputs, targets = data
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        n = targets.shape[0]
        if any(x.shape[0] != n for x in args):
            raise _invalid("data", tuple(x.shape for x in args), f"inputs with {n} rows, as the targets")
        for lo in range(0, n, batch_size):
            chunk = tuple(x[lo:lo + batch_size] for x in args)
            yield (chunk if isinstance(inputs, tuple) else chunk[0]), targets[lo:lo + batch_size]
        return
    if isinstance(data, DataLoader) and not isinstance(data.dataset, IterableDataset) and not _sequential(data):
        data = DataLoader(data.dataset, batch_size=data.batch_size or batch_size, shuffle=False,
                          collate_fn=data.collate_fn, num_workers=data.num_workers)
    elif isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        data = DataLoader(data, batch_size=batch_size, shuffle=False)
    elif isinstance(data, (Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise _invalid("data", type(data).__name__, "a tuple (inputs, targets) of tensors, a Dataset, a DataLoader "
                       "or an iterable of (inputs, targets) batches")
    for batch in data:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise _invalid("batch", type(batch).__name__, "an (inputs, targets) pair")
        yield batch[0], batch[1]


def _runs(models: nn.Module | Iterable[nn.Module]) -> Iterator[nn.Module]:
    if isinstance(models, nn.Module):
        yield models
        return
    if not isinstance(models, Iterable):
        raise _invalid("models", type(models).__name__, "a module or an iterable of modules")
    empty = True
    for model in models:
        if not isinstance(model, nn.Module):
            raise _invalid("models", type(model).__name__, "modules only")
        empty = False
        yield model
    if empty:
        raise _invalid("models", "no models", "at least one module")


def trained_runs(factory: Callable[[int], nn.Module], train: Callable[[nn.Module, int], Any],
                 seeds: Sequence[int]) -> Iterator[nn.Module]:
    """The runs of a score average, built one at a time: for each seed ``model = factory(seed)`` and
    ``train(model, seed)`` (which trains in place, or returns the trained module).

    Args:
        factory: ``factory(seed) -> nn.Module``, the initialisation of run ``seed`` (seed it yourself, e.g.
            ``torch.manual_seed(seed)`` or a ``torch.Generator`` for the init).
        train: ``train(model, seed) -> None | nn.Module``, e.g. ``t`` steps of the usual recipe (the paper
            scores after a few epochs; the official code checkpoints every epoch and at step 0).
        seeds: the runs' seeds, at least one (the official README recommends ≥ 10 runs).
    Returns an iterator for ``models=`` of :func:`data_scores`; only one model is alive at a time.
    """
    seeds = list(seeds)
    if not seeds:
        raise _invalid("seeds", seeds, "at least one seed")
    for seed in seeds:
        model = factory(seed)
        out = train(model, seed)
        yield out if isinstance(out, nn.Module) else model


@contextmanager
def _scoring_mode(model: nn.Module, mode: str) -> Iterator[None]:
    """``model`` in ``mode`` for the block; its modules' flags and (in train mode) its buffers restored."""
    flags = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers()] if mode == "train" else []
    model.train(mode == "train")
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def _one_hot(targets: Tensor, outputs: Tensor) -> Tensor:
    if outputs.dim() != 2:
        raise _invalid("outputs", tuple(outputs.shape), "(batch, classes) logits")
    if not targets.is_floating_point() and targets.shape == outputs.shape[:1]:
        return F.one_hot(targets.long(), outputs.shape[1]).to(outputs.dtype)
    if targets.is_floating_point() and targets.shape == outputs.shape:
        return targets.to(outputs.dtype)
    raise _invalid("targets", (targets.dtype, tuple(targets.shape)),
                   f"integer labels of shape {tuple(outputs.shape[:1])} or one-hot / soft targets of shape "
                   f"{tuple(outputs.shape)}")


def _selected(model: nn.Module, params: Any) -> set[str] | None:
    """Names of the parameters GraNd's norm runs over (None: all trainable)."""
    if params is None or params == "all":
        return None
    if isinstance(params, str):
        _check_choice("params", params, ("all",) + LABELS)
        names = {n for n, label in classify(model).items() if label == params}
    else:
        names = set(params)
        known = {n for n, p in model.named_parameters() if p.requires_grad}
        if not names <= known:
            raise _invalid("params", sorted(names - known), "names of trainable parameters")
    if not names:
        raise _invalid("params", params, "a selection with at least one trainable parameter")
    return names


def _el2n(model: nn.Module, inputs: Any, targets: Tensor) -> Tensor:
    with torch.no_grad():
        outputs = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        return (outputs.softmax(-1) - _one_hot(targets, outputs)).norm(dim=-1)


def _grand(model: nn.Module, loss_fn: LossFn, inputs: Any, targets: Any, names: set[str] | None,
           chunk_size: int | None, randomness: str) -> Tensor:
    grads = per_sample_gradients(model, loss_fn, inputs, targets, chunk_size=chunk_size, randomness=randomness)
    squares = [g.flatten(1).pow(2).sum(1) for n, g in grads.items() if names is None or n in names]
    return torch.stack(squares).sum(0).sqrt()


# ----------------------------------------------------------------------------- scores
def data_scores(models: nn.Module | Iterable[nn.Module], data: Any, loss_fn: LossFn | None = None, *,
                scores: Sequence[str] = SCORES, mode: str = "eval", reduction: str = "mean",
                params: Any = None, batch_size: int = 256, chunk_size: int | None = None,
                randomness: str = "different", return_runs: bool = False) -> dict[str, Tensor]:
    """EL2N and/or GraNd of every example of ``data``, averaged over the runs in ``models`` (arXiv 2107.07075).

    ``EL2N_r(x, y) = ‖softmax(f_r(x)) − y‖₂``, ``GraNd_r(x, y) = ‖∇_θ ℓ_r(x, y)‖₂`` (the single-example loss
    ``loss_fn(model(x[None]), y[None])``), and each returned score is ``(1/R) Σ_r score_r`` (R runs).

    Args:
        models: a module, or an iterable of modules — the ``R`` runs (independent seeds trained to the same
            step) or checkpoints to average over; a lazy iterator (:func:`trained_runs`) is consumed once, so
            both scores come from the same runs.
        data: a tuple ``(inputs, targets)`` of tensors batched along dim 0 (``inputs`` may be a tuple of
            tensors), a map-style ``Dataset`` of ``(input, target)`` items, a ``DataLoader``, or any iterable of
            ``(inputs, targets)`` batches.  A ``DataLoader`` that shuffles, samples or drops the last batch
            is re-iterated over its dataset in index order (same ``batch_size``, ``collate_fn``, workers); an
            ``IterableDataset`` or a plain iterable is scored in iteration order.  Give un-augmented inputs
            (the official code does).
        loss_fn: ``loss_fn(outputs, targets)``; required for GraNd, unused by EL2N.
        scores: which of ``("el2n", "grand")`` to compute (default both).
        mode: ``"eval"`` (default: BatchNorm running statistics, dropout off — the official behaviour, and
            per-sample gradients need it for BatchNorm) or ``"train"`` (batch statistics: EL2N then depends
            on the batch composition; GraNd by ``vmap`` raises for BatchNorm in train mode; dropout draws
            per sample with ``randomness``).  The modules' flags and, in train mode, the buffers (running
            statistics) are restored afterwards.
        reduction: how ``loss_fn`` reduces over its batch dimension: ``"mean"`` (default) or ``"sum"`` — the
            same for a batch of one, so GraNd is ``‖∇ℓ_i‖`` either way, with no ``1/N`` — or ``"none"`` (it
            returns per-example losses; their sum over the batch of one is used).  Conversion from BackPACK:
            ``GraNd_i = N·√(Σ_tensors batch_l2_i)`` for a mean loss over ``N`` examples, ``√(Σ batch_l2_i)`` for
            a sum loss.
        params: GraNd's parameters: ``None`` / ``"all"`` (default: every trainable parameter, as the
            official code, BatchNorm affine included), a :mod:`torchstep.partition` label (``"matrix"``,
            ``"embedding"``, ``"head"``, ``"no_decay"``) or an iterable of parameter names.
        batch_size: rows per forward / per vectorised gradient batch for tensor data and datasets (default
            256; a ``DataLoader`` keeps its own).  Scores do not depend on it in eval mode.
        chunk_size: ``vmap`` chunk within a batch (default: the whole batch; memory ≈ chunk × P floats).
        randomness: ``vmap``'s randomness for dropout-like layers in train mode (default ``"different"``).
        return_runs: return the ``(R, N)`` per-run scores instead of their mean.

    Returns ``{score: tensor}`` with one float per example, in dataset order (see ``data``).

    Cost: per run, EL2N is one forward per example; GraNd one per-example gradient (≈ 3 forwards) per
    example, holding ``batch_size × P`` floats.  Measured on one thread of a shared CPU (torch 2.13), a
    784-200-200-10 ReLU MLP (P = 199,210, fp32), 1,000 examples, batch 256: EL2N 0.011 s, GraNd 1.3 s per
    run.  The R training runs themselves dominate.
    """
    scores = tuple(scores)
    if not scores or len(set(scores)) != len(scores):
        raise _invalid("scores", scores, f"distinct names from {SCORES}")
    for name in scores:
        _check_choice("scores", name, SCORES)
    _check_choice("mode", mode, MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    _check_choice("randomness", randomness, ("different", "same", "error"))
    _check_int("batch_size", batch_size, 1)
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, 1)
    if "grand" in scores and not callable(loss_fn):
        raise _invalid("loss_fn", loss_fn, "a callable loss_fn(outputs, targets) for GraNd")
    per_example = (lambda o, t: loss_fn(o, t).sum()) if reduction == "none" else loss_fn

    runs: dict[str, list[Tensor]] = {name: [] for name in scores}
    for model in _runs(models):
        names = _selected(model, params) if "grand" in scores else None
        parts: dict[str, list[Tensor]] = {name: [] for name in scores}
        with _scoring_mode(model, mode):
            for inputs, targets in _batches(data, batch_size):
                if "el2n" in scores:
                    parts["el2n"].append(_el2n(model, inputs, targets))
                if "grand" in scores:
                    parts["grand"].append(_grand(model, per_example, inputs, targets, names, chunk_size,
                                                 randomness))
        for name in scores:
            if not parts[name]:
                raise _invalid("data", "no examples", "at least one example")
            vector = torch.cat(parts[name]).detach()
            if runs[name] and vector.shape != runs[name][0].shape:
                raise _invalid("data", f"{vector.numel()} examples in one run, {runs[name][0].numel()} in another",
                               "the same examples for every run")
            runs[name].append(vector)
    stacked = {name: torch.stack(vectors) for name, vectors in runs.items()}
    return stacked if return_runs else {name: s.mean(0) for name, s in stacked.items()}


def el2n_scores(models: nn.Module | Iterable[nn.Module], data: Any, **kwargs: Any) -> Tensor:
    """EL2N ``‖softmax(f(x)) − y‖₂`` per example, mean over runs: :func:`data_scores` with
    ``scores=("el2n",)`` (same arguments; no loss needed).  Bounds: ``0 ≤ EL2N ≤ √2·(1 − p_y) ≤ √2``."""
    return data_scores(models, data, scores=("el2n",), **kwargs)["el2n"]


def grand_scores(models: nn.Module | Iterable[nn.Module], loss_fn: LossFn, data: Any, **kwargs: Any) -> Tensor:
    """GraNd ``‖∇_θ ℓ(x, y)‖₂`` per example, mean over runs: :func:`data_scores` with ``scores=("grand",)``
    (same arguments: ``mode``, ``reduction``, ``params``, ``batch_size``, ``chunk_size``, …)."""
    return data_scores(models, data, loss_fn, scores=("grand",), **kwargs)["grand"]


# ----------------------------------------------------------------------------- pruning
def prune_by_score(scores: Tensor | Sequence[float], fraction: float, keep: str = "hard", *,
                   offset: int | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Indices of the examples kept after pruning ``fraction`` of them by score (arXiv 2107.07075).

    Examples are ranked by ascending score with ties broken by dataset index (a stable sort), and
    ``K = N − ⌊fraction·N + ½⌋`` are kept:

    * ``"hard"`` (default): the K highest-ranked — the paper's "keep the highest scores" (official
      ``keep_max_scores``, ``argsort()[-K:]``);
    * ``"easy"``: the K lowest-ranked (official ``keep_min_scores``);
    * ``"offset"``: ranks ``[offset, offset + K)`` — drops the ``offset`` easiest and the ``N − offset − K``
      hardest (official ``run_offset_subset``);
    * ``"random"``: K uniformly at random without replacement (the paper's random-pruning baseline).

    Args:
        scores: one finite-or-``+inf`` score per example (e.g. :func:`el2n_scores`; NaN raises).
        fraction: the fraction of examples removed, in ``[0, 1)``.
        keep: ``"hard"``, ``"easy"``, ``"offset"`` or ``"random"``.
        offset: for ``keep="offset"`` only: the number of easiest examples dropped, ``0 ≤ offset ≤ N − K``.
        generator: for ``keep="random"`` only, required (explicit randomness).
    Returns the kept indices, ascending (ready for ``torch.utils.data.Subset``), as an int64 tensor.
    Cost: one sort of N scores.
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1 or scores.numel() == 0 or scores.is_complex() or scores.dtype == torch.bool:
        raise _invalid("scores", tuple(scores.shape), "a non-empty 1-D tensor of real scores")
    if torch.isnan(scores.double()).any():
        raise _invalid("scores", "NaN", "no NaN scores")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise _invalid("fraction", fraction, "a number in [0, 1)")
    _check_choice("keep", keep, KEEPS)
    n = scores.numel()
    k = n - math.floor(fraction * n + 0.5)
    if keep == "offset":
        if offset is None:
            raise _invalid("offset", offset, f"an int in [0, {n - k}] for keep='offset'")
        _check_int("offset", offset, 0)
        if offset > n - k:
            raise _invalid("offset", offset, f"an int in [0, {n - k}] (N = {n}, K = {k})")
    elif offset is not None:
        raise _invalid("offset", offset, "None unless keep='offset'")
    if keep == "random":
        if not isinstance(generator, torch.Generator):
            raise _invalid("generator", generator, "a torch.Generator for keep='random'")
        kept = torch.randperm(n, generator=generator)[:k]
    else:
        if generator is not None:
            raise _invalid("generator", generator, "None unless keep='random'")
        order = torch.sort(scores, stable=True).indices
        start = {"hard": n - k, "easy": 0, "offset": offset}[keep]
        kept = order[start:start + k]
    return torch.sort(kept).values


__all__ = ["data_scores", "el2n_scores", "grand_scores", "prune_by_score", "trained_runs"]
