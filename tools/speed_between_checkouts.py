"""Old-vs-new step time (docs/speed.md, "Redesign, old vs new code"): run under each checkout, alternating.

    git worktree add /tmp/old 7f3e45b
    (cd /tmp/old && PYTHONPATH=/tmp/old python /path/to/tools/speed_between_checkouts.py old1.json 3 10)
    python tools/speed_between_checkouts.py new1.json 3 10        # then old2, new2

Writes median ms per step to the JSON file and prints ratios to torch AdamW (for-loop).
"""
import json, statistics, sys, time
import torch
from torchstep import optim as O
torch.set_num_threads(1)
SHAPES = [(256, 256)] * 24 + [(256,)] * 24 + [(1024, 512)] * 2
F32 = dict(ns_dtype="float32")
C = {
    "torch AdamW (for-loop)": lambda ps: torch.optim.AdamW(ps, foreach=False, lr=1e-3, weight_decay=1e-2),
    "lion": lambda ps: O.Lion(ps), "adamp": lambda ps: O.AdamP(ps), "sgdp": lambda ps: O.SGDP(ps, lr=1e-3, momentum=0.9),
    "diffgrad": lambda ps: O.DiffGrad(ps), "sophiag": lambda ps: O.SophiaG(ps), "sophiah": lambda ps: O.SophiaH(ps),
    "spam": lambda ps: O.SPAM(ps), "stablespam": lambda ps: O.StableSPAM(ps), "classp": lambda ps: O.CLASSP(ps),
    "sinkgd": lambda ps: O.SinkGD(ps), "swan (no rescale)": lambda ps: O.SWAN(ps, **({"rescale": False} if "rescale" in O.SWAN.__init__.__code__.co_varnames else {})),
    "muon fp32": lambda ps: O.Muon(ps, **F32), "normuon fp32": lambda ps: O.NorMuon(ps, compat="official", **F32),
    "muonpp fp32": lambda ps: O.MuonPP(ps, **F32), "lanton fp32 frobenius": lambda ps: O.Lanton(ps, noise_norm="frobenius", **F32),
    "spectra(adamw)": lambda ps: O.Spectra(torch.optim.AdamW(ps, lr=1e-3), c=5.0),
}
def params():
    g = torch.Generator().manual_seed(0)
    ps = [torch.randn(s, generator=g).requires_grad_() for s in SHAPES]
    gs = [torch.randn(s, generator=g) * 1e-2 for s in SHAPES]
    for p, gr in zip(ps, gs): p.grad = gr.clone()
    return ps, gs
setups = {}
for k, b in C.items():
    ps, gs = params(); setups[k] = (b(ps), ps, gs)
times = {k: [] for k in setups}
rounds, steps = int(sys.argv[2]), int(sys.argv[3])
for r in range(rounds):
    for k, (opt, ps, gs) in setups.items():
        if r == 0:
            for _ in range(2): opt.step()
        for _ in range(steps):
            for p, gr in zip(ps, gs): p.grad.copy_(gr)
            t = time.perf_counter(); opt.step(); times[k].append((time.perf_counter() - t) * 1e3)
med = {k: statistics.median(v) for k, v in times.items()}
json.dump(med, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: round(v / med["torch AdamW (for-loop)"], 3) for k, v in med.items()}))
