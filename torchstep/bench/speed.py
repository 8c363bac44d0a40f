"""Step-time microbenchmark: ``optimizer.step()`` for every registered optimizer, CPU, 1 thread.

Protocol (``../shared/reference/benchmarking.md`` §5): a fixed set of parameter shapes with fixed
random gradients (restored before every step, untimed), warm-up steps excluded, candidates
interleaved over rounds so drift hits all of them alike, **median** ms per step reported with
ratios to ``torch.optim.AdamW`` (for-loop, foreach and fused) measured in the same run, and to the
same method in pip ``pytorch-optimizer`` when it is installed (its default execution path).

The candidates come from the one arms table, :data:`torchstep.bench.arms.ARMS`: every arm that is a
registered torchstep optimizer is timed as configured for the benchmark (``arm.make(params,
arm.default_lr)``), its ``arm.peer`` at the same lr.  Hybrid optimizers route the 1-D tensors to their
own AdamW fallback, so every candidate gets all of :data:`SHAPES`.

Run: ``torchstep bench speed [--rounds N] [--steps N] [--optimizers NAME ...] [--out FILE]``.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Any, Callable

import torch

from ..registry import SPECS
from .arms import ARMS

#: 24 matrices, 24 vectors and two large blocks: 3.3M parameters, a small transformer's mix
SHAPES = [(256, 256)] * 24 + [(256,)] * 24 + [(1024, 512)] * 2


def _params(seed: int = 0, shapes=None, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or SHAPES
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    grads = [(torch.randn(s, generator=g) * 1e-2).to(device) for s in shapes]
    for p, gr in zip(params, grads):
        p.grad = gr.clone()
    return params, grads


def candidates() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """label → builder: torch AdamW's three paths (the reference), then per registered arm of
    :data:`.arms.ARMS` ``torchstep NAME`` and, when pip ``pytorch-optimizer`` is installed and the arm names a
    peer, ``pytorch-optimizer NAME`` (same lr)."""
    adamw = dict(lr=1e-3, weight_decay=1e-2)
    out: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "torch AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, foreach=False, **adamw),
        "torch AdamW (foreach)": lambda ps: torch.optim.AdamW(ps, foreach=True, **adamw),
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, fused=True, **adamw),
    }
    try:
        import pytorch_optimizer as peer
    except ImportError:
        peer = None
    for name, arm in ARMS.items():
        if name not in SPECS:
            continue
        out[f"torchstep {name}"] = lambda ps, arm=arm: arm.make(ps, arm.default_lr)
        if peer is not None and arm.peer is not None:
            cls_name, kw = arm.peer
            out[f"pytorch-optimizer {name}"] = (lambda ps, c=getattr(peer, cls_name), kw=kw, lr=arm.default_lr:
                                                c(ps, lr=lr, **kw))
    return out


def measure(selected: list[str] | None, rounds: int, steps: int, warmup: int = 3, device: str = "cpu"
            ) -> dict[str, list[float]]:
    """Interleaved timing of :func:`candidates` (only the ``selected`` optimizers, plus torch AdamW, when
    given) on ``device``; returns per-step milliseconds for each candidate.  Sets torch to 1 thread."""
    torch.set_num_threads(1)
    builders = candidates()
    if selected:
        keep = set(selected)
        builders = {k: v for k, v in builders.items() if k.startswith("torch AdamW") or k.split()[-1] in keep}
    setups = {}
    for label, build in builders.items():
        params, grads = _params(device=device)
        setups[label] = (build(params), params, grads)
    return _interleaved(setups, rounds, steps, warmup)


def _sync(params: list[torch.Tensor]) -> None:
    """Wait for the device (CUDA kernels are asynchronous: time the work, not the launch)."""
    if params and params[0].device.type == "cuda":
        torch.cuda.synchronize(params[0].device)


def _interleaved(setups: dict[str, tuple], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Time ``opt.step()`` per candidate, candidates interleaved round by round; gradients restored untimed
    before every step (peers may clip ``.grad`` in place)."""
    times: dict[str, list[float]] = {label: [] for label in setups}
    for r in range(rounds):
        for label, (opt, params, grads) in setups.items():
            for _ in range(warmup if r == 0 else 0):
                opt.step()
            for _ in range(steps):
                for p, gr in zip(params, grads):
                    if p.grad is None:      # HeavyBall sets .grad to None after its step
                        p.grad = gr.clone()
                    else:
                        p.grad.copy_(gr)
                _sync(params)
                start = time.perf_counter()
                opt.step()
                _sync(params)
                times[label].append((time.perf_counter() - start) * 1e3)
    return times


