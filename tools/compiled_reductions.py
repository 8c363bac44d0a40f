"""Why the compiled AdamP / SGDP / Stable-SPAM steps sit above their traffic floors (docs/speed.md#compiled-steps).

Two measurements, 1 torch thread, on the speed benchmark's parameter shapes, medians of interleaved rounds:

1. **Bandwidth of the loops Inductor generates** — a streaming update (``θ += a·g``) against full-tensor
   and per-row reductions (Inductor's C++, and torch's eager kernels for the same reductions), as GB/s of
   fp32 arrays read + written.  The traffic floor counts passes as if every pass ran at the streaming
   rate; a reduction pass that runs slower is the part of the gap no fusion removes.
2. **``ops.materialise`` on and off** — the compiled step (``nonfinite="ignore"``) of each method whose
   update consumes per-row / per-tensor coefficients, with ``materialise`` as shipped and replaced by the
   identity (the coefficient expression then inlined into the update loop), each × fused AdamW timed in
   the same rounds::

    python tools/compiled_reductions.py [--rounds 5] [--methods sgdp adamp stablespam]
"""
import argparse
import contextlib
import statistics
import time

import torch
from tabulate import tabulate

import torchstep.ops.spike
import torchstep.optim.adamp
import torchstep.optim.spam
from torchstep.bench.arms import ARMS
from torchstep.bench.speed import SHAPES, _interleaved, _params

#: the modules whose kernels call ``materialise`` (patched to the identity for the "off" rows)
_USERS = (torchstep.optim.adamp, torchstep.optim.spam, torchstep.ops.spike)


def _loops():
    """label → (function of (θs, gs, bs), fp32 array passes it makes)."""
    def axpy(P, G, B):
        for p, g in zip(P, G):
            p.add_(g, alpha=1e-9)

    def full_sum(P, G, B):
        return [g.sum() for g in G]

    def full_absmax(P, G, B):
        return [g.abs().amax() for g in G]

    def row_dot(P, G, B):
        return [torch.linalg.vecdot(g, p, dim=-1) for p, g in zip(P, G)]

    def sgdp_reductions(P, G, B):   # SGDP's reduction pass: ⟨u,θ⟩ ⟨g,θ⟩ ‖g‖ ‖θ‖ per row, u = 0.9 b + g
        out = []
        for p, g, b in zip(P, G, B):
            u = 0.9 * b + g
            out.append((torch.linalg.vecdot(u, p, dim=-1), torch.linalg.vecdot(g, p, dim=-1),
                        torch.linalg.vector_norm(g, dim=-1), torch.linalg.vector_norm(p, dim=-1)))
        return out

    compiled = {"streaming θ += a·g": (axpy, 3), "full sum(g)": (full_sum, 1), "full max|g|": (full_absmax, 1),
                "row ⟨g,θ⟩": (row_dot, 2), "SGDP's four row reductions": (sgdp_reductions, 3)}
    rows = {f"Inductor {k}": (torch.compile(f, fullgraph=True), n) for k, (f, n) in compiled.items()}
    rows.update({f"eager {k}": (compiled[k][0], compiled[k][1]) for k in ("full sum(g)", "full max|g|", "row ⟨g,θ⟩")})
    return rows


def bandwidth(rounds: int, reps: int = 10) -> list[list]:
    tensors = [_params(seed, shapes=[s for s in SHAPES if len(s) == 2])[0] for seed in range(3)]
    P, G, B = ([t.detach() for t in ts] for ts in tensors)
    n_bytes = sum(p.numel() for p in P) * 4
    loops = _loops()
    for fn, _ in loops.values():
        fn(P, G, B)   # compile outside the timing
    times = {k: [] for k in loops}
    for _ in range(rounds):
        for label, (fn, _) in loops.items():
            for _ in range(reps):
                start = time.perf_counter()
                fn(P, G, B)
                times[label].append(time.perf_counter() - start)
    return [[label, passes, f"{statistics.median(times[label]) * 1e3:.2f}",
             f"{passes * n_bytes / statistics.median(times[label]) / 1e9:.1f}"]
            for label, (_, passes) in loops.items()]


@contextlib.contextmanager
def _materialise_off(off: bool):
    if not off:
        yield
        return
    saved = [m.materialise for m in _USERS]
    for m in _USERS:
        m.materialise = lambda t: t
    try:
        yield
    finally:
        for m, fn in zip(_USERS, saved):
            m.materialise = fn


class _Patched:
    """An optimizer whose every step runs with ``materialise`` on or off (dynamo re-checks globals each call)."""

    def __init__(self, opt, off: bool) -> None:
        self.opt, self.off = opt, off

    def step(self):
        with _materialise_off(self.off):
            return self.opt.step()


def materialise_effect(methods: list[str], rounds: int) -> list[list]:
    setups = {}
    params, grads = _params()
    setups["fused"] = (torch.optim.AdamW(params, fused=True, lr=1e-3, weight_decay=1e-2), params, grads)
    for name in methods:
        for off in (False, True):
            params, grads = _params()
            opt = _Patched(ARMS[name].make(params, ARMS[name].default_lr, compile=True, nonfinite="ignore"), off)
            opt.step()    # compile outside the timing
            setups[(name, off)] = (opt, params, grads)
    times = _interleaved(setups, rounds, 20, 2)
    fused = statistics.median(times["fused"])
    rows = []
    for name in methods:
        on, off = (statistics.median(times[(name, o)]) for o in (False, True))
        rows.append([name, f"{off:.2f}", f"{off / fused:.2f}", f"{on:.2f}", f"{on / fused:.2f}"])
    return rows + [["torch AdamW (fused)", f"{fused:.2f}", "1.00", "", ""]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=["sgdp", "adamp", "stablespam"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(tabulate(bandwidth(args.rounds), headers=["loop (2-D tensors of the benchmark)", "fp32 passes", "ms",
                                                     "GB/s"], tablefmt="github"))
    print()
    print(tabulate(materialise_effect(args.methods, args.rounds),
                   headers=["compiled step, nonfinite=ignore", "materialise off: ms", "× fused",
                            "materialise on: ms", "× fused"], tablefmt="github"))


if __name__ == "__main__":
    main()
