"""Newton–Schulz orthogonalisation of a batch of matrices (the polar factor U·Vᵀ, approximately).

``newton_schulz(G, preset="quintic")`` maps each matrix ``G = U S Vᵀ`` to ``≈ U S' Vᵀ`` with ``S'`` in
a preset-dependent band around 1, using only matrix products: after normalising ``X = G/(s·‖G‖_F + δ)``,
every step applies ``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ``.  Wide orientation is used
internally (tall matrices are transposed, so ``A`` is the small Gram matrix), inputs with more than two
dimensions are treated as a batch over the leading dimensions, and the iteration runs in
``compute_dtype`` (bf16 by default on CPU/GPU, as every reference implementation does).

Cost per m×n matrix (m ≤ n): steps·(4m²n + 2m³) FLOPs — see :func:`flops`.  ``method="gram"`` carries
out the same polynomial on the m×m Gram matrix (Dao-AILab's Gram Newton–Schulz; the DeepSpeed/Dion reports):
4m²n + O(m³) per call plus 4m²n per restart, the win growing with n/m (5 steps: ≈ 1.8× fewer FLOPs at
n = 4m in fp32, 1.5× in fp16 with its one restart, ≈ 1.3× in bf16 with its two; more FLOPs than standard on
square matrices).  fp16 compute normalises in fp32 before the cast (fp16's range, 6e-8…65504, cannot hold an
unnormalised gradient); bf16 casts first, as torch.optim.Muon.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .shapes import as_matrix, from_wide, to_wide  # noqa: F401  (as_matrix re-exported for old imports)


@dataclass(frozen=True)
class Preset:
    coefficients: tuple[tuple[float, float, float], ...]   # one (a, b, c) per step; the last repeats
    scale: float = 1.0                                      # X / (scale·‖X‖_F + offset)
    offset: float = 1e-7


PRESETS: dict[str, Preset] = {
    # Keller Jordan's quintic (KellerJordan/Muon, torch.optim.Muon): fast, σ' ∈ ~[0.7, 1.2]
    "quintic": Preset(((3.4445, -4.7750, 2.0315),)),
    # You / Cesista's 5 tuned steps; normalised by ‖X‖_F (+1e-7 so that a zero matrix maps to zero, not NaN)
    "you_cesista": Preset(((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                           (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012))),
    # Polar Express, 5 steps (arXiv 2505.16932; modded-nanogpt / dion default)
    "polar_express5": Preset(((8.156554524902461, -22.48329292557795, 15.878769915207462),
                              (4.042929935166739, -2.808917465908714, 0.5000178451051316),
                              (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
                              (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
                              (2.3465413258596377, -1.7097828382687081, 0.42323551169305323)),
                             scale=1.02, offset=1e-6),
    # the modded-nanogpt track-3 baseline (reference card §14): p(x) = 2x − 1.5x³ + 0.5x⁵ has p(1) = 1 and
    # p'(1) = 0, so σ → 1 (U·Vᵀ in the limit); 12 steps in that recipe.  +1e-7: a zero matrix maps to zero.
    "convergent": Preset(((2.0, -1.5, 0.5),)),
}


def resolve_preset(preset: str | Preset | Sequence[Sequence[float]]) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        try:
            return PRESETS[preset]
        except KeyError:
            raise ValueError(f"Invalid preset: {preset!r} (valid range: one of {sorted(PRESETS)} "
                             "or a sequence of (a, b, c))") from None
    coefficients = tuple(tuple(float(x) for x in abc) for abc in preset)
    if not coefficients or any(len(abc) != 3 for abc in coefficients):
        raise ValueError("Invalid preset: a user preset is a non-empty sequence of (a, b, c) triples")
    return Preset(coefficients)


NS_METHODS = ("standard", "gram", "auto")

#: ``method="auto"`` runs the Gram iteration when max(m, n)/min(m, n) ≥ this.  The FLOP break-even of
#: :func:`flops` is ≈ 1.5 (5 steps, one restart); 2 leaves a margin for the extra kernel launches
#: (see docs/speed.md, "Newton–Schulz: Gram iteration").
GRAM_AUTO_ASPECT = 2.0


def default_restarts(steps: int, compute_dtype: torch.dtype | None) -> tuple[int, ...]:
    """Iterations before which the Gram iteration restarts (``X ← Q·X``, ``R ← X·Xᵀ``, ``Q ← I``).

    Q is a polynomial in the Gram matrix whose eigenvalues grow like ∏aᵢ ≈ 1/σ for small singular values σ,
    and rounding Q (and R ← W·R·W) to 16 bits costs ``eps·‖Q‖``; a restart resets Q to I for 4m²n FLOPs.

    * bfloat16: every 2nd iteration (2, 4, …; 5 steps: 12m²n + 22m³ FLOPs) — ‖Q‖ ≤ a₀·a₁ (≈ 12 quintic,
      ≈ 33 Polar Express); one restart leaves bf16 outside the standard iteration's band
      (tests/test_newton_schulz_gram.py).
    * float16 (3 more mantissa bits): every 3rd iteration (3, 6, …; 5 steps: one restart, after 3 of the 5
      iterations, 8m²n + 28m³ FLOPs, 1.5× fewer than standard at n = 4m).  The gram-newton-schulz package
      restarts after 2 of 5 (``restarts=(2,)``, same FLOPs); measured here (tools/ns_fp16_restarts.py, quintic
      and Polar Express, Gaussian, ill-conditioned and row-scaled inputs, 256×1024, 512×2048, 256×2048,
      1024×256) the restart at 3 stays within 0.004 of the standard fp16 iteration's distance to the exact
      polynomial (≤ ½ of standard bf16's) with σ_max(O) ≤ standard + 0.002; the one at 2 is up to 0.043
      farther (Polar Express, ill-conditioned 512×2048: 0.053 vs 0.011) with σ_max up to +0.05.  No restart: 0.48 and
      σ_max 2.8.  ‖Q‖ ≤ a₀·a₁·a₂ (≈ 41 quintic, ≈ 128 Polar Express; measured max |entry| ≤ 128) stays far
      below fp16's 65504.
    * 32/64-bit compute: none (∏aᵢ·eps ≈ 1e3·6e-8 stays far below the band's width)."""
    if compute_dtype == torch.bfloat16:
        return tuple(range(2, steps, 2))
    if compute_dtype == torch.float16:
        return tuple(range(3, steps, 3))
    return ()


def _gram_iteration(X: Tensor, steps: int, p: Preset, restarts: Sequence[int], mm, madd) -> Tensor:
    """The NS steps of :func:`newton_schulz` on the small Gram matrix: with ``R = X₀X₀ᵀ`` (m×m) every step
    is ``X_{k+1} = W_k·X_k``, ``W_k = a·I + b·R_k + c·R_k²`` a polynomial in ``R_k = X_k X_kᵀ``; all
    ``W``'s commute with ``R``, so ``Q ← Q·W`` and ``R ← W·R·W`` are carried instead of ``X`` (O(m³) per
    step instead of O(m²n)), and ``X = Q·X₀`` is formed once at the end (and at every restart)."""
    eye = torch.eye(X.shape[-2], dtype=X.dtype, device=X.device)
    restarts = set(restarts)
    R = mm(X, X.mT)
    Q = None
    for i in range(steps):
        a, b, c = p.coefficients[min(i, len(p.coefficients) - 1)]
        if i in restarts and Q is not None:
            X = mm(Q, X)
            R = mm(X, X.mT)
            Q = None
        Z = madd(R, R, R, beta=b, alpha=c)                      # b·R + c·R²
        Q = Z + a * eye if Q is None else madd(Q, Q, Z, beta=a)  # Q·W = a·Q + Q·Z
        if i + 1 < steps and i + 1 not in restarts:
            RZ = madd(R, R, Z, beta=a)                           # R·W
            R = madd(RZ, Z, RZ, beta=a)                          # W·R·W = a·RW + Z·RW
    return mm(Q, X)


def newton_schulz(G: Tensor, steps: int = 5, preset: str | Preset | Sequence = "quintic",
                  compute_dtype: torch.dtype | None = torch.bfloat16, method: str = "standard",
                  restarts: Sequence[int] | None = None) -> Tensor:
    """Approximate orthogonalisation of ``G`` (…, m, n), batched over leading dimensions.

    Returns a tensor of ``G``'s shape and dtype.  ``compute_dtype=None`` keeps ``G``'s dtype.

    ``method``: ``"standard"`` (default; the iteration above, bit-for-bit torch.optim.Muon's in bf16),
    ``"gram"`` — the same polynomial carried out on the m×m Gram matrix (:func:`_gram_iteration`; fewer
    FLOPs when n ≥ 1.5·m, see :func:`flops`), or ``"auto"`` (gram when the aspect ratio is ≥
    :data:`GRAM_AUTO_ASPECT`).  ``restarts``: iterations before which the Gram iteration restarts from the
    current X (default :func:`default_restarts`; ignored by ``"standard"``).
    """
    if G.dim() < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if method not in NS_METHODS:
        raise ValueError(f"Invalid method: {method!r} (valid range: one of {list(NS_METHODS)})")
    p = resolve_preset(preset)
    shape = G.shape
    X, tall = to_wide(G)
    batched = X.dim() > 2
    if batched:
        X = X.reshape(-1, *X.shape[-2:])
    X = normalise(X, p, compute_dtype)
    # fused multiply-adds (one rounding each), as torch.optim.Muon: markedly more accurate in bf16
    mm, madd = (torch.bmm, torch.baddbmm) if batched else (torch.mm, torch.addmm)
    m, n = X.shape[-2:]
    if method == "gram" or (method == "auto" and n >= GRAM_AUTO_ASPECT * m):
        X = _gram_iteration(X, steps, p, default_restarts(steps, X.dtype) if restarts is None else restarts,
                            mm, madd)
        steps = 0
    for i in range(steps):
        a, b, c = p.coefficients[min(i, len(p.coefficients) - 1)]
        A = mm(X, X.mT)
        X = madd(X, madd(A, A, A, beta=b, alpha=c), X, beta=a)
    if batched:
        X = X.reshape(*shape[:-2], *X.shape[-2:])
    return from_wide(X, tall).to(G.dtype)


def normalise(X: Tensor, p: Preset, compute_dtype: torch.dtype | None) -> Tensor:
    """``X / (‖X‖_F·scale + offset)`` per matrix, in ``compute_dtype`` (None: X's), the iteration's start.

    fp16 holds 6e-8…65504 only: an unnormalised gradient can flush to zero or overflow (‖G‖_F > 65504 gave a
    zero update, an entry > 65504 NaN), so fp16 normalises in fp32 and casts after; bf16 casts first (fp32's
    range; bit-for-bit torch.optim.Muon).  The norm is taken in fp32 for 16-bit X."""
    late = compute_dtype == torch.float16
    if compute_dtype is not None and not late:
        X = X.to(compute_dtype)
    elif late and X.dtype not in (torch.float32, torch.float64):
        X = X.float()
    norm = torch.linalg.matrix_norm(X.float() if X.dtype in (torch.bfloat16, torch.float16) else X,
                                    keepdim=True).to(X.dtype)
    X = X / (norm * p.scale + p.offset)
    return X.to(compute_dtype) if late else X


def newton_schulz_many(matrices: Sequence[Tensor], **kwargs) -> list[Tensor]:
    """Orthogonalise a list of matrices, stacking same-shape (and same-dtype) ones into one batch."""
    out: list[Tensor | None] = [None] * len(matrices)
    buckets: dict[tuple, list[int]] = {}
    for i, m in enumerate(matrices):
        buckets.setdefault((tuple(m.shape), m.dtype, m.device), []).append(i)
    for idx in buckets.values():
        result = newton_schulz(torch.stack([matrices[i] for i in idx]), **kwargs) if len(idx) > 1 else \
            newton_schulz(matrices[idx[0]], **kwargs)
        for j, i in enumerate(idx):
            out[i] = result[j] if len(idx) > 1 else result
    return out  # type: ignore[return-value]


def _wire(result: Tensor) -> Tensor:
    """A result in the memory order :func:`newton_schulz` produced it (tall matrices are transposed views of
    a contiguous wide one), flattened — so a receiver rebuilds the same strides with :func:`_unwire`."""
    return (result.mT if result.shape[-2] > result.shape[-1] else result).reshape(-1)


def _unwire(flat: Tensor, shape: torch.Size) -> Tensor:
    if shape[-2] > shape[-1]:
        return flat.view(*shape[:-2], shape[-1], shape[-2]).mT
    return flat.view(shape)


#: Counters of :func:`newton_schulz_many_split` on this rank (plain ints, no device sync): broadcasts issued,
#: payload bytes this rank broadcast as owner / received from other owners, and its NS work Σ m·n·min(m, n).
#: Reset by assigning 0.
SPLIT_STATS = {"calls": 0, "broadcasts": 0, "bytes_broadcast": 0, "bytes_received": 0, "work": 0}


def newton_schulz_many_split(matrices: Sequence[Tensor], group=None, loads: list[int] | None = None,
                             **kwargs) -> list[Tensor]:
    """Data-parallel variant of :func:`newton_schulz_many` (DDP: every rank holds every matrix).

    Each matrix is given to one owner rank by the cost-balanced LPT plan
    (:func:`torchstep.ops.sharding.owner_plan`, cost m·n·min(m, n)); each rank orthogonalises its own
    matrices (batched by shape), then every owner broadcasts **one flat buffer** with all its results (one
    broadcast per owner and dtype, not one per matrix).  The output is the unsplit call's on every rank, with
    the same strides (results travel in the memory order NS produced them), with about 1/W of the
    Newton–Schulz work per rank — bitwise on CPU (tested); an owner stacks a different subset of same-shape
    matrices than the unsplit call, so where a batched GEMM picks its kernel by batch size (cuBLAS) equality
    is up to rounding (unverified on GPU).

    Args:
        matrices: the (…, m, n) tensors, identical on every rank (the plan only reads shapes).
        group: the process group (default: the world).
        loads: per-rank NS load of earlier calls in the same step (the plan continues from it and adds this
            call's matrices to it, in place); None: a fresh plan.
        **kwargs: :func:`newton_schulz`'s arguments.

    Falls back to the unsplit call when ``torch.distributed`` is not initialised.  Traffic: each owner sends
    its results' bytes once per broadcast (``exchange_bytes(..., sharded=False)`` in
    :mod:`torchstep.ops.sharding`); memory: one flat buffer per owner at a time."""
    import torch.distributed as dist

    from .sharding import ns_cost as ns_work, owner_plan
    if not (dist.is_available() and dist.is_initialized()):
        return newton_schulz_many(matrices, **kwargs)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    plan = owner_plan([tuple(m.shape) for m in matrices], world, initial_loads=loads)
    if loads is not None:
        for m, o in zip(matrices, plan):
            loads[o] += ns_work(m.shape)
    mine = [i for i, o in enumerate(plan) if o == rank]
    done = dict(zip(mine, newton_schulz_many([matrices[i] for i in mine], **kwargs)))
    SPLIT_STATS["calls"] += 1
    SPLIT_STATS["work"] += sum(ns_work(matrices[i].shape) for i in mine)
    out: list[Tensor | None] = [None] * len(matrices)
    for owner in range(world):
        buckets: dict[tuple, list[int]] = {}
        for i, o in enumerate(plan):
            if o == owner:
                buckets.setdefault((matrices[i].dtype, matrices[i].device), []).append(i)
        for (dtype, device), idx in buckets.items():
            if owner == rank:
                flat = torch.cat([_wire(done[i]) for i in idx])
            else:
                flat = torch.empty(sum(matrices[i].numel() for i in idx), dtype=dtype, device=device)
            dist.broadcast(flat, src=dist.get_global_rank(group, owner) if group is not None else owner,
                           group=group)
            SPLIT_STATS["broadcasts"] += 1
            SPLIT_STATS["bytes_broadcast" if owner == rank else "bytes_received"] += flat.numel() * flat.element_size()
            offset = 0
            for i in idx:
                numel = matrices[i].numel()
                out[i] = done[i] if owner == rank else _unwire(flat[offset:offset + numel], matrices[i].shape)
                offset += numel
    return out  # type: ignore[return-value]


def singular_value_bound(steps: int = 5, preset: str | Preset | Sequence = "quintic", grid: int = 1 << 20) -> float:
    """Largest singular value :func:`newton_schulz` can output, in exact arithmetic.

    Each step maps every singular value by the same scalar polynomial x ← a·x + b·x³ + c·x⁵, and the
    Frobenius pre-normalisation puts every input singular value in [0, 1/scale]; so the output's
    spectral norm is at most the maximum of the composed polynomial on that interval (evaluated here in
    float64 on ``grid`` points — the polynomial's derivative is bounded, so the grid maximum is exact to
    ~1e-9).  bf16 compute adds rounding on top (measured ≤ 1 % in the tests)."""
    p = resolve_preset(preset)
    x = torch.linspace(0.0, 1.0 / p.scale, grid, dtype=torch.float64)
    for i in range(steps):
        a, b, c = p.coefficients[min(i, len(p.coefficients) - 1)]
        x2 = x * x
        x = x * (a + x2 * (b + c * x2))
    return float(x.abs().max())


def flops(m: int, n: int, steps: int = 5, method: str = "standard", restarts: Sequence[int] = ()) -> int:
    """FLOPs (multiplies and adds counted separately) of ``steps`` iterations on one m×n matrix.

    ``method="gram"``: 2m²n for ``R = XXᵀ``, 2m²n for the final ``Q·X``, 4m²n per restart, and per step
    2m³ for ``R²``, 2m³ for ``Q·Z`` (not after a (re)start, where ``Q = aI + Z``) and 4m³ for ``R ← W·R·W``
    (not before the last step or a restart) — with no symmetric GEMM (CPU), e.g. 5 steps, one restart:
    8m²n + 28m³ vs 20m²n + 10m³ (break-even n ≈ 1.5m)."""
    m, n = min(m, n), max(m, n)
    if method == "standard":
        return steps * (4 * m * m * n + 2 * m ** 3)
    restarts = {r for r in restarts if 0 < r < steps}
    total = 4 * m * m * n + 4 * len(restarts) * m * m * n
    for i in range(steps):
        total += 2 * m ** 3 + (0 if i == 0 or i in restarts else 2 * m ** 3)
        total += 4 * m ** 3 if (i + 1 < steps and i + 1 not in restarts) else 0
    return total
