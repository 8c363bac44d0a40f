"""Measure peft's dense DoRA against torchstep's factored norm on CPU: peak memory and time (``python -m``).

Usage::

    python -m torchstep.peft.bench_dora            # full run (~3–5 min on one core)
    python -m torchstep.peft.bench_dora --quick    # tiny shapes (smoke test; ~1 min of imports)
    python -m torchstep.peft.bench_dora --part compose   # only the compose-path table

Method:

* one torch thread (``torch.set_num_threads(1)``), fp32, a single peft DoRA ``Linear`` (``get_peft_model`` on a
  one-layer model, ``LoraConfig(use_dora=True)``, random nonzero B); "dense" = peft 0.21.2 as shipped,
  "factored" = the same module after :func:`torchstep.peft.dora.patch_peft_dora`;
* **time**: forward + backward of ``out.square().mean()`` with ``x.requires_grad`` (gradients to x, A, B, m),
  dense and factored interleaved in one process, median of ``repeats`` after one warm-up each; the isolated norm
  (peft's ``get_lora_weight`` via the identity + ``get_weight_norm``; torchstep's ``dense_row_norm`` with BA
  materialised; ``factored_row_norm``) timed the same way;
* **memory**: a fresh subprocess per variant (configs run one after the other in it) with ``MALLOC_MMAP_THRESHOLD_=65536`` (large buffers are
  mmapped and returned on free, so RSS follows torch's live CPU allocations); after setup and one warm-up step
  the kernel's RSS high-water mark is reset before each config (``/proc/self/clear_refs`` ← 5) and the peak is read from ``VmHWM``;
  reported: peak − RSS before the measured steps (the step's transient, MiB).  tracemalloc is not used (it does
  not see torch's allocator).  Linux only;
* **compose paths**: eager vs the closed-form-backward Function vs ``torch.compile`` on (tokens, d) activations,
  median of ≥ 9 interleaved repeats, forward and forward + backward (all three inputs require grad).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

FULL_STEP = [(1024, 8, 512), (2048, 64, 512), (4096, 8, 256), (4096, 64, 256), (4096, 384, 256)]
FULL_NORM = [(4096, 4096, 8), (11008, 4096, 64), (4096, 4096, 384)]      # (d_out, d_in, r)
QUICK_STEP = [(256, 8, 64)]
QUICK_NORM = [(256, 256, 8)]


def _peft_layer(d_out: int, d_in: int, r: int, seed: int = 0):
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(d_in, d_out, bias=False))
    pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, use_dora=True, target_modules=["0"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return pm, pm.base_model.model[0]


def _step(layer, x):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    layer(x).square().mean().backward()


def _norm_fns(layer):
    from torchstep.ops.dora import dense_row_norm, factored_row_norm
    mag = layer.lora_magnitude_vector["default"]
    la, lb = layer.lora_A["default"], layer.lora_B["default"]
    W = layer.get_base_layer().weight
    s = layer.scaling["default"]

    def peft_dense():
        with torch.no_grad():
            lw = mag.get_lora_weight(lora_A=la, lora_B=lb)
            return mag.get_weight_norm(W, lw, s)

    return {
        "peft_dense": peft_dense,
        "torchstep_dense": lambda: dense_row_norm(W, la.weight, lb.weight, s),
        "factored": lambda: factored_row_norm(W, la.weight, lb.weight, s),
    }


def _hwm_reset() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(key)


def _child(specs: list) -> list:
    """Run in a fresh process: peak RSS transient (MiB) of each measured op, one after the other."""
    torch.set_num_threads(1)
    out = []
    for spec in specs:
        out.append(_child_one(spec))
    return out


def _child_one(spec: dict) -> dict:
    kind, variant = spec["kind"], spec["variant"]
    if kind == "step":
        d, r, n = spec["d"], spec["r"], spec["tokens"]
        _, layer = _peft_layer(d, d, r)
        if variant == "factored":
            from .dora import patch_peft_dora
            patch_peft_dora(layer)
        x = torch.randn(n, d, requires_grad=True)
        op = lambda: _step(layer, x)      # noqa: E731
    else:
        d_out, d_in, r = spec["d_out"], spec["d_in"], spec["r"]
        _, layer = _peft_layer(d_out, d_in, r)
        op = _norm_fns(layer)[variant]
    op()                                  # warm-up (grads allocated, lazy init done)
    base = _status_kib("VmRSS")
    _hwm_reset()
    for _ in range(2):
        op()
    peak = _status_kib("VmHWM")
    del op, layer
    return {"peak_delta_mib": max(0, peak - base) / 1024, "rss_before_mib": base / 1024}


def _memory(specs: list) -> list:
    """Peak transients (MiB) of ``specs`` measured in one fresh subprocess (HWM reset before each)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torchstep.peft.bench_dora", "--child", json.dumps(specs)],
                         capture_output=True, text=True, env=env, check=True, timeout=600)
    return [r["peak_delta_mib"] for r in json.loads(out.stdout.strip().splitlines()[-1])]


def _interleaved(fns: dict, repeats: int) -> dict:
    for f in fns.values():
        f()                                  # warm-up
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


FULL_COMPOSE = [(256, 4096), (2048, 4096)]
QUICK_COMPOSE = [(64, 256)]