def table(times: dict[str, list[float]]) -> list[list[Any]]:
    """Rows of :data:`HEADERS` from :func:`measure`'s times: median ms and ratios to torch AdamW and the peer."""
    med = {k: statistics.median(v) for k, v in times.items()}
    loop, fused = med["torch AdamW (for-loop)"], med["torch AdamW (fused)"]
    rows = []
    for label in med:
        if label.startswith("pytorch-optimizer"):
            continue
        name = label.split()[-1]
        peer = med.get(f"pytorch-optimizer {name}")
        rows.append([label, f"{med[label]:.2f}", f"{med[label] / loop:.2f}", f"{med[label] / fused:.2f}",
                     f"{peer:.2f}" if peer else "–", f"{med[label] / peer:.2f}" if peer else "–"])
    return rows


# ---------------------------------------------------------------------- compiled steps (compile=True)
#: HeavyBall (compile-first, pip ``heavyball``) classes for the arms it also implements: (class, kwargs)
HEAVYBALL = {"adamw": ("AdamW", {"betas": (0.9, 0.999), "eps": 1e-8}),
             "schedulefree-adamw": ("SFAdamW", {"betas": (0.9, 0.999), "eps": 1e-8})}


#: methods whose compiled row is also timed with nonfinite="mask" (every method gets an "ignore" row)
POLICY_ROWS = ("adamw", "lion")

#: The traffic floor of one step: the fewest full passes over parameter-sized fp32 arrays (reads + writes)
#: that the method's data dependencies allow, with every element-wise operation fused.  A reduction whose
#: result the update needs (a norm, a cosine, a max) forces one more read of its inputs before the update
#: pass.  Fused AdamW moves 7 (reads θ g m v, writes θ m v), so on a memory-bound CPU a method cannot beat
#: passes/7 × the fused step; the default ``nonfinite="skip"`` check reads g once more (+1).
MIN_PASSES = {
    "adamw": (7, "θ g m v → θ m v"),
    "lion": (5, "θ g m → θ m"),
    "adamp": (10, "θ g m v → m v + ⟨g,θ⟩ ‖g‖ ‖θ‖ ⟨u,θ⟩ (u needs the new m, v); then θ m v → θ"),
    "sgdp": (7, "θ g b → b + the four reductions; then θ b → θ"),
    "diffgrad": (9, "θ g m v g_prev → θ m v g_prev"),
    "sophiag": (6, "θ g m h → θ m"),
    "sophiah": (6, "θ g m h → θ m"),
    "spam": (7, "θ g m v → θ m v (the clip reads the old v element-wise)"),
    "stablespam": (9, "g → max|g|; g → ‖clip(g)‖; then θ g m v → θ m v"),
    "classp": (5, "θ g s → θ s"),
    "schedulefree-adamw": (7, "y z v g → y z v"),
    "schedulefree-sgd": (5, "y z g → y z"),
}


def _traffic_floor(name: str, checked: bool) -> float:
    """:data:`MIN_PASSES` over fused AdamW's, +1 pass when a finite check (``skip``/``mask``) reads g first."""
    return (MIN_PASSES.get(name, (float("nan"),))[0] + checked) / MIN_PASSES["adamw"][0]


