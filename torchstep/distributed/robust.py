"""Byzantine-robust gradient aggregation: Flag Aggregator, coordinate-wise median, trimmed mean, (Multi-)Krum.

Every rule is a pure function ``rule(gradients, f=..., **options) -> Tensor``: ``gradients`` is a list of
``p`` same-shaped tensors (one per worker) or one ``Tensor[p, ...]``; the result has the shape of one
gradient.  ``f`` is the number of Byzantine workers the rule must tolerate.  The same functions serve

* a parameter-server simulation (:class:`ParameterServer`, :func:`simulate_parameter_server`,
  :class:`LeastSquaresTask`, :func:`byzantine_gradients`), and
* a DDP communication hook (:func:`robust_comm_hook` with :class:`RobustHookState`): every rank all-gathers
  the bucket of every rank, applies the rule and returns the same result on every rank.

References: Flag Aggregator — Almasi, Mishra, Vamanan, Ravi, ICLR 2024, arXiv 2302.05865 (official code
hamidralmasi/FlagAggregator); Krum / Multi-Krum — Blanchard, El Mhamdi, Guerraoui, Stainer, NeurIPS 2017,
arXiv 1703.02757; coordinate-wise median and trimmed mean — Yin, Chen, Ramchandran, Bartlett, ICML 2018,
arXiv 1803.01498.  See ``docs/distributed-robust.md``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "AGGREGATORS", "FlagInfo", "LeastSquaresTask", "ParameterServer", "RobustHookState", "byzantine_gradients",
    "coordinate_median", "flag_aggregate", "krum", "krum_scores", "mean_aggregate", "multi_krum",
    "robust_aggregate", "robust_comm_hook", "simulate_parameter_server", "trimmed_mean",
]


# --------------------------------------------------------------------------------------------------------- #
# input handling

def _stack(gradients: Sequence[Tensor] | Tensor) -> tuple[Tensor, torch.Size]:
    """``(G[p, d], shape of one gradient)`` from a list of same-shaped tensors or a ``Tensor[p, ...]``."""
    if isinstance(gradients, Tensor):
        if gradients.dim() < 1 or gradients.shape[0] < 1:
            raise ValueError("expected a Tensor[p, ...] with p >= 1 worker gradients")
        return gradients.reshape(gradients.shape[0], -1), gradients.shape[1:]
    grads = list(gradients)
    if not grads:
        raise ValueError("expected at least one gradient")
    shape = grads[0].shape
    if any(g.shape != shape for g in grads):
        raise ValueError(f"all gradients must have the same shape, got {[tuple(g.shape) for g in grads]}")
    return torch.stack([g.reshape(-1) for g in grads]), shape


def _check_f(p: int, f: int, need: int, rule: str, what: str) -> None:
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    if p < need:
        raise ValueError(f"{rule} needs {what}; got p={p} workers and f={f}")


# --------------------------------------------------------------------------------------------------------- #
# classical rules

def mean_aggregate(gradients: Sequence[Tensor] | Tensor, f: int = 0) -> Tensor:
    """Plain mean ``(1/p) Σ_i g_i`` — the non-robust baseline (one Byzantine worker moves it arbitrarily).

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: ignored (accepted for a uniform signature).
    """
    G, shape = _stack(gradients)
    return G.mean(0).reshape(shape)


def coordinate_median(gradients: Sequence[Tensor] | Tensor, f: int = 0) -> Tensor:
    """Coordinate-wise median (Yin et al. 2018, arXiv 1803.01498): ``out_k = median_i g_{i,k}``.

    For even ``p`` the two middle values are averaged (the statistical median, as in the paper);
    ``torch.median`` would return the lower one.  Breakdown point 1/2.

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: number of Byzantine workers; only checked (``2f < p``), the median does not use it.
    """
    G, shape = _stack(gradients)
    p = G.shape[0]
    _check_f(p, f, 2 * f + 1, "coordinate_median", "2f < p")
    s = G.sort(dim=0).values
    lo, hi = (p - 1) // 2, p // 2
    out = s[lo] if lo == hi else (s[lo] + s[hi]) / 2
    return out.reshape(shape)


def trimmed_mean(gradients: Sequence[Tensor] | Tensor, f: int = 0) -> Tensor:
    """Coordinate-wise trimmed mean (Yin et al. 2018, arXiv 1803.01498).

    ``out_k = (1/(p-2f)) Σ_{j=f+1}^{p-f} g_{(j),k}`` where ``g_{(1),k} ≤ … ≤ g_{(p),k}`` are the sorted values
    of coordinate ``k``: the ``f`` largest and ``f`` smallest values of every coordinate are dropped.

    Deviation: the paper trims a fraction β of each side; here the count ``f`` is given (β = f/p).

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: values trimmed from each side per coordinate (default 0 = the mean); needs ``2f < p``.
    """
    G, shape = _stack(gradients)
    p = G.shape[0]
    _check_f(p, f, 2 * f + 1, "trimmed_mean", "2f < p")
    return G.sort(dim=0).values[f:p - f].mean(0).reshape(shape)


def krum_scores(gradients: Sequence[Tensor] | Tensor, f: int) -> Tensor:
    """Krum scores ``s_i = Σ_{j ∈ N_i} ‖g_i − g_j‖²`` over the ``p − f − 2`` nearest neighbours ``N_i`` of ``g_i``
    (squared Euclidean distances, as in Blanchard et al. 2017; float64, shape ``[p]``)."""
    G, _ = _stack(gradients)
    p = G.shape[0]
    _check_f(p, f, 2 * f + 3, "krum", "p > 2f + 2")
    G64 = G.to(torch.float64)
    d2 = torch.stack([(G64 - G64[i]).pow(2).sum(1) for i in range(p)])   # exact differences, O(p·d) memory
    d2.fill_diagonal_(float("inf"))
    return d2.sort(dim=1).values[:, :p - f - 2].sum(1)


def multi_krum(gradients: Sequence[Tensor] | Tensor, f: int = 0, m: int | None = None) -> Tensor:
    """Multi-Krum (Blanchard et al. 2017, arXiv 1703.02757): the mean of the ``m`` gradients with the lowest
    :func:`krum_scores`; ``m = 1`` is Krum.

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: number of Byzantine workers; needs ``p > 2f + 2``.
        m: how many gradients to average (default ``p − f``); ties go to the lower worker index.
    """
    G, shape = _stack(gradients)
    p = G.shape[0]
    m = p - f if m is None else m
    if not 1 <= m <= p:
        raise ValueError(f"m must be in [1, {p}], got {m}")
    order = torch.argsort(krum_scores(G, f), stable=True)
    return G[order[:m].to(G.device)].mean(0).reshape(shape)


def krum(gradients: Sequence[Tensor] | Tensor, f: int = 0) -> Tensor:
    """Krum (Blanchard et al. 2017, arXiv 1703.02757): the worker gradient ``g_{i*}`` with
    ``i* = argmin_i Σ_{j ∈ N_i} ‖g_i − g_j‖²``, ``N_i`` its ``p − f − 2`` nearest neighbours.

    Squared distances and ``p − f − 2`` neighbours as in the paper (the Flag Aggregator repository's bundled
    Krum uses plain distances and ``p − f − 1``).  Ties go to the lower worker index.

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: number of Byzantine workers; needs ``p > 2f + 2``.
    """
    return multi_krum(gradients, f, m=1)


# --------------------------------------------------------------------------------------------------------- #
# Flag Aggregator

@dataclass
class FlagInfo:
    """Diagnostics of :func:`flag_aggregate`: the IRLS objective ``Σ_i sin θ_i`` after each accepted or rejected
    iterate (``objective[0]`` = initial subspace), the weights ``w_i`` of the last iteration tried (the final
    subspace's weights are ``weights_at_solution``), the coefficients ``c`` with ``aggregate = Σ_i c_i g_i/‖g_i‖``,
    and the iterations run."""
    objective: list[float]
    weights: Tensor | None
    weights_at_solution: Tensor
    coefficients: Tensor
    iterations: int
    returned_previous: bool = False


def _sine_weights(sq: Tensor, eps: float) -> Tensor:
    return (sq.abs() + eps).pow(-0.25)


def _objective(M: Tensor) -> float:
    """``Σ_i sqrt(max(1 − ‖Yᵀx_i‖², 0))`` from ``M = YᵀX`` (r×p) — the official code's 'sine' objective."""
    return (1 - M.pow(2).sum(0)).clamp_min(0).sqrt().sum().item()


def flag_aggregate(gradients: Sequence[Tensor] | Tensor, f: int = 0, r: int = 1, lam: float = 0.0,
                   iters: int = 1, init: str | Tensor = "random", seed: int = 1, eps: float = 1e-7,
                   tol: float = 1e-10, scale: str = "official", return_info: bool = False
                   ) -> Tensor | tuple[Tensor, FlagInfo]:
    """Flag Aggregator (Almasi et al., ICLR 2024, arXiv 2302.05865): the projection of the unit gradients onto
    a robust r-dimensional subspace (a flag median) found by IRLS.

    With unit gradients ``x_i = g_i/‖g_i‖`` and ``Y ∈ R^{d×r}`` orthonormal, one IRLS step is

        w_i = (|1 − ‖Yᵀx_i‖²| + eps)^(−1/4)                 (w_i² = 1/sin θ_i)
        ω_ij = λ/(p(p−1)) · (|1 − ‖Yᵀ(x_i − x_j)‖²| + eps)^(−1/4)   for all ordered pairs i ≠ j   (λ > 0 only)
        Y ← top-r left singular vectors of [w_1 x_1, …, w_p x_p, (ω_ij (x_i − x_j))_{i≠j}]

    repeated ``iters`` times, stopping early when the objective ``Σ_i sqrt(1 − ‖Yᵀx_i‖²)`` decreases by at
    most ``tol`` and returning the previous ``Y`` when it did not decrease (the official ``irls_flag``).  The
    aggregate is ``(1/r) Σ_i Y Yᵀ x_i``.

    Eigen formulation (exact, not an approximation): the stacked columns are ``A = Xᵀ C`` for a coefficient
    matrix ``C`` (p×m), so ``Y = A V Λ^{-1/2}`` from the eigen-decomposition ``Cᵀ K C = V Λ Vᵀ`` of the small
    Gram matrix, with ``K = X Xᵀ`` (p×p, float64).  Cost: one O(d·p²) pass for ``K`` and one O(d·p) pass for
    the output; no d×m matrix is built, even for λ > 0 (m = p²).

    Args:
        gradients: ``p`` worker gradients (list of same-shaped tensors or ``Tensor[p, ...]``).
        f: number of Byzantine workers; only checked (``2f < p``, as the official code asserts).
        r: subspace dimension (official default 1; the paper's runs use 4–8, more with more workers).
        lam: pairwise regulariser λ ≥ 0 (official default 0).
        iters: IRLS iterations (official: 1).  Use e.g. 50 with ``init="flag_mean"`` for the converged flag median.
        init: ``"random"`` (official: uniform(−0.5, 0.5) of shape d×r from a generator seeded with ``seed``,
            orthonormalised by QR), ``"flag_mean"`` (the SVD of the unit gradients, i.e. one step with w ≡ 1),
            or a tensor (d×r, or the gradient's shape for r = 1), orthonormalised by QR.
        seed: seed of the random initialisation (official: 1).  A private generator: global RNG untouched.
        eps: weight regulariser (official 1e-7).
        tol: early-stop threshold on the objective decrease (official 1e-10).
        scale: ``"official"`` — the aggregate above (scale-free: p identical gradients give norm p/r);
            ``"median_norm"`` — rescaled to the median worker norm ``median_i ‖g_i‖`` (a torchstep proposal, not
            in the paper, so that the SGD learning rate keeps its meaning and steps shrink near an optimum;
            the card in the reference notes calls it ``mean_norm``).
        return_info: also return a :class:`FlagInfo`.

    Deviations: λ > 0 columns are formed implicitly (same subspace); rank-deficient directions
    (eigenvalue ≤ 1e-12·max) are dropped instead of giving arbitrary singular vectors (the ``1/r`` factor is
    kept); the official per-step CSV diagnostics are not written.
    """
    G, shape = _stack(gradients)
    p, d = G.shape
    _check_f(p, f, 2 * f + 1, "flag_aggregate", "2f < p")
    if r < 1 or iters < 0 or lam < 0:
        raise ValueError(f"need r >= 1, iters >= 0, lam >= 0; got r={r}, iters={iters}, lam={lam}")
    if scale not in ("official", "median_norm"):
        raise ValueError(f"scale must be 'official' or 'median_norm', got {scale!r}")
    norms = torch.linalg.vector_norm(G, dim=1)
    X = G / norms.clamp_min(1e-12)[:, None]                   # F.normalize: zero gradients stay zero
    K = (X @ X.T).to(torch.float64)
    ones = torch.ones(p, dtype=torch.float64, device=K.device)
    pairs = [(i, j) for i in range(p) for j in range(p) if i != j] if lam > 0 else []

    Y0 = None                                                  # explicit initial subspace (d×r), or None
    if isinstance(init, Tensor) or init == "random":
        if isinstance(init, Tensor):
            Y_raw = init.reshape(d, -1).to(device=G.device, dtype=G.dtype)
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            Y_raw = (torch.rand(d, r, generator=gen, dtype=torch.float64) - 0.5).to(device=G.device, dtype=G.dtype)
        Y0 = torch.linalg.qr(Y_raw)[0][:, :r]
        M = (Y0.T @ X.T).to(torch.float64)                     # Yᵀx_i, r×p
        B = None
    elif init == "flag_mean":
        B = _top_subspace(torch.diag(ones), K, r)
        M = B.T @ K
    else:
        raise ValueError(f"init must be 'random', 'flag_mean' or a tensor, got {init!r}")

    def step(M: Tensor) -> tuple[Tensor, Tensor]:
        w = _sine_weights(1 - M.pow(2).sum(0), eps)
        cols = [torch.diag(w)]
        if pairs:
            i, j = torch.tensor(pairs, device=K.device).T
            Dm = M[:, i] - M[:, j]
            om = _sine_weights(1 - Dm.pow(2).sum(0), eps) * lam / (p * (p - 1))
            E = torch.zeros(p, len(pairs), dtype=torch.float64, device=K.device)
            k = torch.arange(len(pairs), device=K.device)
            E[i, k] = om
            E[j, k] = -om
            cols.append(E)
        return _top_subspace(torch.cat(cols, 1), K, r), w

    err = [_objective(M)]
    w_last = None
    its, diff, prev = 0, 1.0, (B, M)
    while its < iters and diff > tol and err[-1] > tol:
        prev = (B, M)
        B, w_last = step(M)
        M = B.T @ K
        err.append(_objective(M))
        diff = err[-2] - err[-1]
        its += 1
    returned_previous = not diff > 0
    if returned_previous:
        B, M = prev
    if B is None:                                              # the initial explicit subspace was kept
        out = Y0 @ (M @ ones).to(G.dtype) / r
        coeff = None
    else:
        coeff = B @ (M @ ones) / r                             # aggregate = Σ_i coeff_i x_i
        out = coeff.to(G.dtype) @ X
    if scale == "median_norm":
        n_out = torch.linalg.vector_norm(out)
        med = norms.sort().values[(p - 1) // 2: p // 2 + 1].mean()
        out = out * torch.where(n_out > 0, med / n_out.clamp_min(torch.finfo(out.dtype).tiny), 0.0)
    out = out.reshape(shape)
    if not return_info:
        return out
    if coeff is None:                                          # coefficients of the explicit Y0 projection
        coeff = torch.linalg.lstsq(X.T.to(torch.float64), out.reshape(-1).to(torch.float64)[:, None]).solution[:, 0]
    info = FlagInfo(objective=err, weights=w_last, weights_at_solution=_sine_weights(1 - M.pow(2).sum(0), eps),
                    coefficients=coeff, iterations=its, returned_previous=returned_previous)
    return out, info


def _top_subspace(C: Tensor, K: Tensor, r: int) -> Tensor:
    """``B`` (p×r) with ``Y = Xᵀ B`` the top-r left singular vectors of ``A = Xᵀ C``: ``AᵀA = Cᵀ K C = V Λ Vᵀ``,
    ``Y = A V Λ^{-1/2}``.  Directions with eigenvalue ≤ 1e-12·max get a zero column."""
    S = C.T @ K @ C
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    lam, V = lam.flip(0)[:r], V.flip(1)[:, :r]
    keep = lam > 1e-12 * lam[0].clamp_min(0) if lam.numel() else lam > 0
    scale = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    B = C @ (V * scale)
    if B.shape[1] < r:
        B = torch.cat([B, B.new_zeros(B.shape[0], r - B.shape[1])], 1)
    return B


AGGREGATORS: dict[str, Callable[..., Tensor]] = {
    "mean": mean_aggregate, "median": coordinate_median, "trimmed_mean": trimmed_mean, "krum": krum,
    "multi_krum": multi_krum, "flag": flag_aggregate,
}


def robust_aggregate(gradients: Sequence[Tensor] | Tensor, rule: str | Callable[..., Tensor] = "flag",
                     f: int = 0, **options) -> Tensor:
    """Apply an aggregation rule by name (:data:`AGGREGATORS`: mean, median, trimmed_mean, krum, multi_krum,
    flag) or callable: ``rule(gradients, f=f, **options)``."""
    fn = AGGREGATORS[rule] if isinstance(rule, str) else rule
    return fn(gradients, f=f, **options)


# --------------------------------------------------------------------------------------------------------- #
# parameter-server simulation

def byzantine_gradients(honest: Tensor, attack: str, scale: float = 10.0,
                        generator: torch.Generator | None = None) -> Tensor:
    """What Byzantine workers send, from the honest gradients they computed (``Tensor[f, d]``).

    ``"none"``: ``g``; ``"scale"``: ``scale·g``; ``"sign_flip"``: ``−scale·g``; ``"random"``: ``N(0, scale²)``
    noise of the same shape (independent of ``g``).  ``scale`` defaults to 10.
    """
    if attack == "none":
        return honest
    if attack == "scale":
        return scale * honest
    if attack == "sign_flip":
        return -scale * honest
    if attack == "random":
        return scale * torch.randn(honest.shape, generator=generator, dtype=honest.dtype).to(honest.device)
    raise ValueError(f"unknown attack {attack!r} (none, scale, sign_flip, random)")


@dataclass
class LeastSquaresTask:
    """A convex, realisable least-squares task split over ``n_workers``: worker ``i`` holds ``A_i`` (m×d) and
    ``b_i = A_i x*``; its stochastic gradient at ``x`` on a random mini-batch of ``batch`` rows is
    ``(1/batch) A_Bᵀ (A_B x − b_B)``.  All honest gradients vanish at the known optimum ``x*``."""
    d: int = 10
    n_workers: int = 7
    rows: int = 32
    batch: int = 8
    seed: int = 0
    A: Tensor = field(init=False)
    b: Tensor = field(init=False)
    x_star: Tensor = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        self.A = torch.randn(self.n_workers, self.rows, self.d, generator=g, dtype=torch.float64)
        self.x_star = torch.randn(self.d, generator=g, dtype=torch.float64)
        self.b = self.A @ self.x_star

    def gradient(self, x: Tensor, worker: int, generator: torch.Generator) -> Tensor:
        idx = torch.randperm(self.rows, generator=generator)[:self.batch]
        A, b = self.A[worker, idx], self.b[worker, idx]
        return A.T @ (A @ x - b) / self.batch


class ParameterServer:
    """A parameter server that aggregates the workers' gradients with a robust rule and takes an SGD step:
    ``x ← x − lr · (v ← momentum·v + rule(g_1, …, g_p))``.

    Args:
        params: the model parameters (a flat tensor, updated in place).
        rule: aggregation rule name (:data:`AGGREGATORS`) or callable ``rule(gradients, f=...)``.
        f: Byzantine workers the rule must tolerate.
        lr: step size.  momentum: heavy-ball momentum (default 0).
        options: extra keyword arguments of the rule (e.g. ``r``, ``scale`` for ``"flag"``).
    """

    def __init__(self, params: Tensor, rule: str | Callable[..., Tensor] = "flag", f: int = 0, lr: float = 0.1,
                 momentum: float = 0.0, **options) -> None:
        self.params, self.rule, self.f, self.lr, self.momentum, self.options = params, rule, f, lr, momentum, options
        self.buf: Tensor | None = None

    @torch.no_grad()
    def step(self, gradients: Sequence[Tensor] | Tensor) -> Tensor:
        """Aggregate ``gradients`` and update the parameters; returns the aggregate."""
        agg = robust_aggregate(gradients, self.rule, f=self.f, **self.options).reshape(self.params.shape)
        if self.momentum:
            self.buf = agg.clone() if self.buf is None else self.buf.mul_(self.momentum).add_(agg)
            agg = self.buf
        self.params.sub_(self.lr * agg)
        return agg


def simulate_parameter_server(task: LeastSquaresTask, rule: str | Callable[..., Tensor] = "flag", f: int = 0,
                              attack: str = "sign_flip", attack_scale: float = 10.0, lr: float = 0.05,
                              steps: int = 200, momentum: float = 0.0, seed: int = 0, **options) -> Tensor:
    """Run ``steps`` synchronous rounds: every worker computes a stochastic gradient of ``task`` at the current
    ``x`` (start 0); the last ``f`` workers replace theirs with :func:`byzantine_gradients` (``attack``,
    ``attack_scale``); a :class:`ParameterServer` aggregates with ``rule`` and steps.  Returns the final ``x``
    (it may be non-finite when the rule breaks down).  Deterministic for a given ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.zeros(task.d, dtype=torch.float64)
    server = ParameterServer(x, rule, f=f, lr=lr, momentum=momentum, **options)
    p = task.n_workers
    for _ in range(steps):
        grads = torch.stack([task.gradient(x, i, gen) for i in range(p)])
        if f:
            grads[p - f:] = byzantine_gradients(grads[p - f:], attack, attack_scale, gen)
        server.step(grads)
        if not torch.isfinite(x).all():
            break
    return x


# --------------------------------------------------------------------------------------------------------- #
# DDP communication hook

@dataclass
class RobustHookState:
    """State of :func:`robust_comm_hook`: the rule (name or callable), ``f``, the rule's options and the process
    group (default: the world group).  Each rank is one worker."""
    rule: str | Callable[..., Tensor] = "flag"
    f: int = 0
    options: dict = field(default_factory=dict)
    process_group: object = None


def robust_comm_hook(state: RobustHookState, bucket):   # no annotations: DDP rejects string annotations
    """DDP communication hook: all-gather the bucket's flat gradient from every rank, aggregate the ``world``
    gradients with ``state.rule`` and return the aggregate (identical on every rank: same inputs, deterministic
    rule; bitwise on CPU).  Register with ``ddp_model.register_comm_hook(RobustHookState(...), robust_comm_hook)``.

    The rule sees one bucket at a time, so selection rules (Krum) and the flag subspace are computed per bucket;
    build DDP with a ``bucket_cap_mb`` larger than the model to aggregate the whole gradient at once.  The
    result replaces DDP's mean (with ``"flag"``, ``scale="official"`` changes its norm to ~world/r).
    Returns a ``torch.futures.Future[Tensor]`` (``bucket`` is a ``dist.GradBucket``).
    """
    import torch.distributed as dist

    group = state.process_group
    buf = bucket.buffer()
    world = dist.get_world_size(group)
    flat = torch.empty(world * buf.numel(), dtype=buf.dtype, device=buf.device)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor   # renamed in torch 2.13
    work = gather(flat, buf.reshape(-1), group=group, async_op=True)

    def finish(_fut) -> Tensor:
        out = robust_aggregate(flat.view(world, -1), state.rule, f=state.f, **state.options)
        return out.reshape(buf.shape).to(buf.dtype)

    return work.get_future().then(finish)


def byzantine_table(steps: int = 150) -> str:
    """The docs' table (docs/distributed-robust.md): distance to x* after ``steps`` rounds, p = 7, f = 2, per
    attack and rule (``python -m torchstep.distributed.robust``)."""
    task = LeastSquaresTask(d=10, n_workers=7, rows=32, batch=8, seed=0)
    rules = [("mean", "mean", {}), ("FA (median_norm)", "flag", {"scale": "median_norm"}),
             ("FA (official scale)", "flag", {}), ("median", "median", {}), ("trimmed mean", "trimmed_mean", {}),
             ("Krum", "krum", {}), ("Multi-Krum", "multi_krum", {})]
    lines = ["| attack | " + " | ".join(r[0] for r in rules) + " |", "|---" * (len(rules) + 1) + "|"]
    for attack, scale in (("sign_flip", 10.0), ("scale", 100.0), ("random", 10.0)):
        cells = []
        for _, rule, options in rules:
            x = simulate_parameter_server(task, rule, f=2, attack=attack, attack_scale=scale, lr=0.05, steps=steps,
                                          **options)
            cells.append(f"{(x - task.x_star).norm().item():.2g}")
        lines.append(f"| {attack} ×{scale:g} | " + " | ".join(cells) + " |")
    clean = simulate_parameter_server(task, "mean", f=0, lr=0.05, steps=steps)
    lines.append(f"\nno attack (f = 0), mean: {(clean - task.x_star).norm().item():.2g}; ‖x*‖ = "
                 f"{task.x_star.norm().item():.3g}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(byzantine_table())
