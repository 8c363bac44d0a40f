"""Subspace projectors for memory-efficient update rules (GaLore, Fira, FRUGAL, GradNormLoRP).

A projector maps an ``m × n`` gradient ``G`` to a smaller tensor ``R`` (where the optimizer keeps its state)
and maps an update back.  Every projector is **plain tensors** (a ``basis`` dict), so an optimizer's
``state_dict`` loads with ``torch.load(..., weights_only=True)`` (the official GaLore stores a pickled
projector object, which does not).

Bases (keys of the dict):

* ``u`` – an ``m × r`` matrix with orthonormal columns, projecting from the left: ``R = uᵀG`` (``r × n``);
* ``v`` – an ``r × n`` matrix with orthonormal rows, projecting from the right: ``R = G vᵀ`` (``m × r``);
* both – two-sided (``proj_type="full"``): ``R = uᵀ G vᵀ`` (``r × r``);
* ``rows`` / ``cols`` – int64 index sets of a coordinate projector: ``R = G[rows]`` or ``G[:, cols]``.

``project_back(R) = scale · (u R | R v | u R v | scatter)``, so ``project_back(project(G)) = scale·uuᵀG``
etc. — the orthogonal projection onto the subspace, times ``scale`` (GaLore's α).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
Basis = dict[str, Tensor]


def projection_side(shape: tuple[int, int], proj_type: str) -> str:
    """``"left"``, ``"right"`` or ``"full"`` for an ``m × n`` matrix, as galore-torch chooses it.

    ``std`` projects the **short** side (``m ≥ n``: right, so the projector is ``r × n`` and the state
    ``m × r``; ``m < n``: left), ``reverse_std`` the long side; ``left``/``right``/``full`` are fixed."""
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"Invalid proj_type: {proj_type!r} (valid range: one of {PROJ_TYPES})")


def effective_rank(shape: tuple[int, int], rank: int | float) -> int:
    """``min(rank, m, n)`` for an int rank (an SVD has no more singular vectors); a float in (0, 1] is a
    fraction of ``min(m, n)``, rounded, at least 1 (so one setting keeps r/d fixed across model widths)."""
    short = min(shape[0], shape[1])
    if isinstance(rank, float):
        return max(1, min(short, round(rank * short)))
    return min(rank, short)


def projected_shape(shape: tuple[int, int], rank: int, side: str) -> tuple[int, int]:
    """The shape of ``R`` (and of the optimizer state) for an ``m × n`` matrix."""
    m, n = shape
    r = effective_rank(shape, rank)
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def basis_shapes(shape: tuple[int, int], rank: int, side: str) -> dict[str, tuple[int, int]]:
    """The shape of each basis tensor (for memory formulas and lazy state)."""
    m, n = shape
    r = effective_rank(shape, rank)
    out = {}
    if side in ("left", "full"):
        out["u"] = (m, r)
    if side in ("right", "full"):
        out["v"] = (r, n)
    return out


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 SVD for fp32/bf16/fp16 (bf16 SVD is unsupported on CUDA); fp64 stays fp64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def svd_basis(grad: Tensor, rank: int | float, side: str) -> Basis:
    """Top-``rank`` singular vectors of ``grad`` (an ``m × n`` matrix) on ``side``, in fp32 (fp64 for fp64).

    A rank-deficient gradient (even all zeros) still gives an orthonormal basis: the SVD completes it with
    orthonormal vectors of the null space.  A non-finite gradient raises ``FloatingPointError`` (a host sync,
    once per refresh); ``torch.linalg.LinAlgError`` (no convergence) propagates — see :func:`refresh_basis`."""
    mat = grad.to(_svd_dtype(grad.dtype))
    if not bool(torch.isfinite(mat).all()):
        raise FloatingPointError(f"cannot compute a subspace from a non-finite gradient of shape "
                                 f"{tuple(grad.shape)}")
    r = effective_rank(tuple(mat.shape), rank)
    u, _, vh = torch.linalg.svd(mat, full_matrices=False)
    out = {}
    if side in ("left", "full"):
        out["u"] = u[:, :r].contiguous()
    if side in ("right", "full"):
        out["v"] = vh[:r, :].contiguous()
    return out


def random_basis(shape: tuple[int, int], rank: int, side: str, seed: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Basis:
    """A uniformly random orthonormal basis (QR of a Gaussian matrix, signs fixed), drawn on the CPU from
    ``seed`` so that it is the same on every device and after a resume."""
    gen = torch.Generator().manual_seed(int(seed))
    out = {}
    for key, (rows, cols) in basis_shapes(shape, rank, side).items():
        tall = (rows, cols) if key == "u" else (cols, rows)
        q, r = torch.linalg.qr(torch.randn(tall, generator=gen, dtype=torch.float64))
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))
        q = q if key == "u" else q.t()
        out[key] = q.to(device=device, dtype=_svd_dtype(dtype)).contiguous()
    return out


def refresh_basis(grad: Tensor, rank: int, side: str, previous: Basis | None, seed: int) -> Basis:
    """``svd_basis`` with a documented fallback when LAPACK/cuSOLVER does not converge
    (``LinAlgError``, GaLore issues #26/#58): keep the ``previous`` basis, or draw a random orthonormal one
    (from ``seed``) on the first refresh; a ``RuntimeWarning`` says so."""
    try:
        return svd_basis(grad, rank, side)
    except torch.linalg.LinAlgError as err:
        warnings.warn(f"SVD of a {tuple(grad.shape)} gradient did not converge ({err}); "
                      f"{'keeping the previous subspace' if previous else 'using a random orthonormal subspace'}",
                      RuntimeWarning, stacklevel=3)
        if previous:
            return previous
        return random_basis(tuple(grad.shape), rank, side, seed, grad.device, grad.dtype)


COORDINATE_AXES = ("rows", "cols", "entries")


def coordinate_basis(shape: tuple[int, int], count: int, axis: str, seed: int,
                     device: torch.device | str = "cpu") -> Basis:
    """A random subset of ``count`` rows (``axis="rows"``), columns (``"cols"``) or entries of the
    flattened matrix (``"entries"``), sorted, drawn from ``seed`` on the CPU without replacement."""
    size = {"rows": shape[0], "cols": shape[1], "entries": shape[0] * shape[1]}[axis]
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(size, generator=gen)[:min(count, size)].sort().values
    return {axis: idx.to(device)}


def project(grad: Tensor, basis: Basis) -> Tensor:
    """``R``: the coordinates of ``grad`` in the subspace (a new tensor in the basis dtype)."""
    if "rows" in basis:
        return grad.index_select(0, basis["rows"])
    if "cols" in basis:
        return grad.index_select(1, basis["cols"])
    if "entries" in basis:
        return grad.reshape(-1).index_select(0, basis["entries"])
    g = grad.to(next(iter(basis.values())).dtype)
    if "u" in basis:
        g = basis["u"].t() @ g
    if "v" in basis:
        g = g @ basis["v"].t()
    return g


def project_back(low: Tensor, basis: Basis, shape: tuple[int, int], scale: float = 1.0) -> Tensor:
    """``scale ×`` the full-size tensor whose projection is ``low`` (zero outside the subspace)."""
    if "entries" in basis:
        full = low.new_zeros(shape[0] * shape[1]).index_copy_(0, basis["entries"], low).view(shape)
    elif "rows" in basis or "cols" in basis:
        dim, idx = (0, basis["rows"]) if "rows" in basis else (1, basis["cols"])
        full = low.new_zeros(shape).index_copy_(dim, idx, low)
    else:
        full = low
        if "u" in basis:
            full = basis["u"] @ full
        if "v" in basis:
            full = full @ basis["v"]
    return full if scale == 1.0 else full.mul_(scale)


def change_of_basis(old: Basis, new: Basis) -> dict[str, Tensor]:
    """The ``r × r`` maps taking state coordinates from ``old`` to ``new`` (``uₙᵀuₒ``, ``vₒvₙᵀ``)."""
    out = {}
    if "u" in new:
        out["u"] = new["u"].t() @ old["u"]
    if "v" in new:
        out["v"] = old["v"] @ new["v"].t()
    return out


def reproject(state: Tensor, maps: dict[str, Tensor], squared: bool = False) -> Tensor:
    """Carry a state tensor across a subspace change: ``C_u M C_v`` for a first moment; with ``squared``
    the elementwise squares of the maps (exact for permutations and sign flips of the basis, an
    approximation otherwise — a second moment is not a linear quantity)."""
    out = state
    if "u" in maps:
        out = (maps["u"].square() if squared else maps["u"]) @ out
    if "v" in maps:
        out = out @ (maps["v"].square() if squared else maps["v"])
    return out.clamp_min_(0) if squared else out


def orthonormality_error(basis: Basis) -> float:
    """``max ‖QᵀQ − I‖_max`` over the basis matrices (a test and diagnostic helper)."""
    errs = [0.0]
    for key, q in basis.items():
        if key in ("u", "v"):
            q = q if key == "u" else q.t()
            errs.append(float((q.t() @ q - torch.eye(q.shape[1], dtype=q.dtype, device=q.device)).abs().max()))
    return max(errs)


__all__ = ["PROJ_TYPES", "projection_side", "effective_rank", "projected_shape", "basis_shapes", "svd_basis",
           "random_basis", "refresh_basis", "coordinate_basis", "project", "project_back", "change_of_basis",
           "reproject", "orthonormality_error", "COORDINATE_AXES"]