class _CompiledTorchStep:
    """torch's recipe for a compiled optimizer: ``torch.compile(opt.step)`` (float lr: the benchmark never changes it)."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt, self.step = opt, torch.compile(opt.step)


def _emit(text: str, out: str | None) -> str:
    """Print a table's text and, with ``out``, also write it there (markdown)."""
    print(text)
    if out:
        with open(out, "w") as fh:
            fh.write(text + "\n")
    return text


def compiled_names() -> list[str]:
    """Registered arms whose rule has a compiled formulation (``compile=True`` accepted)."""
    return [name for name, arm in ARMS.items() if name in SPECS
            and getattr(getattr(SPECS[name].cls, "rule", None), "compilable", False)]


def compiled_candidates(selected: list[str] | None = None) -> dict[str, Callable[[list[torch.Tensor]], Any]]:
    """label → builder: torch AdamW fused and compiled (anchors), then per compilable arm the eager and
    ``compile=True`` torchstep optimizer, the pytorch-optimizer peer and the HeavyBall peer (same lr)."""
    out: dict[str, Callable[[list[torch.Tensor]], Any]] = {
        "torch AdamW (fused)": lambda ps: torch.optim.AdamW(ps, fused=True, lr=1e-3, weight_decay=1e-2),
        "torch AdamW (compiled)": lambda ps: _CompiledTorchStep(
            torch.optim.AdamW(ps, foreach=True, lr=1e-3, weight_decay=1e-2)),
    }
    try:
        import pytorch_optimizer as peer
    except ImportError:
        peer = None
    try:
        import heavyball
    except ImportError:
        heavyball = None
    for name in compiled_names():
        if selected and name not in selected:
            continue
        arm = ARMS[name]
        out[f"torchstep {name}"] = lambda ps, arm=arm: arm.make(ps, arm.default_lr)
        out[f"torchstep {name} (compiled)"] = lambda ps, arm=arm: arm.make(ps, arm.default_lr, compile=True)
        # what the default finite check costs: the unchecked policy (fused AdamW's semantics), and the sync-free
        for policy in ("mask", "ignore") if name in POLICY_ROWS else ("ignore",):
            out[f"torchstep {name} (compiled, nonfinite={policy})"] = (
                lambda ps, arm=arm, policy=policy: arm.make(ps, arm.default_lr, compile=True, nonfinite=policy))
        if peer is not None and arm.peer is not None:
            cls_name, kw = arm.peer
            out[f"pytorch-optimizer {name}"] = (lambda ps, c=getattr(peer, cls_name), kw=kw, lr=arm.default_lr:
                                                c(ps, lr=lr, **kw))
        if heavyball is not None and name in HEAVYBALL:
            cls_name, kw = HEAVYBALL[name]
            out[f"heavyball {name}"] = (lambda ps, c=getattr(heavyball, cls_name), kw=kw, arm=arm:
                                        c(ps, lr=arm.default_lr, weight_decay=arm.kwargs.get("weight_decay", 0.0),
                                          **kw))
    return out


#: the fixed per-step cost: the same 50 tensors with one element each (no memory traffic left to time)
TINY_SHAPES = [(1,)] * len(SHAPES)
TINY_ROWS = {"torch AdamW (fused), 50 one-element tensors":
             lambda ps: torch.optim.AdamW(ps, fused=True, lr=1e-3, weight_decay=1e-2),
             "torchstep adamw (compiled, nonfinite=ignore), 50 one-element tensors":
             lambda ps: ARMS["adamw"].make(ps, ARMS["adamw"].default_lr, compile=True, nonfinite="ignore"),
             "torchstep adamw (compiled), 50 one-element tensors":
             lambda ps: ARMS["adamw"].make(ps, ARMS["adamw"].default_lr, compile=True)}


