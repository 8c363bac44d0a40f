"""Why the compiled AdamP / SGDP / Stable-SPAM steps sit above their traffic floors (docs/speed.md#compiled-steps).

Two tables from one run, 1 torch thread, the speed benchmark's parameter shapes, medians of interleaved rounds:

1. **Bandwidth of the loops Inductor generates** — a streaming update (``θ += a·g``) against full-tensor
   and per-row reductions (Inductor's C++; torch's eager ``sum`` for comparison), as GB/s of fp32 arrays
   read + written.  The traffic floor counts passes as if every pass ran at the streaming
   rate; a reduction pass that runs slower is the part of the gap no fusion removes.
2. **``ops.materialise`` on and off** — the compiled step (``nonfinite="ignore"``) of each method whose
   update consumes per-row / per-tensor coefficients, with ``materialise`` as shipped and replaced by the
   identity (the coefficient expression then inlined into the update loop), each × fused AdamW timed in
   the same rounds, next to the time its loops predict (:data:`COMPOSITION`: its streaming passes and
   reductions, each costed at the rate measured in 1.) plus its fixed per-step cost (the same optimizer on
   50 one-element tensors, timed in the same rounds)::

    python tools/compiled_reductions.py [--rounds 5] [--methods sgdp adamp stablespam]
"""
import argparse
import contextlib
import statistics

import torch
from tabulate import tabulate

import torchstep.ops.spike
import torchstep.optim.adamp
import torchstep.optim.spam
from torchstep.bench.arms import ARMS
from torchstep.bench.speed import SHAPES, TINY_SHAPES, _interleaved, _params

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
    rows["eager full sum(g) (torch's kernel)"] = compiled["full sum(g)"]
    return rows


class _Loop:
    """A loop of :func:`_loops` on fixed tensors, timed like an optimizer (``step()``)."""

    def __init__(self, fn, tensors) -> None:
        self.fn, self.tensors = fn, tensors
        fn(*tensors)   # compile outside the timing

    def step(self) -> None:
        self.fn(*self.tensors)


#: each method's compiled step as the loops above: (streaming passes of the update, arrays read by its
#: per-row reduction pass, its full-tensor reductions)
COMPOSITION = {"sgdp": (5, 3, ()),                 # θ g b → θ b; reads g b θ for ⟨u,θ⟩ ⟨g,θ⟩ ‖g‖ ‖θ‖ first
               "adamp": (7, 4, ()),                # θ g m v → θ m v; reads g m v θ for the four row statistics
               "stablespam": (7, 0, ("full max|g|", "full sum(g)"))}   # max|g|, then ‖clip(g)‖, then Adam


def predicted_ms(name: str, med: dict[str, float]) -> float:
    """The step time the loop table predicts: per streaming pass the streaming loop's ms / 3, per array read
    by a row reduction SGDP's reduction loop's ms / 3, plus each full-tensor reduction as timed."""
    update, row_reads, full = COMPOSITION[name]
    return (update * med["Inductor streaming θ += a·g"] / 3
            + row_reads * med["Inductor SGDP's four row reductions"] / 3
            + sum(med[f"Inductor {k}"] for k in full))


@contextlib.contextmanager
def _materialise_off():
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
        with _materialise_off() if self.off else contextlib.nullcontext():
            return self.opt.step()


def measure(methods: list[str], rounds: int) -> tuple[list[list], list[list]]:
    """Both tables from one interleaved run: the loops, fused AdamW, and per method its compiled step with
    ``materialise`` on / off and on 50 one-element tensors (its fixed cost)."""
    tensors = tuple([t.detach() for t in _params(seed, shapes=[s for s in SHAPES if len(s) == 2])[0]]
                    for seed in range(3))
    n_bytes = sum(p.numel() for p in tensors[0]) * 4
    loops = _loops()
    setups = {label: (_Loop(fn, tensors), [], []) for label, (fn, _) in loops.items()}
    params, grads = _params()
    setups["fused"] = (torch.optim.AdamW(params, fused=True, lr=1e-3, weight_decay=1e-2), params, grads)
    for name in methods:
        for off, shapes in ((False, None), (True, None), (False, TINY_SHAPES)):
            params, grads = _params(shapes=shapes)
            opt = _Patched(ARMS[name].make(params, ARMS[name].default_lr, compile=True, nonfinite="ignore"), off)
            opt.step()    # compile outside the timing
            setups[(name, off, shapes is None)] = (opt, params, grads)
    med = {key: statistics.median(v) for key, v in _interleaved(setups, rounds, 20, 2).items()}
    loop_rows = [[label, passes, f"{med[label]:.2f}", f"{passes * n_bytes / med[label] / 1e6:.1f}"]
                 for label, (_, passes) in loops.items()]
    fused, rows = med["fused"], []
    for name in methods:
        on, off, fixed = (med[key] for key in ((name, False, True), (name, True, True), (name, False, False)))
        predicted = f"{predicted_ms(name, med) + fixed:.2f}" if name in COMPOSITION else "–"
        rows.append([name, f"{off:.2f}", f"{off / fused:.2f}", f"{on:.2f}", f"{on / fused:.2f}", f"{fixed:.2f}",
                     predicted])
    return loop_rows, rows + [["torch AdamW (fused)", f"{fused:.2f}", "1.00", "", "", "", ""]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--methods", nargs="*", default=["sgdp", "adamp", "stablespam"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    loop_rows, step_rows = measure(args.methods, args.rounds)
    print(tabulate(loop_rows, headers=["loop (2-D tensors of the benchmark)", "fp32 passes", "ms", "GB/s"],
                   tablefmt="github"))
    print()
    print(tabulate(step_rows, headers=["compiled step, nonfinite=ignore", "materialise off: ms", "× fused",
                                       "materialise on: ms", "× fused", "fixed cost: ms",
                                       "predicted: loops + fixed, ms"], tablefmt="github"))


if __name__ == "__main__":
    main()
