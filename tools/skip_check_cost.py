"""What the default ``nonfinite="skip"`` check costs inside a compiled step (docs/speed.md#compiled-steps).

Times, on the speed benchmark's 50 tensors (2.63M fp32, 1 thread), a compiled optimizer's whole ``step()``,
its finite check (``_params_to_update``: one norm per gradient, read back) and its graph call, medians::

    python tools/skip_check_cost.py --optimizer adamw --nonfinite skip
"""
import argparse
import statistics
import time

import torch

import torchstep
from torchstep.bench.speed import _params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--nonfinite", default="skip", choices=["skip", "ignore", "mask"])
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params, grads = _params(0)
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt = torchstep.create(args.optimizer, params, lr=1e-3, compile=True, nonfinite=args.nonfinite)
    for _ in range(3):
        opt.step()
    times: dict[str, list[float]] = {"step": [], "finite check": [], "graph": []}

    def timed(key, fn):
        def run(*a):
            start = time.perf_counter()
            out = fn(*a)
            times[key].append(time.perf_counter() - start)
            return out
        return run

    opt._params_to_update = timed("finite check", opt._params_to_update)
    compiled = next(iter(opt._compiled_steps.values()))[1]
    compiled.fn = timed("graph", compiled.fn)
    for _ in range(args.steps):
        timed("step", opt.step)()
    for key, values in times.items():
        print(f"{key:14s} {statistics.median(values) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