def measure_compiled(selected: list[str] | None, rounds: int, steps: int, warmup: int = 3, device: str = "cpu"
                     ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Interleaved step times of :func:`compiled_candidates`, and each candidate's first-step seconds (for
    compiled ones: tracing + Inductor codegen + C++/Triton compile, timed with a fresh Inductor cache)."""
    import os
    import tempfile
    torch.set_num_threads(1)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="torchstep-speed-")   # a cold compile
    setups, first = {}, {}
    builds = [(label, build, None) for label, build in compiled_candidates(selected).items()]
    builds += [(label, build, TINY_SHAPES) for label, build in TINY_ROWS.items()]
    for label, build, shapes in builds:
        params, grads = _params(device=device, shapes=shapes)
        opt = build(params)
        _sync(params)
        start = time.perf_counter()
        opt.step()
        _sync(params)
        first[label] = time.perf_counter() - start
        setups[label] = (opt, params, grads)
    return _interleaved(setups, rounds, steps, max(0, warmup - 1)), first


COMPILED_HEADERS = ["method", "eager ms", "compiled ms", "compiled × AdamW fused", "traffic floor × fused",
                    "pytorch-optimizer ms",
                    "compiled speed-up vs pytorch-optimizer", "HeavyBall ms", "first compiled step s",
                    "compile pays off after (steps)"]


def compiled_table(times: dict[str, list[float]], first: dict[str, float]) -> list[list[Any]]:
    """One row per method: median ms eager / compiled, ratios to fused AdamW (same run) and to the peers,
    first-step seconds and the step count after which compiling pays off (compile time / time saved)."""
    med = {k: statistics.median(v) for k, v in times.items()}
    fused = med["torch AdamW (fused)"]
    rows = [["torch AdamW (fused)", "–", f"{fused:.2f}", "1.00", "1.00", "–", "–", "–",
             f"{first['torch AdamW (fused)']:.2f}", "–"],
            ["torch AdamW (torch.compile(step))", "–", f"{med['torch AdamW (compiled)']:.2f}",
             f"{med['torch AdamW (compiled)'] / fused:.2f}", "1.00", "–", "–", "–",
             f"{first['torch AdamW (compiled)']:.1f}", "–"]]
    for label in med:
        if label in TINY_ROWS:
            rows.append([label, "–", f"{med[label]:.2f}", "–", "–", "–", "–", "–", f"{first[label]:.1f}", "–"])
            continue
        if not (label.startswith("torchstep ") and "(compiled" in label):
            continue
        name = label.split()[1]
        if label.endswith("=mask)") or label.endswith("=ignore)"):
            policy = label.split("=")[1][:-1]
            floor = _traffic_floor(name, checked=policy == "mask")
            peer = med.get(f"pytorch-optimizer {name}")   # the peer checks nothing either: same semantics
            rows.append([f"{name}, nonfinite={policy}", "–", f"{med[label]:.2f}", f"{med[label] / fused:.2f}",
                         f"{floor:.2f}", "–", f"{peer / med[label]:.2f}" if peer and policy == "ignore" else "–",
                         "–", f"{first[label]:.1f}", "–"])
            continue
        eager, compiled = med[f"torchstep {name}"], med[label]
        peer, hb = med.get(f"pytorch-optimizer {name}"), med.get(f"heavyball {name}")
        saved = eager - compiled
        payoff = f"{(first[label] - first[f'torchstep {name}']) / saved * 1e3:.0f}" if saved > 0 else "never"
        floor = _traffic_floor(name, checked=True)        # the default skip check
        rows.append([name, f"{eager:.2f}", f"{compiled:.2f}", f"{compiled / fused:.2f}", f"{floor:.2f}",
                     f"{peer:.2f}" if peer else "–", f"{peer / compiled:.2f}" if peer else "–",
                     f"{hb:.2f}" if hb else "–", f"{first[label]:.1f}", payoff])
    return rows


def main_compiled(rounds: int = 3, steps: int = 30, optimizers: list[str] | None = None, out: str | None = None,
                  device: str = "cpu") -> str:
    """Print (and with ``out`` write) the compiled-step table (``torchstep bench speed --compiled``)."""
    from tabulate import tabulate
    times, first = measure_compiled(optimizers, rounds, steps, device=device)
    n_params = sum(torch.Size(s).numel() for s in SHAPES)
    text = (tabulate(compiled_table(times, first), headers=COMPILED_HEADERS, tablefmt="github")
            + f"\n\n{len(SHAPES)} tensors, {n_params / 1e6:.2f}M fp32 parameters; {rounds} interleaved rounds × "
              f"{steps} timed steps; 1 thread; torch {torch.__version__}; nonfinite='skip' (the default) for torchstep "
              f"unless the row says otherwise; "
              f"{platform.processor() or platform.machine()}")
    return _emit(text, out)


#: many same-shape matrices: where batched Newton–Schulz pays off
MATRIX_SHAPES = [(256, 256)] * 16 + [(256, 1024)] * 4


def muon_candidates() -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """label → builder for the Muon-family table: the arms' classes at lr 0.02 with their own defaults
    (``arm.build``, not the benchmark kwargs), against ``torch.optim.Muon``."""
    muon, lanton = ARMS["muon"].build, ARMS["lanton"].build
    return {"torch.optim.Muon (per matrix, bf16 NS5)": lambda ps: ARMS["torch-muon"].build(ps, lr=0.02),
            "torchstep Muon (batched, bf16 NS5)": lambda ps: muon(ps, lr=0.02, weight_decay=0.1),
            "torchstep Muon (batched, fp32 NS5)": lambda ps: muon(ps, lr=0.02, ns_dtype="float32"),
            "torchstep Muon (batched, Polar Express 5)": lambda ps: muon(ps, lr=0.02, ns_preset="polar_express5"),
            "torchstep NorMuon (batched, bf16 NS5)": lambda ps: ARMS["normuon"].build(ps, lr=0.02),
            "torchstep MuonPP (batched, bf16 NS5)": lambda ps: ARMS["muonpp"].build(ps, lr=0.02),
            "torchstep Lanton (bf16 NS5, nuclear-norm noise: SVD)": lambda ps: lanton(ps, lr=0.02),
            "torchstep Lanton (bf16 NS5, Frobenius noise bound)": lambda ps: lanton(ps, lr=0.02, noise_norm="frobenius")}


def measure_muon(rounds: int, steps: int, threads: int = 1, device: str = "cpu") -> dict[str, list[float]]:
    """Interleaved timing of :func:`muon_candidates` on :data:`MATRIX_SHAPES` with ``threads`` torch threads."""
    torch.set_num_threads(threads)
    setups = {}
    for label, build in muon_candidates().items():
        params, grads = _params(shapes=MATRIX_SHAPES, device=device)
        setups[label] = (build(params), params, grads)
    return _interleaved(setups, rounds, steps, warmup=1)


def muon_table(times: dict[str, list[float]]) -> list[list[Any]]:
    """Rows: median ms, speed-up over ``torch.optim.Muon`` and Newton–Schulz GFLOP/s per candidate."""
    from ..ops.newton_schulz import flops
    med = {k: statistics.median(v) for k, v in times.items()}
    ref = med["torch.optim.Muon (per matrix, bf16 NS5)"]
    gflop = sum(flops(*s) for s in MATRIX_SHAPES) / 1e9
    return [[label, f"{ms:.1f}", f"{ref / ms:.2f}", f"{gflop / (ms / 1e3):.1f}"] for label, ms in med.items()]


HEADERS = ["optimizer", "median ms/step", "× AdamW loop", "× AdamW fused", "pytorch-optimizer ms",
           "× pytorch-optimizer"]


def main(rounds: int = 3, steps: int = 30, optimizers: list[str] | None = None, out: str | None = None,
         device: str = "cpu") -> str:
    """Print (and with ``out`` write) the step-time table, plus the Muon-family table when ``optimizers`` is
    None or names ``muon``, on ``device`` (``scripts/cuda_check.sh`` runs it on CUDA); returns the text.
    ``torchstep bench speed`` calls this."""
    from tabulate import tabulate
    times = measure(optimizers, rounds, steps, device=device)
    n_params = sum(torch.Size(s).numel() for s in SHAPES)
    text = tabulate(table(times), headers=HEADERS, tablefmt="github")
    footer = (f"\n\n{len(SHAPES)} tensors, {n_params / 1e6:.2f}M fp32 parameters; {rounds} interleaved rounds × "
              f"{steps} timed steps; 1 thread; torch {torch.__version__}; {platform.processor() or platform.machine()}"
              + (f"; device {torch.cuda.get_device_name(device)}" if device.startswith("cuda") else ""))
    sections = [text + footer]
    if optimizers is None or "muon" in optimizers:
        from ..ops.newton_schulz import flops
        for threads in (1, 2) if device == "cpu" else (1,):
            mt = measure_muon(rounds, max(2, steps // 10), threads, device=device)
            sections.append(f"Muon family, {len(MATRIX_SHAPES)} matrices (16 × 256×256 + 4 × 256×1024), {threads} "
                            f"thread(s); NS5 = {sum(flops(*s) for s in MATRIX_SHAPES) / 1e9:.2f} GFLOP per step:\n\n"
                            + tabulate(muon_table(mt), headers=["optimizer", "median ms/step",
                                                                 "speed-up vs torch.optim.Muon", "NS GFLOP/s"],
                                       tablefmt="github"))
        torch.set_num_threads(1)
    text = "\n\n".join(sections)
    return _emit(text, out)



# ---------------------------------------------------------------------- Newton–Schulz: Gram vs standard
#: (label, ns_method, ns_dtype) of the Gram-iteration table
NS_CONFIGS = [("standard bf16", "standard", "bfloat16"), ("gram bf16", "gram", "bfloat16"),
              ("standard fp16", "standard", "float16"), ("gram fp16", "gram", "float16"),
              ("standard fp32", "standard", "float32"), ("gram fp32", "gram", "float32")]


def _ns_error(G: torch.Tensor, O: torch.Tensor) -> tuple[float, float, float]:
    """(‖O − U·Vᵀ‖_F / ‖U·Vᵀ‖_F, σ_min(O), σ_max(O)) with U·Vᵀ from a float64 SVD of G."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    s = torch.linalg.svdvals(O.double())
    return float((O.double() - polar).norm() / polar.norm()), float(s.min()), float(s.max())