def compose_table(shapes, repeats: int = 9) -> list:
    """Median ms of the compose paths (eager, closed-form-backward Function, torch.compile), fwd and fwd+bwd."""
    from torchstep.ops.dora import dora_compose, dora_compose_compiled, dora_compose_fused
    fns = {"eager": dora_compose, "function": dora_compose_fused, "compile": dora_compose_compiled}
    rows = []
    print("\n| activation | pass | eager ms | function ms | compile ms |\n|---|---|---|---|---|")
    for n, d in shapes:
        args = (torch.randn(n, d), torch.randn(n, d), 1 + 1e-3 * torch.randn(d))
        for bwd in (False, True):
            def make(f, bwd=bwd):
                def once():
                    lo, ba, g = (a.detach().requires_grad_(bwd) for a in args)
                    o = f(lo, ba, g, 0.5)
                    if bwd:
                        o.backward(torch.ones_like(o))
                return once
            t = _interleaved({k: make(f) for k, f in fns.items()}, repeats)
            rows.append(dict(n=n, d=d, backward=bwd, time_ms=t))
            print(f"| {n} × {d} | {'fwd+bwd' if bwd else 'fwd'} | {t['eager']:.2f} | {t['function']:.2f} | "
                  f"{t['compile']:.2f} |", flush=True)
    lo, ba, g = args
    diff = (dora_compose_compiled(lo, ba, g, 0.5) - dora_compose(lo, ba, g, 0.5)).abs().max().item()
    print(f"max |compile − eager| at {tuple(lo.shape)}: {diff:.3g}")
    return rows


def run(quick: bool = False, repeats: int = 5, part: str = "all") -> dict:
    """All measurements (or one ``part``: step, norm, compose); returns a dict and prints markdown tables."""
    from .dora import patch_peft_dora
    torch.set_num_threads(1)
    steps = [] if part not in ("all", "step") else (QUICK_STEP if quick else FULL_STEP)
    norms = [] if part not in ("all", "norm") else (QUICK_NORM if quick else FULL_NORM)
    res = {"step": [], "norm": [], "compose": []}
    step_specs = {v: [{"kind": "step", "variant": v, "d": d, "r": r, "tokens": n} for d, r, n in steps]
                  for v in ("dense", "factored")}
    norm_specs = {v: [{"kind": "norm", "variant": v, "d_out": a, "d_in": b, "r": r} for a, b, r in norms]
                  for v in ("peft_dense", "factored")}
    step_mem = {v: _memory(sp) if sp else [] for v, sp in step_specs.items()}
    norm_mem = {v: _memory(sp) if sp else [] for v, sp in norm_specs.items()}
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {repeats} (median), fp32")
    if steps:
        print("\n| d_in = d_out | r | tokens | dense ms | factored ms | speed-up | dense peak MiB | factored peak MiB |"
              " memory ratio |\n|---|---|---|---|---|---|---|---|---|")
    for i, (d, r, n) in enumerate(steps):
        _, dense = _peft_layer(d, d, r)
        _, fact = _peft_layer(d, d, r)
        patch_peft_dora(fact)
        x = torch.randn(n, d, requires_grad=True)
        t = _interleaved({"dense": lambda: _step(dense, x), "factored": lambda: _step(fact, x)}, repeats)
        del dense, fact
        mem = {v: step_mem[v][i] for v in step_mem}
        row = dict(d=d, r=r, tokens=n, time_ms=t, peak_mib=mem)
        res["step"].append(row)
        print(f"| {d} | {r} | {n} | {t['dense']:.1f} | {t['factored']:.1f} | {t['dense'] / t['factored']:.2f}× |"
              f" {mem['dense']:.0f} | {mem['factored']:.0f} | {mem['dense'] / max(mem['factored'], 1e-9):.1f}× |",
              flush=True)
    if norms:
        print("\n| d_out × d_in | r | peft dense ms | torchstep dense (BA) ms | factored ms | peft/factored |"
              " peft peak MiB | factored peak MiB |\n|---|---|---|---|---|---|---|---|")
    for i, (d_out, d_in, r) in enumerate(norms):
        _, layer = _peft_layer(d_out, d_in, r)
        t = _interleaved(_norm_fns(layer), repeats)
        del layer
        mem = {v: norm_mem[v][i] for v in norm_mem}
        res["norm"].append(dict(d_out=d_out, d_in=d_in, r=r, time_ms=t, peak_mib=mem))
        print(f"| {d_out} × {d_in} | {r} | {t['peft_dense']:.1f} | {t['torchstep_dense']:.1f} | "
              f"{t['factored']:.1f} | {t['peft_dense'] / t['factored']:.2f}× | {mem['peft_dense']:.0f} | "
              f"{mem['factored']:.1f} |", flush=True)
    if part in ("all", "compose"):
        res["compose"] = compose_table(QUICK_COMPOSE if quick else FULL_COMPOSE, repeats=max(repeats, 9))
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--part", choices=("all", "step", "norm", "compose"), default="all")
    ap.add_argument("--json", help="also write the results to this JSON file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(_child(json.loads(a.child))))
        return
    t0 = time.perf_counter()
    res = run(quick=a.quick, repeats=a.repeats, part=a.part)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
