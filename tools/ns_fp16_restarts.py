"""fp16 Gram Newton–Schulz: orthogonality error per restart schedule, against standard bf16/fp16 (docs/speed.md,
"Newton–Schulz: Gram iteration").

    .venv/bin/python tools/ns_fp16_restarts.py [--shapes 256x1024 512x2048 256x2048 1024x256] [--presets ...]

For every preset, shape and input kind (Gaussian; ill-conditioned σ ∈ logspace(−4, 0) as in
tests/test_newton_schulz_gram.py; rows scaled by logspace(−6, 0) = a gradient with a huge dynamic range) prints
the relative Frobenius distance of the output to the float64 standard iteration (the exact polynomial) and to the
SVD polar factor U·Vᵀ, the output's σ range, and (Gram rows) the largest |entry| of every m×m product of the
iteration (Q, R, Z = bR + cR², …; fp16's largest finite value is 65504).  1 torch thread.
"""
from __future__ import annotations

import argparse
import time

import torch

from torchstep.ops.newton_schulz import _gram_iteration, newton_schulz, normalise, resolve_preset
from torchstep.ops.shapes import to_wide

F16_MAX = torch.finfo(torch.float16).max


def matrix(m: int, n: int, kind: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":
        return torch.randn(m, n, generator=g, dtype=torch.float64)
    if kind == "rows":
        return torch.logspace(-6, 0, m, dtype=torch.float64)[:, None] * torch.randn(m, n, generator=g,
                                                                                   dtype=torch.float64)
    k = min(m, n)
    U, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return U @ torch.diag(torch.logspace(-4, 0, k, dtype=torch.float64)) @ V.T


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def gram_max_entry(G: torch.Tensor, preset: str, dtype: torch.dtype, restarts) -> float:
    """max |entry| over all GEMM outputs of the Gram iteration (Q, R, Z, R·W, W·R·W, the restart's X)."""
    p = resolve_preset(preset)
    X = normalise(to_wide(G)[0], p, dtype)           # the iteration's start, as newton_schulz
    peak = [0.0]

    def track(t):
        peak[0] = max(peak[0], float(t.float().abs().max()))
        return t

    _gram_iteration(X, 5, p, restarts, lambda *a: track(torch.mm(*a)), lambda *a, **k: track(torch.addmm(*a, **k)))
    return peak[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["256x1024", "512x2048", "256x2048", "1024x256"])
    ap.add_argument("--kinds", nargs="+", default=["gaussian", "illcond", "rows"])
    ap.add_argument("--presets", nargs="+", default=["quintic", "polar_express5"])
    ap.add_argument("--restarts", nargs="+", default=["none", "2", "3", "2,4"],
                    help="fp16 Gram schedules ('none' = no restart)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bf, hf = torch.bfloat16, torch.float16
    print("| preset | shape | input | iteration | ‖O − exact‖/‖exact‖ | ‖O − UVᵀ‖/‖UVᵀ‖ | σ(O) | max entry |")
    print("|---|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for shape in args.shapes:
            m, n = map(int, shape.split("x"))
            for kind in args.kinds:
                G64 = matrix(m, n, kind)
                G = G64.float()
                exact = newton_schulz(G64, preset=preset, compute_dtype=torch.float64)
                U, _, Vh = torch.linalg.svd(G64, full_matrices=False)
                polar = U @ Vh
                runs = [("standard bf16", dict(compute_dtype=bf), None),
                        ("standard fp16", dict(compute_dtype=hf), None),
                        ("gram bf16 (2,4)", dict(compute_dtype=bf, method="gram", restarts=(2, 4)), (bf, (2, 4)))]
                for r in args.restarts:
                    rs = () if r == "none" else tuple(int(x) for x in r.split(","))
                    runs.append((f"gram fp16 {rs}", dict(compute_dtype=hf, method="gram", restarts=rs), (hf, rs)))
                for label, kw, gram in runs:
                    t = time.perf_counter()
                    O = newton_schulz(G, preset=preset, **kw)
                    s = torch.linalg.svdvals(O.double())
                    peak = f"{gram_max_entry(G, preset, *gram):.3g}" if gram else "–"
                    finite = bool(torch.isfinite(O).all())
                    print(f"| {preset} | {shape} | {kind} | {label} | {rel(O, exact):.4f} | {rel(O, polar):.4f} | "
                          f"[{float(s.min()):.3f}, {float(s.max()):.3f}]{'' if finite else ' NON-FINITE'} | {peak} |"
                          f"  <!-- {time.perf_counter() - t:.1f}s -->", flush=True)


if __name__ == "__main__":
    main()