def measure_ns_gram(dims=(256, 512, 1024), rounds: int = 3, threads: int = 1, aspects=(4, 1),
                    configs: list[str] | None = None, with_torch: bool = True) -> list[dict[str, Any]]:
    """Newton–Schulz alone and the whole Muon step (one d×(a·d) matrix per d and aspect a) for :data:`NS_CONFIGS` and
    ``torch.optim.Muon`` (bf16, its own iteration): candidates interleaved within every round, one timed
    call each per round after one untimed warm-up call, medians over ``rounds``; plus each configuration's
    orthogonality error against the float64 SVD polar factor (untimed).  ``configs`` (labels of
    :data:`NS_CONFIGS`) and ``with_torch=False`` restrict the candidates (bf16 is emulated on CPUs without
    native bf16 GEMMs, and dominates the run time there)."""
    from ..ops.newton_schulz import NS_METHODS, default_restarts, flops, newton_schulz  # noqa: F401
    from ..optim import Muon
    from ..optim.matrix import NS_DTYPES
    torch.set_num_threads(threads)
    configs_used = [c for c in NS_CONFIGS if configs is None or c[0] in configs]
    shapes = [(d, a * d) for a in aspects for d in dims]
    g = torch.Generator().manual_seed(0)
    cases = []
    for shape in shapes:
        G = torch.randn(shape, generator=g)
        ns = {label: (lambda G=G, m=method, dt=NS_DTYPES[dtype]: newton_schulz(G, compute_dtype=dt, method=m))
              for label, method, dtype in configs_used}
        steps = {}
        for label, method, dtype in [("torch.optim.Muon", None, "bfloat16")] * with_torch + configs_used:
            p = torch.zeros(shape, requires_grad=True)
            p.grad = G.clone()
            opt = (torch.optim.Muon([p], lr=0.02, weight_decay=0.0) if method is None else
                   Muon([p], lr=0.02, ns_dtype=dtype, ns_method=method))
            steps[label] = opt.step
        cases.append((shape, G, ns, steps))
    times: dict[tuple, list[float]] = {}
    for r in range(rounds + 1):
        for shape, _, ns, steps in cases:
            for kind, fns in (("ns", ns), ("step", steps)):
                for label, fn in fns.items():
                    start = time.perf_counter()
                    fn()
                    if r:                                   # round 0 is the warm-up
                        times.setdefault((shape, kind, label), []).append((time.perf_counter() - start) * 1e3)
    rows = []
    for shape, G, ns, _ in cases:
        ref = statistics.median(times[(shape, "step", "torch.optim.Muon")]) if with_torch else float("nan")
        for label, method, dtype in configs_used:
            err = _ns_error(G, ns[label]())
            restarts = default_restarts(5, NS_DTYPES[dtype]) if method == "gram" else ()
            gflop = flops(*shape, method=method, restarts=restarts) / 1e9
            ns_ms = statistics.median(times[(shape, "ns", label)])
            std = (shape, "ns", "standard " + label.split()[-1])
            std_ms = statistics.median(times[std]) if std in times else float("nan")
            step_ms = statistics.median(times[(shape, "step", label)])
            rows.append(dict(shape=shape, config=label, ns_ms=ns_ms, ns_speedup=std_ms / ns_ms, step_ms=step_ms,
                             step_speedup=ref / step_ms, torch_ms=ref, gflop=gflop, gflops=gflop / (ns_ms / 1e3),
                             err=err[0], smin=err[1], smax=err[2]))
    return rows


