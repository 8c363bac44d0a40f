"""Hessian spectrum tools (reference card: diagnostics.md §2): Hessian- and Gauss–Newton-vector products of any
model under the package convention (``loss_fn(model(inputs), targets)``, data = one batch or a list of batches),
top-k eigenvalues by deflated power iteration and by Lanczos, Hutchinson's trace with a confidence interval,
stochastic Lanczos quadrature (SLQ) spectral densities and Sagun et al.'s bulk-plus-outliers summary.

Conventions (card §0):

* **Reduction.**  ``reduction="mean"`` (default) says ``loss_fn`` averages over the examples of a batch; the
  operator is then the curvature of the mean loss over *all* the data, ``H = Σ_b n_b H_b / Σ_b n_b`` (PyHessian's
  data-loader weighting).  ``reduction="sum"`` says ``loss_fn`` sums over examples; the operator is then that of
  the total sum ``Σ_b H_b`` (``N`` times the mean-loss curvature: divide by ``N`` to compare with mean-reduced
  numbers — the edge-of-stability code sums and divides by ``n``, i.e. reports the mean).
* **Mode.**  ``mode="eval"`` (default, as PyHessian) evaluates the model in eval mode; ``mode="train"`` in train
  mode, where BatchNorm normalises with the batch statistics but its running statistics are left untouched (no
  side effects).  Dropout in train mode makes every product use fresh masks, i.e. a random operator.  The modules'
  own train/eval flags are restored after every product.
* **"Top" eigenvalue = largest algebraic** (the sharpness that stability thresholds such as ``2/η`` are about).
  ``which="magnitude"`` ranks by ``|λ|`` — what PyHessian's power iteration and the edge-of-stability code's
  ``eigsh(which="LM")`` return; there a large *negative* eigenvalue silently becomes the "sharpness".
* **Randomness.**  Every estimator takes ``generator`` (a ``torch.Generator``; ``None`` = torch's global RNG).
* **Vectors** are flat, in ``model.named_parameters()`` order over the trainable (``requires_grad``) parameters,
  in the parameters' dtype (use float32/float64 models: Lanczos in bf16 is meaningless).

Costs below: one *product* = one pass over all the data (per batch: an HVP ≈ 2–3 gradients, or a GGN product = one
JVP + one VJP).  Timings (min–median of 7–50 repeats) were measured on this project's CPU machine, one thread,
float64, shared with other jobs (load ≈ 0.8 on 2 cores), for the **reference model**: ``Linear(10, 32) → tanh →
Linear(32, 3)`` (P = 451 parameters), cross-entropy, one batch of 64.  At this size torch.func's fixed per-call cost
dominates (a plain gradient takes 0.3 ms); the first torch.func call of a process also imports ``torch._dynamo``
(≈ 2 s once).

Parity (tests): HVP and GGN-vp agree with BackPACK 1.7.1's ``hessian_vector_product`` /
``ggn_vector_product_from_plist`` to 1e-10, Hutchinson's trace and the SLQ density with curvlinops 3.0.1's
``hutchinson_trace`` / ``lanczos_approximate_spectrum`` on the same probe and start vectors.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from ..ops.hessian import _probe
from .monitor import LossFn

_WHICH = {"algebraic": "algebraic", "LA": "algebraic", "magnitude": "magnitude", "LM": "magnitude"}


# ----------------------------------------------------------------------------------------------- operators
class Operator:
    """A symmetric linear operator on flat vectors: ``op @ v``; ``dim``, ``dtype``, ``device``; ``matvecs`` counts
    the products applied so far (every product is checked finite: ValueError otherwise).  :class:`CurvatureOperator`
    is the model one; a square tensor is wrapped as one (:func:`as_operator`; a dense product, no model pass)."""

    dim: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self) -> None:
        self.matvecs = 0

    def _matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"Invalid vector shape {tuple(v.shape)} (valid: ({self.dim},))")
        out = self._matvec(v)
        self.matvecs += 1
        if not bool(torch.isfinite(out).all()):
            raise ValueError("Non-finite curvature-vector product (NaN/Inf in the loss, the model or the vector)")
        return out


class _DenseOperator(Operator):
    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"Invalid matrix shape {tuple(matrix.shape)} (valid: a square 2-D tensor)")
        self.matrix, self.dim, self.dtype, self.device = matrix, matrix.shape[0], matrix.dtype, matrix.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self.matrix @ v


class _ScaledOperator(Operator):
    """``v ↦ d ⊙ A(d ⊙ v)``: the symmetric form ``D^{1/2} A D^{1/2}`` of a diagonally preconditioned operator."""

    def __init__(self, op: Operator, d: Tensor) -> None:
        super().__init__()
        self.op, self.d, self.dim, self.dtype, self.device = op, d, op.dim, op.dtype, op.device

    def _matvec(self, v: Tensor) -> Tensor:
        return self.d * (self.op @ (self.d * v))


def as_operator(A: Operator | Tensor) -> Operator:
    """``A`` itself if it is an :class:`Operator`, a square tensor wrapped as one (dense products)."""
    if isinstance(A, Operator):
        return A
    if isinstance(A, Tensor):
        return _DenseOperator(A)
    raise TypeError(f"Invalid operator {type(A).__name__} (valid: a torchstep Operator or a square tensor)")


def _is_batch(data: Any) -> bool:
    """A tuple, or a list whose first entry is not itself a batch (a DataLoader's ``[inputs, targets]``)."""
    return isinstance(data, tuple) or (isinstance(data, list) and len(data) == 2
                                       and not isinstance(data[0], (list, tuple)))


def _batch_size(inputs: Any, targets: Any) -> int:
    for x in (targets, inputs):
        if isinstance(x, Tensor) and x.ndim >= 1:
            return x.shape[0]
    return len(inputs)


@contextlib.contextmanager
def diagnostic_mode(model: nn.Module, mode: str):
    """Run a diagnostic with ``model`` in ``mode`` (``"eval"`` / ``"train"``) and every flag restored after,
    per module.  In train mode BatchNorm uses batch statistics without updating its buffers (torch.func cannot
    mutate them, and a diagnostic should not).  Attention runs on the math SDPA kernel: the fused CPU / flash
    kernels have no double-backward or forward-mode derivative (HVPs and JVPs through a Transformer need it)."""
    if mode not in ("eval", "train"):
        raise ValueError(f"Invalid mode: {mode!r} (valid range: 'eval' or 'train')")
    flags = [(m, m.training) for m in model.modules()]
    norms = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    model.train(mode == "train")
    if mode == "train":  # batch statistics, no in-place running-stat update (also illegal inside torch.func)
        for m, _ in norms:
            m.track_running_stats = False
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        for m, track in norms:
            m.track_running_stats = track


def _rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_states(states: tuple, device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state(states[1], device)


class CurvatureOperator(Operator):
    """``v ↦ H v`` (``curvature="hessian"``) or ``v ↦ G v`` (``"ggn"``) for a model's loss over fixed data.

    ``H`` is the Hessian of the full-data loss w.r.t. the trainable parameters; ``G = Σ J_bᵀ Λ_b J_b`` (size-weighted
    like ``H``) the generalised Gauss–Newton matrix with ``J_b = ∂ model(inputs_b)/∂θ`` and ``Λ_b`` the Hessian of
    ``loss_fn(·, targets_b)`` w.r.t. the model outputs (cross-entropy: ``diag(p) − ppᵀ`` per example, over the
    batch size for a mean loss; ``½‖z − y‖²``: ``I``).  ``G`` is PSD for convex losses; ``H = G`` for linear models.

    Args:
        model: any ``nn.Module``; ``outputs = model(inputs)``.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar (twice differentiable).
        data: one batch ``(inputs, targets)`` (a tuple, or a DataLoader's ``[inputs, targets]`` list) or a list /
            re-iterable (e.g. a ``DataLoader``, iterated once per product) of batches; a one-shot iterator is
            materialised.  Batches are weighted by their sizes (``targets.shape[0]``, else ``inputs.shape[0]``)
            under ``reduction="mean"``.
        curvature: ``"hessian"`` or ``"ggn"``.
        mode: ``"eval"`` or ``"train"`` (see the module docstring).
        reduction: ``"mean"`` or ``"sum"``: how ``loss_fn`` reduces over examples (module docstring).
        params: names (or the tensors) of the parameters to differentiate; default: every ``requires_grad`` one.
        hvp: ``"reverse"`` (default; ``torch.func.vjp`` of ``torch.func.grad`` — reverse-over-reverse, the double
            backward of PyHessian and the edge-of-stability code) or ``"forward"`` (``jvp`` of ``grad``,
            forward-over-reverse, the torch.func tutorial's form).  Equal results (tested); on the reference model
            1.8–2.0 ms against 3.2–4.1 ms per product (torch.func's per-call overhead), on a 100-512-512-10 tanh
            MLP with a batch of 256 both ≈ 61 ms (≈ 3 gradients of 21 ms).

    The operator reads the module's *current* parameters at every product.  Cost of one product: for the Hessian
    one HVP per batch (≈ 2–3 gradients), for the GGN one JVP + one VJP of the model per batch and an output-space
    HVP of the loss, no second derivatives of the network.  Measured per product on the reference model of the
    module docstring, operator overhead included: Hessian 1.8–2.0 ms (``hvp="reverse"``), GGN 3.3–3.9 ms.

    Raises:
        ValueError: the model has no trainable parameters, mixed parameter dtypes, ``loss_fn`` does not return a
            scalar, or a product is not finite.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Any, *, curvature: str = "hessian",
                 mode: str = "eval", reduction: str = "mean", params: Sequence[str | Tensor] | None = None,
                 hvp: str = "reverse") -> None:
        super().__init__()
        if curvature not in ("hessian", "ggn"):
            raise ValueError(f"Invalid curvature: {curvature!r} (valid range: 'hessian' or 'ggn')")
        if mode not in ("eval", "train"):
            raise ValueError(f"Invalid mode: {mode!r} (valid range: 'eval' or 'train')")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"Invalid reduction: {reduction!r} (valid range: 'mean' or 'sum')")
        if hvp not in ("reverse", "forward"):
            raise ValueError(f"Invalid hvp: {hvp!r} (valid range: 'reverse' or 'forward')")
        named = dict(model.named_parameters())
        if params is None:
            names = [n for n, p in named.items() if p.requires_grad]
        else:
            by_id = {id(p): n for n, p in named.items()}
            names = [q if isinstance(q, str) else by_id.get(id(q), "") for q in params]
            if not all(n in named for n in names):
                raise ValueError("Invalid params: every entry must name (or be) a parameter of the model")
        if not names:
            raise ValueError("The model has no trainable parameters (every parameter has requires_grad=False)")
        dtypes = {named[n].dtype for n in names}
        if len(dtypes) > 1:
            raise ValueError(f"Mixed parameter dtypes {sorted(map(str, dtypes))}: curvature vectors need one dtype")
        if _is_batch(data):
            data = [data]
        elif iter(data) is data:
            data = list(data)
        self.model, self.loss_fn, self.data, self.curvature = model, loss_fn, data, curvature
        self.mode, self.reduction, self.names, self.hvp = mode, reduction, names, hvp
        self.shapes = [named[n].shape for n in names]
        self.numels = [named[n].numel() for n in names]
        self.dim, self.dtype, self.device = sum(self.numels), named[names[0]].dtype, named[names[0]].device

    # -- flat <-> per-parameter
    def flatten(self, tensors: Sequence[Tensor] | dict[str, Tensor]) -> Tensor:
        if isinstance(tensors, dict):
            tensors = [tensors[n] for n in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, vector.split(self.numels), self.shapes)}

    def parameters(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    # -- per-batch pieces
    def _loss(self, params: dict[str, Tensor], inputs: Any, targets: Any) -> Tensor:
        return self._scalar(self.loss_fn(functional_call(self.model, params, (inputs,)), targets))

    @staticmethod
    def _scalar(loss: Any) -> Tensor:
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn must return a scalar tensor (got {shape}); reduce it with mean or sum")
        return loss

    def _accumulate(self, per_batch: Callable[[dict[str, Tensor], Any, Any], dict[str, Tensor]]) -> Tensor:
        params, total, count = self.parameters(), None, 0
        with diagnostic_mode(self.model, self.mode):
            for batch in self.data:
                inputs, targets = batch
                n = _batch_size(inputs, targets)
                out = self.flatten(per_batch(params, inputs, targets))
                w = n if self.reduction == "mean" else 1
                total = out * w if total is None else total.add_(out, alpha=w)
                count += n
        if total is None:
            raise ValueError("Empty data: no batch to evaluate")
        return total / count if self.reduction == "mean" else total

    def _matvec(self, v: Tensor) -> Tensor:
        tangent = self.unflatten(v.to(self.dtype))
        if self.curvature == "hessian":
            def per_batch(params, inputs, targets):
                gradient = grad(lambda p: self._loss(p, inputs, targets))
                if self.hvp == "forward":
                    return jvp(gradient, (params,), (tangent,))[1]
                return vjp(gradient, params)[1](tangent)[0]
        else:
            def per_batch(params, inputs, targets):
                def forward(p):
                    return functional_call(self.model, p, (inputs,))
                states = _rng_states(self.device)  # the same dropout masks in both forwards (train mode)
                outputs, jv = jvp(forward, (params,), (tangent,))
                _, hjv = jvp(grad(lambda o: self._scalar(self.loss_fn(o, targets))), (outputs,), (jv,))
                _set_rng_states(states, self.device)
                return vjp(forward, params)[1](hjv)[0]
        return self._accumulate(per_batch)

    def gradient(self) -> Tensor:
        """The flat gradient of the full-data loss (one gradient per batch; no product counted)."""
        return self._accumulate(lambda params, inputs, targets: grad(
            lambda p: self._loss(p, inputs, targets))(params))


def _apply(curvature: str, model: nn.Module, loss_fn: LossFn, data: Any, v: Tensor | Sequence[Tensor],
           kwargs: dict) -> Tensor | list[Tensor]:
    op = CurvatureOperator(model, loss_fn, data, curvature=curvature, **kwargs)
    flat = isinstance(v, Tensor) and v.ndim == 1 and v.numel() == op.dim
    out = op @ (v if flat else op.flatten(list(v)))
    return out if flat else list(op.unflatten(out).values())


def hessian_vector_product(model: nn.Module, loss_fn: LossFn, data: Any, v: Tensor | Sequence[Tensor],
                           **kwargs: Any) -> Tensor | list[Tensor]:
    """``H v`` for the full-data loss (see :class:`CurvatureOperator` for ``data``/``mode``/``reduction``/``params``).

    ``v`` is a flat vector (returns flat) or a list shaped like the trainable parameters (returns a list).
    Cost: one HVP per batch (``hvp="reverse"``: ``vjp`` of ``grad``; ``"forward"``: ``jvp`` of ``grad``), ≈ 2–3
    gradients; 1.8–2.0 ms (reverse) / 3.2–4.1 ms (forward) on the reference model (module docstring).  Equal to
    the dense ``torch.func.hessian`` product, to double backward and to BackPACK's ``hessian_vector_product`` to
    1e-10 (float64, tested)."""
    return _apply("hessian", model, loss_fn, data, v, kwargs)


def ggn_vector_product(model: nn.Module, loss_fn: LossFn, data: Any, v: Tensor | Sequence[Tensor],
                       **kwargs: Any) -> Tensor | list[Tensor]:
    """``G v = Σ_b w_b J_bᵀ Λ_b J_b v``, the generalised Gauss–Newton product (see :class:`CurvatureOperator`).

    Cost: one JVP + one VJP of the model and one output-space HVP of the loss per batch (two forwards, no second
    derivatives of the network); 3.3–3.9 ms on the reference model.  Equal to the dense ``JᵀΛJ v`` and to BackPACK's
    ``ggn_vector_product_from_plist`` to 1e-10 (float64, tested)."""
    return _apply("ggn", model, loss_fn, data, v, kwargs)


# ----------------------------------------------------------------------------------------- eigenvalues
class EigenResult(NamedTuple):
    """``values`` (k,) in the requested order, ``vectors`` (P, k) unit eigenvector estimates, ``residuals`` (k,)
    ``‖Av − λv‖``, ``matvecs`` products spent, ``converged`` whether every requested pair met the tolerance;
    ``ritz`` (Lanczos only) all final Ritz values, ascending: ``ritz[0]`` estimates λ_min from above."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    matvecs: int
    converged: bool
    ritz: Tensor | None = None


def _check_k(k: int, dim: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid k: {k!r} (valid range: an int >= 1)")
    if k > dim:
        raise ValueError(f"k = {k} is larger than the parameter count P = {dim}")


def _which(which: str) -> str:
    if which not in _WHICH:
        raise ValueError(f"Invalid which: {which!r} (valid range: 'algebraic' (= 'LA') or 'magnitude' (= 'LM'))")
    return _WHICH[which]


def _random_vector(dim: int, dtype: torch.dtype, device: torch.device, distribution: str,
                   generator: torch.Generator | None) -> Tensor:
    """A probe from :func:`torchstep.ops.hessian._probe`, drawn on the generator's device then moved."""
    where = generator.device if generator is not None else device
    return _probe(torch.empty(dim, dtype=dtype, device=where), distribution, generator).to(device)


def _orthogonalize(v: Tensor, basis: Tensor | None) -> Tensor:
    if basis is None or basis.shape[0] == 0:
        return v
    for _ in range(2):  # twice is enough (Kahan–Parlett)
        v = v - basis.T @ (basis @ v)
    return v


def _order(values: Tensor, which: str) -> Tensor:
    return torch.argsort(values.abs() if which == "magnitude" else values, descending=True, stable=True)


def _power_magnitude(matvec: Callable[[Tensor], Tensor], dim: int, k: int, dtype: torch.dtype,
                     device: torch.device, max_iter: int, tol: float, residual_tol: float | None,
                     generator: torch.Generator | None) -> tuple[list[float], list[Tensor], list[float], bool]:
    values, vectors, residuals, all_converged = [], [], [], True
    for _ in range(k):
        basis = torch.stack(vectors) if vectors else None
        v = _orthogonalize(_random_vector(dim, dtype, device, "gaussian", generator), basis)
        v = v / v.norm()
        lam, res, converged, vec = 0.0, float("inf"), False, v
        for it in range(max_iter):
            vec = v  # the vector whose Rayleigh quotient is returned (PyHessian returns one step past it)
            w = _orthogonalize(matvec(v), basis)
            new = float(v @ w)
            res = float((w - new * v).norm())
            converged = (it > 0 and abs(new - lam) <= tol * max(abs(lam), 1e-30)
                         and (residual_tol is None or res <= residual_tol * max(abs(new), 1e-30)))
            lam = new
            norm = w.norm()
            if converged or float(norm) == 0.0:
                converged = True
                break
            v = w / norm
        values.append(lam)
        vectors.append(vec)
        residuals.append(res)
        all_converged &= converged
    return values, vectors, residuals, all_converged


def power_eigenvalues(A: Operator | Tensor, k: int = 1, *, which: str = "algebraic", max_iter: int = 100,
                      tol: float = 1e-3, residual_tol: float | None = 1e-2,
                      generator: torch.Generator | None = None) -> EigenResult:
    """Top-``k`` eigenpairs by power iteration with deflation (PyHessian's ``eigenvalues()`` algorithm).

    Each eigenpair: iterate ``v ← Av/‖Av‖`` in the orthogonal complement of the pairs found so far (both ``v`` and
    ``Av`` are re-orthogonalised every iteration), stop when the Rayleigh quotient changes by less than
    ``tol``·|λ| (PyHessian's rule, default 1e-3) *and* the residual ``‖Av − λv‖`` is below ``residual_tol``·|λ|
    (``None`` = PyHessian's behaviour, no residual check); there is then an eigenvalue within the residual of λ.

    Power iteration converges to the largest ``|λ|``.  ``which="magnitude"`` returns exactly that (PyHessian's
    semantics).  ``which="algebraic"`` (default, the sharpness): runs the magnitude iteration first; if all ``k``
    values are ≥ 0 they are also the ``k`` largest algebraic ones (every other eigenvalue has a smaller ``|λ|``), else
    it reruns on ``A + ρI`` (ρ = the spectral radius just found, so the shifted spectrum is ≥ 0 with the same order)
    and subtracts ρ — about twice the cost, and slower where the shift compresses the gaps.  Repeated eigenvalues
    are found with their multiplicity (unlike single-vector Lanczos).

    Cost: ≤ ``max_iter`` products per eigenvalue (×2 in the shifted case) plus O(kP) memory; convergence rate
    ``|λ_{i+1}/λ_i|``.  Measured on the reference model (module docstring), defaults: top-1 in 0.03–0.04 s (16
    HVPs), top-3 in 0.12–0.23 s (105 HVPs).

    Raises:
        ValueError: ``k`` < 1 or larger than the parameter count, invalid ``which``, or a non-finite product.
    """
    op = as_operator(A)
    which = _which(which)
    _check_k(k, op.dim)
    start = op.matvecs
    args = (op.dim, k, op.dtype, op.device, max_iter, tol, residual_tol, generator)
    values, vectors, residuals, converged = _power_magnitude(lambda v: op @ v, *args)
    if which == "algebraic" and min(values) < 0:
        rho = max(abs(x) for x in values)
        values, vectors, residuals, converged = _power_magnitude(lambda v: op @ v + rho * v, *args)
        values = [x - rho for x in values]
    vals = torch.tensor(values, dtype=op.dtype)
    order = _order(vals, which)
    if not converged:
        warnings.warn(f"power iteration did not converge in max_iter={max_iter}", RuntimeWarning, stacklevel=2)
    return EigenResult(vals[order], torch.stack(vectors, 1)[:, order.to(op.device)],
                       torch.tensor(residuals, dtype=op.dtype)[order], op.matvecs - start, converged)


class _Krylov(NamedTuple):
    alphas: Tensor
    betas: Tensor
    basis: Tensor
    last_beta: float


def _tridiagonal(alphas: Tensor, betas: Tensor) -> Tensor:
    return torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)


def _lanczos(op: Operator, q: Tensor, steps: int, *, restart: bool, generator: torch.Generator | None,
             done: Callable[[Tensor, Tensor, float], bool] | None = None) -> _Krylov:
    """``steps`` Lanczos steps from ``q`` with full re-orthogonalisation (twice).  On an invariant subspace
    (β ≈ 0) it restarts from a fresh random vector orthogonal to the basis (PyHessian's rule, β = 0 entry) when
    ``restart``, else stops.  ``done(alphas, betas, next_beta)`` may stop it early."""
    basis = torch.empty(steps, op.dim, dtype=op.dtype, device=op.device)
    alphas, betas = [], []
    q = q / q.norm()
    scale, beta = 0.0, 0.0
    for j in range(steps):
        basis[j] = q
        w = op @ q
        alphas.append(float(q @ w))
        w = _orthogonalize(w, basis[:j + 1])
        beta = float(w.norm())
        scale = max(scale, abs(alphas[-1]), beta)
        a, b = torch.tensor(alphas, dtype=op.dtype), torch.tensor(betas, dtype=op.dtype)
        if j == steps - 1 or (done is not None and done(a, b, beta)):
            return _Krylov(a, b, basis[:j + 1], beta)
        if beta <= 1e-10 * max(scale, 1e-300):
            if not restart:
                return _Krylov(a, b, basis[:j + 1], 0.0)
            w = _orthogonalize(_random_vector(op.dim, op.dtype, op.device, "gaussian", generator), basis[:j + 1])
            beta, q = 0.0, w / w.norm()
        else:
            q = w / beta
        betas.append(beta)
    raise AssertionError("unreachable")


def lanczos_eigenvalues(A: Operator | Tensor, k: int = 1, *, which: str = "algebraic", max_steps: int = 100,
                        tol: float = 1e-6, v0: Tensor | None = None,
                        generator: torch.Generator | None = None) -> EigenResult:
    """Top-``k`` eigenpairs by Lanczos with full re-orthogonalisation (what ``scipy.sparse.linalg.eigsh`` /
    ARPACK does with implicit restarts; here one growing Krylov space of at most ``max_steps`` vectors).

    After every step the Ritz pairs of the tridiagonal matrix are formed; it stops when the ``k`` wanted ones have
    residual bounds ``|β_j s_{j,i}| = ‖Av − θv‖ ≤ tol·max|θ|`` (so an eigenvalue lies within that of each value,
    and typically within its square over the gap).  Lanczos approximates *both* ends of the spectrum at once, so
    ``which="algebraic"`` (default: the k largest values, the sharpness) and ``which="magnitude"`` (the k largest
    ``|λ|``: PyHessian's power iteration and the edge-of-stability code's ``eigsh(which="LM")``) cost the same.
    Prefer it to power iteration: for the same gap it converges far faster (Chebyshev acceleration — roughly
    power iteration with the square root of the relative gap).  Like every Krylov method it cannot see an
    eigenvector orthogonal to its start (hence random starts, and noise mixed into warm starts).  Caveat: a single
    Krylov space sees each *exactly repeated* eigenvalue once (a second copy only after a breakdown restart); use
    :func:`power_eigenvalues` (deflation) for repeated top eigenvalues.

    ``v0`` warm-starts (e.g. the previous top eigenvector); default a Gaussian vector from ``generator``.

    Cost: ≤ ``max_steps`` products, O(max_steps·P) memory for the basis and O(max_steps²·P) flops of
    re-orthogonalisation.  Measured on the reference model (module docstring), defaults (tol 1e-6): top-1 in
    0.05 s (17 HVPs), top-3 in 0.06–0.08 s (27 HVPs).

    Raises:
        ValueError: ``k`` < 1 or larger than the parameter count, invalid ``which``, or a non-finite product.
    """
    op = as_operator(A)
    which = _which(which)
    _check_k(k, op.dim)
    steps = min(op.dim, max(max_steps, k))
    start = op.matvecs

    def wanted(alphas: Tensor, betas: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        theta, s = torch.linalg.eigh(_tridiagonal(alphas, betas))
        idx = _order(theta, which)[:k]
        return theta[idx], s[:, idx], beta * s[-1, idx].abs(), theta

    def done(alphas: Tensor, betas: Tensor, beta: float) -> bool:
        if alphas.numel() < k:
            return False
        _, _, res, ritz = wanted(alphas, betas, beta)
        return bool((res <= tol * max(float(ritz.abs().max()), 1e-300)).all())

    q = v0.to(op.dtype) if v0 is not None else _random_vector(op.dim, op.dtype, op.device, "gaussian", generator)
    krylov = _lanczos(op, q, steps, restart=True, generator=generator, done=done)
    theta, s, res, ritz = wanted(krylov.alphas, krylov.betas, krylov.last_beta)
    converged = done(krylov.alphas, krylov.betas, krylov.last_beta) or krylov.basis.shape[0] == op.dim
    if not converged:
        warnings.warn(f"Lanczos did not converge to tol={tol} in {steps} steps", RuntimeWarning, stacklevel=2)
    vectors = krylov.basis.T @ s.to(op.device)
    return EigenResult(theta, vectors, res, op.matvecs - start, converged, ritz)


# ------------------------------------------------------------------------------------------ Hutchinson
class TraceEstimate(NamedTuple):
    """Hutchinson's ``tr A ≈ mean_r z_rᵀ A z_r``: ``value`` ± ``halfwidth`` is the ``confidence`` interval
    ``mean ± t_{m−1}·s/√m`` (``[low, high]``); ``stderr = s/√m``; ``samples`` the m values ``z_rᵀ A z_r``."""

    value: float
    low: float
    high: float
    halfwidth: float
    stderr: float
    confidence: float
    samples: Tensor
    matvecs: int


def _student_t_cdf_two_sided(theta: float, df: int) -> float:
    """``P(|T| ≤ t)`` for Student's t with integer ``df`` at ``θ = atan(t/√df)`` (Abramowitz & Stegun 26.7.3–4)."""
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = math.cos(theta), 0.0
        for j in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * j) / (2 * j + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for j in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * j - 1) / (2 * j)
    return s * total


def student_t_quantile(confidence: float, df: int) -> float:
    """``t`` with ``P(|T| ≤ t) = confidence`` for Student's t with ``df`` (an int ≥ 1) degrees of freedom
    (bisection on the closed-form CDF; equal to ``scipy.stats.t.ppf((1 + confidence)/2, df)`` to 1e-10, tested).
    Cost: O(df) per bisection step, no products: 0.5 ms at df = 99, 63 ms at df = 9,999."""
    if not 0 < confidence < 1:
        raise ValueError(f"Invalid confidence: {confidence!r} (valid range: 0 < confidence < 1)")
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"Invalid df: {df!r} (valid range: an int >= 1)")
    lo, hi = 0.0, math.pi / 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _student_t_cdf_two_sided(mid, df) < confidence else (lo, mid)
        if hi - lo < 1e-15:
            break
    return math.sqrt(df) * math.tan((lo + hi) / 2)


def hutchinson_trace(A: Operator | Tensor, samples: int = 100, *, distribution: str = "rademacher",
                     confidence: float = 0.95, probes: Tensor | None = None,
                     generator: torch.Generator | None = None) -> TraceEstimate:
    """Hutchinson's trace estimate with a Student-t confidence interval.

    ``tr A ≈ (1/m) Σ_r z_rᵀ A z_r`` over ``m = samples`` probes with ``E[zzᵀ] = I`` — Rademacher (default; the
    lower variance: ``2Σ_{i≠j} A_ij²`` per probe, exact for a diagonal ``A``) or Gaussian (``2‖A‖_F²``), drawn as in
    :func:`torchstep.ops.hessian.hutchinson_diagonal`.  The interval is ``mean ± t_{m−1,(1+c)/2}·s/√m`` with ``s``
    the sample standard deviation (needs m ≥ 2; it is asymptotic: exact only for Gaussian sample values).
    ``probes`` (m, P) replaces the random draw (common random numbers across checkpoints; parity tests).

    Cost: m products, O(P) memory.  Measured on the reference model (module docstring): m = 100 in 0.20–0.24 s.

    Raises:
        ValueError: ``samples`` < 1, invalid distribution/confidence, or a non-finite product.
    """
    op = as_operator(A)
    if probes is None:
        if not isinstance(samples, int) or samples < 1:
            raise ValueError(f"Invalid samples: {samples!r} (valid range: an int >= 1)")
        if distribution not in ("rademacher", "gaussian"):
            raise ValueError(f"Invalid distribution: {distribution!r} (valid range: 'rademacher' or 'gaussian')")
        probes = torch.stack([_random_vector(op.dim, op.dtype, op.device, distribution, generator)
                              for _ in range(samples)])
    if probes.ndim != 2 or probes.shape[1] != op.dim:
        raise ValueError(f"Invalid probes shape {tuple(probes.shape)} (valid: (m, {op.dim}))")
    start, m = op.matvecs, probes.shape[0]
    values = torch.stack([z @ (op @ z) for z in probes.to(op.dtype)]).cpu()
    mean = float(values.mean())
    stderr = float(values.std() / math.sqrt(m)) if m > 1 else float("inf")
    half = student_t_quantile(confidence, m - 1) * stderr if m > 1 else float("inf")
    return TraceEstimate(mean, mean - half, mean + half, half, stderr, confidence, values, op.matvecs - start)


# ------------------------------------------------------------------------------------------------- SLQ
class SpectralDensity(NamedTuple):
    """Smoothed spectral density ``φ(λ) = (1/R) Σ_r Σ_j w_rj N(λ; θ_rj, σ²)`` on ``grid`` (an estimate of the
    normalised density ``(1/P) Σ_i δ(λ − λ_i)``).  ``nodes``/``weights`` (R, m): the Gauss-quadrature nodes
    (Ritz values) and weights (squared first components of the Ritz vectors; each run's sum to 1; zero-padded
    when a run broke down early); ``sigma`` the Gaussian's standard deviation; ``dim`` = P."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    dim: int
    matvecs: int

    def expectation(self, f: Callable[[Tensor], Tensor] | None = None) -> float:
        """Quadrature estimate of ``(1/P) tr f(A)`` (default ``f(λ) = λ``: ``tr A / P``); times ``dim`` for the
        trace.  Per run ``Σ_j w_j f(θ_j) = q1ᵀ f(A) q1`` exactly for polynomials of degree < 2m."""
        values = self.nodes if f is None else f(self.nodes)
        return float((self.weights * values).sum(1).mean())


def spectral_density(A: Operator | Tensor, steps: int = 100, runs: int = 1, *, start: str | Tensor = "rademacher",
                     sigma: float | None = None, grid: Tensor | None = None, num_points: int = 1024,
                     margin: float = 0.05, kappa: float = 3.0,
                     generator: torch.Generator | None = None) -> SpectralDensity:
    """Stochastic Lanczos quadrature (Ghorbani et al. 2019 / PyHessian ``density()``; Papyan 2020's smoothing).

    Each of ``runs`` runs does ``m = min(steps, P)`` Lanczos steps with full re-orthogonalisation from
    ``q1 = z/‖z‖`` (``start``: ``"rademacher"`` as PyHessian, ``"gaussian"`` as curvlinops, or an (R, P) tensor of
    start vectors), eigendecomposes the tridiagonal ``T_m`` with a *symmetric* solver (PyHessian's repo uses a
    general one; pip ``pyhessian`` 0.1 calls the removed ``torch.eig``), and takes nodes ``θ_j`` and weights
    ``τ_j²`` (first components²).  A run that reaches an invariant subspace stops there (its quadrature is then
    exact; PyHessian's restart adds only zero-weight nodes).  The density is the average of Gaussian bumps.

    Smoothing: ``sigma`` (a standard deviation in eigenvalue units); default Papyan's rule (as curvlinops):
    ``σ = w(1 + 2·margin)/((m − 1)·√(8 ln κ))`` with ``w`` the node range — a resolution tied to ``m``, since m
    quadrature nodes cannot resolve finer.  PyHessian's choice is ``sigma = sqrt(1e-5·max(1, w))`` (its
    ``sigma_squared`` is a variance scaled by the range); that is also the fallback when ``w = 0`` or ``m = 1``.
    ``grid`` default: ``num_points`` points over the node range padded by ``max(margin·w, 6σ)`` on each side, so the
    density integrates to 1 up to ~1e-9 (no renormalisation; PyHessian renormalises).

    Mean: ``∫λφ = expectation()``, an unbiased estimate of ``tr A / P`` (exact for a diagonal ``A`` with Rademacher
    starts).  Cost: ``runs × m`` products, O(m·P) memory per run and O(m²P) re-orthogonalisation flops.  Measured
    on the reference model (module docstring): m = 50, 1 run, 1,024 grid points in 0.12–0.20 s.

    Raises:
        ValueError: invalid steps/runs/start/sigma, or a non-finite product.
    """
    op = as_operator(A)
    if not isinstance(steps, int) or steps < 1 or not isinstance(runs, int) or runs < 1:
        raise ValueError(f"Invalid steps/runs: {steps!r}/{runs!r} (valid range: ints >= 1)")
    if isinstance(start, Tensor):
        if start.ndim != 2 or start.shape[1] != op.dim:
            raise ValueError(f"Invalid start shape {tuple(start.shape)} (valid: (runs, {op.dim}))")
        starts = list(start.to(op.dtype))
    elif start in ("rademacher", "gaussian"):
        starts = [_random_vector(op.dim, op.dtype, op.device, start, generator) for _ in range(runs)]
    else:
        raise ValueError(f"Invalid start: {start!r} (valid range: 'rademacher', 'gaussian' or a (runs, P) tensor)")
    m = min(steps, op.dim)
    begin, all_nodes, all_weights = op.matvecs, [], []
    for q in starts:
        krylov = _lanczos(op, q, m, restart=False, generator=generator)
        theta, s = torch.linalg.eigh(_tridiagonal(krylov.alphas, krylov.betas))
        pad = m - theta.numel()
        all_nodes.append(torch.cat([theta, theta[-1:].expand(pad)]))
        all_weights.append(torch.cat([s[0] ** 2, s.new_zeros(pad)]))
    nodes, weights = torch.stack(all_nodes), torch.stack(all_weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = hi - lo
    if sigma is None:
        sigma = (width * (1 + 2 * margin) / ((m - 1) * math.sqrt(8 * math.log(kappa))) if m > 1 and width > 0
                 else math.sqrt(1e-5 * max(1.0, width)))
    if not sigma > 0:
        raise ValueError(f"Invalid sigma: {sigma!r} (valid range: > 0)")
    if grid is None:
        pad = max(margin * width, 6 * sigma)
        grid = torch.linspace(lo - pad, hi + pad, num_points, dtype=nodes.dtype)
    grid = grid.to(nodes.dtype)
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi) * nodes.shape[0])
    for theta, w in zip(nodes, weights):
        density += (w[:, None] * torch.exp(-0.5 * ((grid[None, :] - theta[:, None]) / sigma) ** 2)).sum(0) * norm
    return SpectralDensity(grid, density, nodes, weights, float(sigma), op.dim, op.matvecs - begin)


def plot_spectral_density(result: SpectralDensity, ax: Any = None, *, log: bool = True, **kwargs: Any) -> Any:
    """Plot a :class:`SpectralDensity` with matplotlib (imported here, lazily); ``log=True`` uses a log density
    axis as in PyHessian's figures (the bulk near 0 dwarfs the outliers otherwise).  Returns the axes.  Cost: no
    products; the first call imports matplotlib (≈ 0.4 s), then ≈ 9 ms."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots()
    density = result.density.detach().cpu()
    ax.plot(result.grid.detach().cpu(), density.clamp_min(1e-12) if log else density, **kwargs)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    return ax


# ------------------------------------------------------------------------------------ bulk + outliers
class BulkOutliers(NamedTuple):
    """``outliers`` (descending), their count ``n_outliers``, ``bulk_edge`` (the largest non-outlier value),
    ``gap`` (outlier/bulk ratio at the split, or ``nan`` with an explicit threshold) and ``num_classes`` C; the usual
    readings compare ``n_outliers`` with C (Sagun et al.), C − 1 or C(C − 1) (Papyan 2019, arXiv 1901.08244)."""

    outliers: Tensor
    n_outliers: int
    bulk_edge: float
    gap: float
    num_classes: int


def bulk_outliers(source: Operator | Tensor, num_classes: int, *, k: int | None = None,
                  threshold: float | None = None, rel_floor: float = 1e-2, generator: torch.Generator | None = None,
                  **lanczos_kwargs: Any) -> BulkOutliers:
    """Sagun et al.'s bulk-plus-outliers summary (arXiv 1706.04454): the spectrum is a bulk near 0 plus a few
    large outliers, whose number tracks the number of classes C (Papyan 2019 attributes C outliers to class means
    of logit gradients and C(C − 1) smaller ones to cross-class terms; exact counts vary with the model — e.g. the
    multinomial logistic regression at W = 0 has C(C − 1) equal outliers, tested).

    ``source``: the eigenvalues (1-D tensor), a dense symmetric matrix (2-D; all eigenvalues by ``eigvalsh``) or an
    operator (top ``k`` by :func:`lanczos_eigenvalues`, default ``k = min(P, C(C − 1) + C + 2)`` so that some bulk
    values are included; note Lanczos' caveat on exactly repeated eigenvalues).  Split: with ``threshold`` the
    outliers are the values above it; otherwise at the largest ratio ``λ_i/λ_{i+1}`` between consecutive values,
    each floored at ``rel_floor·λ_1`` (the bulk "near zero": without a floor a zero or tiny bulk value would always
    make the largest ratio).  Only the positive side is summarised; if ``λ_1 ≤ 0`` there is no outlier.  The rule
    needs some bulk values among the eigenvalues (else it splits inside the outliers).

    Cost: that of the eigenvalues (an operator: ≤ ``max_steps`` products, see :func:`lanczos_eigenvalues`);
    measured on the reference model (module docstring), C = 3, default k = 11: 0.29–0.32 s.
    """
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"Invalid num_classes: {num_classes!r} (valid range: an int >= 1)")
    if isinstance(source, Tensor) and source.ndim == 1:
        values = source
    elif isinstance(source, Tensor) and source.ndim == 2 and source.shape[0] == source.shape[1]:
        values = torch.linalg.eigvalsh(source)
    else:
        op = as_operator(source)
        k = min(op.dim, num_classes * (num_classes - 1) + num_classes + 2) if k is None else k
        values = lanczos_eigenvalues(op, k, generator=generator, **lanczos_kwargs).values
    values = torch.sort(values.detach().cpu().double(), descending=True).values
    if threshold is not None:
        n, gap = int((values > threshold).sum()), float("nan")
    elif values.numel() < 2 or float(values[0]) <= 0:
        n, gap = int((values > 0).sum()), float("nan")
    else:
        clamped = values.clamp_min(rel_floor * float(values[0]))
        ratios = clamped[:-1] / clamped[1:]
        n, gap = int(ratios.argmax()) + 1, float(ratios.max())
    edge = float(values[n]) if n < values.numel() else float("nan")
    return BulkOutliers(values[:n], n, edge, gap, num_classes)


__all__ = ["Operator", "CurvatureOperator", "as_operator", "hessian_vector_product", "ggn_vector_product",
           "EigenResult", "power_eigenvalues", "lanczos_eigenvalues", "TraceEstimate", "hutchinson_trace",
           "student_t_quantile", "SpectralDensity", "spectral_density", "plot_spectral_density", "BulkOutliers",
           "bulk_outliers"]