def ns_gram_table(rows: list[dict[str, Any]]) -> str:
    from tabulate import tabulate
    body = []
    seen = set()
    for r in rows:
        shape = f"{r['shape'][0]}×{r['shape'][1]}"
        if shape not in seen and r["torch_ms"] == r["torch_ms"]:
            seen.add(shape)
            body.append([shape, "torch.optim.Muon (bf16)", "–", "–", f"{r['torch_ms']:.1f}", "1.00", "–", "–",
                         "= standard bf16", "= standard bf16"])
        body.append([shape, r["config"], f"{r['ns_ms']:.1f}", f"{r['ns_speedup']:.2f}", f"{r['step_ms']:.1f}",
                     f"{r['step_speedup']:.2f}", f"{r['gflop']:.2f}", f"{r['gflops']:.1f}", f"{r['err']:.4f}",
                     f"[{r['smin']:.3f}, {r['smax']:.3f}]"])
    return tabulate(body, headers=["shape", "NS (quintic, 5 steps)", "NS ms", "NS × standard (same dtype)",
                                   "Muon step ms", "step × torch.optim.Muon", "model GFLOP", "GFLOP/s",
                                   "‖O − UVᵀ‖/‖UVᵀ‖", "σ(O)"], tablefmt="github")


def main_ns(rounds: int = 3, dims=(256, 512, 1024), aspects=(4, 1), configs=None, with_torch: bool = True,
            out: str | None = None) -> str:
    """Print (and with ``out`` write) the Gram vs standard Newton–Schulz table (``torchstep bench speed --ns``)."""
    text = ns_gram_table(measure_ns_gram(tuple(dims), rounds, aspects=tuple(aspects), configs=configs,
                                         with_torch=with_torch))
    text += (f"\n\n{rounds} interleaved rounds (+1 warm-up), medians; 1 thread; torch {torch.__version__}; "
             f"{platform.processor() or platform.machine()}")
    return _emit(text, out)
