"""``torchstep`` command line: ``list``, ``bench`` (and ``bench speed``, ``bench memory``), ``report``,
``width-sweep``, ``steplaw``.

Uses the standard library's ``argparse`` so the core install stays torch + numpy only.
"""
from __future__ import annotations

import argparse
import sys

from .registry import SPECS


LIST_HEADER = ("name", "class", "family", "arXiv", "parity with official code tested")


def list_rows() -> list[tuple[str, ...]]:
    return [(s.name, s.cls.__name__, s.family.value, s.arxiv, _parity(s)) for s in SPECS.values()]


def _parity(spec) -> str:
    if spec.reconstructed:
        return "none installable; rule partly reconstructed, unverified against the paper (docstring)"
    return spec.parity or "no (equation-level tests)"


def markdown_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def cmd_list(args: argparse.Namespace) -> None:
    rows = list_rows()
    if args.markdown:
        print(markdown_table(LIST_HEADER, rows))
        return
    widths = [max(len(str(r[i])) for r in rows + [LIST_HEADER]) for i in range(len(LIST_HEADER))]
    for row in [LIST_HEADER, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())


def cmd_bench(args: argparse.Namespace) -> None:
    """``torchstep bench``: run (or resume) a suite, write its report, print the verdict table."""
    from dataclasses import replace
    from pathlib import Path

    from .bench import analysis, report, sweep
    from .bench.arms import ARMS
    from .bench.tasks import PROBED, TASKS
    suite = sweep.SUITES[args.suite]
    for kind, given, valid in (("task", args.tasks, TASKS), ("optimizer", args.optimizers, ARMS)):
        unknown = [x for x in given or [] if x not in valid]
        if unknown:
            fail(f"unknown {kind} {', '.join(unknown)}; valid: {', '.join(valid)}")
    if args.seeds is not None and args.seeds < 1:
        fail(f"invalid --seeds {args.seeds}; valid: an integer >= 1")
    if args.workers is not None and args.workers < 1:
        fail(f"invalid --workers {args.workers}; valid: an integer >= 1")
    options = task_options(args.set)
    steps = dict(suite.steps or {})
    for item in args.steps or []:
        task, _, value = item.partition("=")
        if task not in TASKS or not value.isdigit() or int(value) < 1:
            fail(f"invalid --steps {item!r}; use TASK=N with N >= 1 and TASK one of {', '.join(TASKS)}")
        steps[task] = int(value)
    if args.monitor_every < 1:
        fail(f"invalid --monitor-every {args.monitor_every}; valid: an integer >= 1")
    unprobed = [t for t in (args.tasks or suite.tasks) if args.monitor and t not in PROBED]
    if unprobed:
        fail(f"--monitor needs a task with a probe batch; {', '.join(unprobed)} has none (valid: {', '.join(PROBED)})")
    suite = replace(suite, tasks=tuple(args.tasks or suite.tasks), arms=tuple(args.optimizers or suite.arms),
                    seeds=args.seeds or suite.seeds, options=options, steps=steps,
                    schedule=args.schedule or suite.schedule,
                    monitor={"name": args.monitor, "every": args.monitor_every} if args.monitor else None)
    out = Path(args.out or f"bench-out/{args.suite}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as exc:
        fail(f"output directory {out} is not writable ({exc.strerror}); choose another with --out")
    db = sweep.sweep(suite, out, workers=args.workers, backend=args.backend, address=args.address,
                     progress=not args.quiet)
    results = analysis.analyse(db)          # once: the report and the printed table share it
    path = report.write(out, results)
    export(out, args.export)
    print(report.verdict_table(results))
    print(f"\nreport: {path}")


def cmd_bench_speed(args: argparse.Namespace) -> None:
    """``torchstep bench speed``: the step-time table (``torchstep.bench.speed``)."""
    from .bench import speed
    from .bench.arms import ARMS
    for name, value in (("--rounds", args.rounds), ("--steps", args.steps)):
        if value < 1:
            fail(f"invalid {name} {value}; valid: an integer >= 1")
    known = {name for name in ARMS if name in SPECS}
    unknown = [x for x in args.optimizers or [] if x not in known]
    if unknown:
        fail(f"unknown optimizer {', '.join(unknown)}; valid: {', '.join(n for n in ARMS if n in known)}")
    import torch
    try:
        torch_device = torch.device(args.device)
    except RuntimeError:
        fail(f"invalid --device {args.device!r}; valid: a torch device string such as cpu or cuda")
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    if args.ns:
        speed.main_ns(rounds=args.rounds, dims=args.dims, aspects=args.aspects, configs=args.configs,
                      with_torch=not args.no_torch, out=args.out)
    elif args.compiled:
        speed.main_compiled(rounds=args.rounds, steps=args.steps, optimizers=args.optimizers, out=args.out,
                            device=args.device)
    else:
        speed.main(rounds=args.rounds, steps=args.steps, optimizers=args.optimizers, out=args.out, device=args.device)


def cmd_bench_memory(args: argparse.Namespace) -> None:
    """``torchstep bench memory``: optimizer-state bytes of one GPT step per arm (``torchstep.bench.memory``)."""
    from .bench import memory
    from .bench.arms import ARMS
    for name, value in (("--width", args.width), ("--depth", args.depth)):
        if value < 1:
            fail(f"invalid {name} {value}; valid: an integer >= 1")
    unknown = [x for x in args.optimizers or [] if x not in ARMS]
    if unknown:
        fail(f"unknown arm {', '.join(unknown)}; valid: {', '.join(ARMS)}")
    memory.main(optimizers=args.optimizers, width=args.width, depth=args.depth, out=args.out)


def export(out, targets: list[str]) -> None:
    """Export every trial's curve in ``out`` to each of ``targets`` (``tensorboard`` / ``mlflow``)."""
    from .bench import export as exporters
    for target in targets or []:
        try:
            where = exporters.to_tensorboard(out) if target == "tensorboard" else exporters.to_mlflow(out)
        except ImportError as exc:
            fail(f"--export {target} needs the optional package {exc.name!r} (pip install {exc.name})")
        print(f"{target}: {where}")


def cmd_report(args: argparse.Namespace) -> None:
    """``torchstep report DIR``: re-write the report files from ``DIR/results.sqlite``."""
    from .bench import report
    try:
        print(f"report: {report.write(args.dir)}")
    except FileNotFoundError as exc:
        fail(str(exc))
    export(args.dir, args.export)


def task_options(items: list[str] | None) -> dict[str, dict]:
    """``--set TASK.OPTION=VALUE …`` → task → {option: value typed like its default}; one-line errors."""
    from .bench.tasks import TASKS
    options: dict[str, dict] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        task, dot, name = key.partition(".")
        if not sep or not dot or task not in TASKS or name not in TASKS[task].valid_options:
            valid = "; ".join(f"{t}.{{{','.join(TASKS[t].valid_options)}}}" for t in TASKS if TASKS[t].valid_options)
            fail(f"invalid --set {item!r}; use TASK.OPTION=VALUE with one of: {valid}")
        default = TASKS[task].valid_options[name]
        try:
            options.setdefault(task, {})[name] = (value.lower() in ("1", "true", "yes")) if isinstance(default, bool) \
                else type(default)(value)
        except ValueError:
            fail(f"invalid --set {item!r}; {name} takes a {type(default).__name__}")
    return options


def cmd_bench_transfer(args: argparse.Namespace) -> None:
    """``torchstep bench transfer``: best lr across widths on gpt-bytes, standard parametrisation vs μP."""
    from pathlib import Path

    from .bench import transfer
    from .bench.arms import MUP_RULES
    unknown = [a for a in args.optimizers if a not in MUP_RULES]
    if unknown:
        fail(f"optimizer {', '.join(unknown)} has no μP rule; valid: {', '.join(MUP_RULES)}")
    if len(args.widths) < 2 or min(args.widths) < 1:
        fail(f"invalid --widths {args.widths}; valid: two or more positive widths")
    options = task_options(args.set)
    if set(options) - {"gpt-bytes"} or {"width", "mup_base_width", "tied_fallback"} & set(options.get("gpt-bytes", {})):
        fail("invalid --set; only gpt-bytes options other than width, mup_base_width and tied_fallback")
    out = Path(args.out or "bench-out/lr-transfer")
    _, rows = transfer.run(out, tuple(args.optimizers), tuple(args.widths), steps=args.steps, seeds=args.seeds,
                           grid_points=args.grid_points, options=options.get("gpt-bytes", {}),
                           workers=args.workers, progress=not args.quiet)
    fmt = lambda x, f: "–" if x is None else format(x, f)
    table = markdown_table(("optimizer", "param.", "width", "best lr", "best val", "val at base lr − best"),
                           [(r["arm"], r["param"], str(r["width"]), fmt(r["best_lr"], "g"), fmt(r["best_val"], ".4f"),
                             fmt(r["regret"], "+.4f")) for r in rows])
    spreads = "\n".join(f"- {a}, {p}: best lr spread {transfer.spread(rows, a, p):.0f} half-decade(s) across widths"
                         for a in args.optimizers for p in transfer.PARAMETRISATIONS)
    text = f"{table}\n\n{spreads}\n"
    (out / "lr-transfer.md").write_text(text)
    print(text + f"figure: {out / 'lr-transfer.png'}")


def cmd_diagnose(args: argparse.Namespace) -> None:
    """``torchstep diagnose KIND``: one diagnostic on a harness task, written as CSV + PNG."""
    from pathlib import Path

    import torch

    from .bench import diagnose
    from .bench.arms import ARMS
    torch.set_num_threads(1)
    if args.optimizer not in ARMS:
        fail(f"unknown optimizer {args.optimizer}; valid: {', '.join(ARMS)}")
    options = task_options(args.set).get(args.task, {})
    if args.kind == "intrinsic-dim" and args.train_steps:
        fail("invalid --train-steps for intrinsic-dim; it trains in subspaces around the initialisation (valid: 0)")
    try:
        prob = diagnose.problem(args.task, options, args.optimizer, args.lr, args.train_steps)
        out = Path(args.out or f"bench-out/diagnose/{args.task}")
        run = {"hessian": lambda: diagnose.hessian(prob, out, k=args.k),
               "density": lambda: diagnose.density(prob, out),
               "el2n": lambda: diagnose.el2n(prob, out),
               "intrinsic-dim": lambda: diagnose.intrinsic(prob, out, dims=tuple(args.dims))}[args.kind]
        rows = run()
    except ValueError as err:
        fail(str(err))
    name = "intrinsic-dim" if args.kind == "intrinsic-dim" else args.kind
    shown = rows if len(rows) <= 12 else rows[:5] + [("…",)] + rows[-3:]
    print("\n".join(", ".join(str(x) for x in r) for r in shown))
    print(f"wrote {out / (name + '.csv')} and {out / (name + '.png')}")


def cmd_coord_check(args: argparse.Namespace) -> None:
    """``torchstep coord-check``: TP5's coordinate check of a 3-layer MLP, μP vs standard parametrisation."""
    import torch

    from .scaling import coord_summary, mlp_coord_check, plot_coord_check
    torch.set_num_threads(1)
    mu, sp = mlp_coord_check(tuple(args.widths), steps=args.steps)
    summaries = {"μP": (coord_summary(mu), coord_summary(mu, "2")), "SP": (coord_summary(sp), coord_summary(sp, "2"))}
    rows = [(name, what, *(f"{s[w]:.3f}" for w in args.widths), f"{max(s.values()) / min(s.values()):.2f}")
            for name, pair in summaries.items() for what, s in zip(("logits", "hidden layer 2"), pair)]
    print(markdown_table(("param.", f"mean abs after {args.steps} steps", *map(str, args.widths), "max/min"), rows))
    if args.out:
        plot_coord_check(mu, f"{args.out}-mup.png", "μP")
        plot_coord_check(sp, f"{args.out}-sp.png", "standard parametrisation")
        print(f"figures: {args.out}-mup.png, {args.out}-sp.png")


def cmd_wd_sweep(args: argparse.Namespace) -> None:
    """``torchstep wd-sweep``: top singular values across widths for each weight-decay width exponent κ."""
    import torch

    from .diagnostics import wd_sweep
    torch.set_num_threads(1)
    results = wd_sweep.sweep(tuple(args.exponents), tuple(args.widths), steps=args.steps)
    matrices = sorted(results[0].sigma_max)
    rows = [(f"{r.exponent:g}", str(r.width), *(f"{r.sigma_max[m]:.3f}" for m in matrices), f"{r.final_loss:.4f}")
            for r in results]
    rows += [(f"{k:g}", "max/min", *(f"{wd_sweep.spread(results, k, m):.3f}" for m in matrices), "")
             for k in args.exponents]
    print(markdown_table(("κ", "width", *(f"σ_max {m}" for m in matrices), "final loss"), rows))


def cmd_width_sweep(args: argparse.Namespace) -> None:
    """``torchstep width-sweep``: the spectral-ratio table of ``bench.arms.WIDTH_SWEEP_ARMS`` across widths."""
    import torch

    from .bench.arms import WIDTH_SWEEP_ARMS
    from .diagnostics import width_sweep
    torch.set_num_threads(1)
    header = ("optimizer", "width", "max ‖ΔW‖₂/s", "max ‖W‖₂/s", "final loss", "feature change")
    rows = [(name, str(r.width), f"{r.max_update_ratio:.4f}", f"{r.max_weight_ratio:.3f}", f"{r.final_loss:.4f}",
             f"{r.feature_change:.3f}")
            for name, make in WIDTH_SWEEP_ARMS.items()
            for r in width_sweep.sweep(make, widths=args.widths, steps=args.steps)]
    print(markdown_table(header, rows))


def cmd_steplaw(args: argparse.Namespace) -> None:
    """``torchstep steplaw``: the Step Law's optimal lr and batch size (``torchstep.scaling.step_law``)."""
    from .scaling import step_law
    try:
        law = step_law(args.params, args.tokens, args.constants, args.embedding_params)
    except ValueError as err:
        fail(str(err))
    print(f"Step Law ({args.constants} constants), N = {args.params - args.embedding_params:.4g} non-embedding "
          f"parameters, D = {args.tokens:.4g} tokens:")
    print(f"  lr          {law.lr:.4g}")
    print(f"  batch size  {law.batch_size:.4g} tokens = {law.batch_sequences(args.seq_len):.1f} sequences of "
          f"{args.seq_len}")


def fail(message: str) -> None:
    """Print a one-line ``torchstep: error: …`` to stderr and exit with status 2 (argparse's usage error)."""
    print(f"torchstep: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """The ``torchstep`` parser: ``list``, ``bench`` (optional sub-command ``speed``), ``width-sweep``, ``report``."""
    parser = argparse.ArgumentParser(prog="torchstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="registered optimizers with family, paper and parity status")
    listing.add_argument("--markdown", action="store_true", help="print a markdown table (as in README.md)")
    listing.set_defaults(func=cmd_list)
    bench = sub.add_parser("bench", help="optimizer comparison sweep + report (`bench speed`: step-time table)")
    bench.add_argument("--suite", choices=["smoke", "default", "rl", "finetune", "full"], default="default",
                       help="smoke | default (six cheap tasks) | rl (the RL objectives on rl-arith) | finetune (the "
                       "fine-tuning methods on finetune-bytes) | full")
    bench.add_argument("--tasks", nargs="+", default=None, metavar="TASK")
    bench.add_argument("--optimizers", nargs="+", default=None, metavar="OPTIMIZER")
    bench.add_argument("--seeds", type=int, default=None, help="paired seeds per arm (>= 3 for a verdict)")
    bench.add_argument("--workers", type=int, default=None, help="worker processes (default: CPU cores)")
    bench.add_argument("--out", default=None, help="output directory (default bench-out/<suite>)")
    bench.add_argument("--set", nargs="+", metavar="TASK.OPTION=VALUE",
                       help="task options, e.g. gpt-bytes.norm=peri gpt-bytes.width=64 gpt-bytes.qk_norm=true")
    bench.add_argument("--steps", nargs="+", metavar="TASK=N", help="budget per task (its own schedule)")
    bench.add_argument("--schedule", choices=["cosine", "wsd", "linear", "power", "refined", "none"],
                       default=None, help="lr schedule of every arm (default: the suite's — cosine, none for rl; "
                       "refined: two passes per trial; Schedule-Free arms always run without one)")
    bench.add_argument("--monitor", choices=["sharpness"], default=None,
                       help="record a diagnostic during every trial (sharpness: λ_max and the rule's stability "
                            "threshold; the report adds the edge-of-stability figure)")
    bench.add_argument("--monitor-every", type=int, default=25, help="steps between monitor measurements")
    bench.add_argument("--backend", choices=["local", "ray"], default="local")
    bench.add_argument("--address", default=None, help="Ray cluster address (with --backend ray)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.add_argument("--export", nargs="+", choices=["tensorboard", "mlflow"], default=[],
                       help="also export every trial's curve (batched, after training)")
    bench.set_defaults(func=cmd_bench)
    # optional, so that plain `torchstep bench --suite …` is the sweep
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="{speed,memory,transfer}",
                                     help="`speed`: the step-time microbenchmark, `memory`: optimizer-state "
                                          "bytes of one GPT step (their own flags; see `torchstep bench speed "
                                          "-h`); without one, the sweep")
    speed = bench_sub.add_parser("speed", help="step-time microbenchmark: optimizer.step() against torch AdamW",
                                 description="Median ms per optimizer.step() on CPU (1 thread), every torchstep "
                                             "optimizer against torch AdamW and pytorch-optimizer.")
    speed.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    speed.add_argument("--steps", type=int, default=30, help="timed steps per candidate per round (default 30)")
    speed.add_argument("--optimizers", nargs="+", default=None, metavar="OPTIMIZER",
                       help="torchstep optimizers to time (default: all; torch AdamW is always timed)")
    speed.add_argument("--out", default=None, metavar="FILE", help="also write the tables to FILE (markdown)")
    speed.add_argument("--device", default="cpu", help="device to time on (default cpu; e.g. cuda)")
    mode = speed.add_mutually_exclusive_group()
    mode.add_argument("--compiled", action="store_true",
                      help="the compiled-step table: every compilable method eager vs compile=True against fused and "
                           "compiled torch AdamW, pytorch-optimizer and HeavyBall, with first-step compile seconds")
    mode.add_argument("--ns", action="store_true", help="the Gram vs standard Newton–Schulz table (--dims, --aspects)")
    speed.add_argument("--dims", type=int, nargs="+", default=[256, 512, 1024], help="--ns: matrix sizes d")
    speed.add_argument("--aspects", type=int, nargs="+", default=[4, 1], help="--ns: aspect ratios (d×a·d)")
    speed.add_argument("--configs", nargs="+", default=None, help="--ns: subset of the NS configurations, e.g. "
                                                                  "'gram fp32'")
    speed.add_argument("--no-torch", action="store_true", help="--ns: leave out torch.optim.Muon (bf16)")
    speed.set_defaults(func=cmd_bench_speed)
    mem = bench_sub.add_parser("memory", help="optimizer-state bytes (exact) and peak memory of one GPT step per arm",
                               description="One forward/backward/step of the byte GPT per arm, each in a fresh "
                                           "process, with matched routing: exact state bytes, CUDA / RSS peaks.")
    mem.add_argument("--width", type=int, default=768, help="model width (default 768)")
    mem.add_argument("--depth", type=int, default=12, help="layers (default 12: ~85M parameters)")
    mem.add_argument("--optimizers", nargs="+", default=None, metavar="ARM",
                     help="arms (default: adamw, the four low-rank methods, torch-adafactor, muon-fp32)")
    mem.add_argument("--out", default=None, metavar="FILE", help="also write the table to FILE (markdown)")
    mem.set_defaults(func=cmd_bench_memory)
    tr = bench_sub.add_parser("transfer", help="best lr across widths on gpt-bytes: standard parametrisation vs μP",
                              description="One harness sweep per (parametrisation, width) of gpt-bytes; μP is "
                                          "relative to the smallest width. Writes lr-transfer.md and .png.")
    tr.add_argument("--widths", nargs="+", type=int, default=[32, 64, 128, 256])
    tr.add_argument("--optimizers", nargs="+", default=["adamw"], metavar="ARM")
    tr.add_argument("--steps", type=int, default=300)
    tr.add_argument("--seeds", type=int, default=1)
    tr.add_argument("--grid-points", type=int, default=6, help="lr grid points (half-decades) before extension")
    tr.add_argument("--set", nargs="+", metavar="gpt-bytes.OPTION=VALUE", help="other gpt-bytes options")
    tr.add_argument("--workers", type=int, default=None)
    tr.add_argument("--out", default=None, help="output directory (default bench-out/lr-transfer)")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_bench_transfer)
    sl = sub.add_parser("steplaw", help="optimal lr and batch size from model size and tokens (Step Law)")
    sl.add_argument("--params", type=float, required=True, help="parameters (non-embedding, or give --embedding-params)")
    sl.add_argument("--tokens", type=float, required=True, help="training tokens")
    sl.add_argument("--seq-len", type=int, default=2048, help="sequence length for the batch in sequences")
    sl.add_argument("--embedding-params", type=float, default=0.0, help="embedding parameters inside --params")
    sl.add_argument("--constants", choices=["paper", "repo_mean"], default="paper")
    sl.set_defaults(func=cmd_steplaw)
    dg = sub.add_parser("diagnose", help="a diagnostic on a harness task (hessian, density, el2n, intrinsic-dim)",
                        description="Builds the task (seed 0), optionally trains it, runs one diagnostic and "
                                    "writes KIND.csv and KIND.png.")
    dg.add_argument("kind", choices=["hessian", "density", "el2n", "intrinsic-dim"])
    dg.add_argument("--task", default="digits-mlp", help="digits-mlp, mnist1d or gpt-bytes (el2n / "
                                                         "intrinsic-dim: classification tasks)")
    dg.add_argument("--set", nargs="+", metavar="TASK.OPTION=VALUE", help="task options")
    dg.add_argument("--train-steps", type=int, default=0, help="train this many steps first (default 0: at init)")
    dg.add_argument("--optimizer", default="adamw", help="arm used for --train-steps")
    dg.add_argument("--lr", type=float, default=None, help="lr for --train-steps (default the arm's grid centre)")
    dg.add_argument("--k", type=int, default=5, help="hessian: eigenvalues")
    dg.add_argument("--dims", nargs="+", type=int, default=[10, 30, 100, 300, 1000], help="intrinsic-dim grid")
    dg.add_argument("--out", default=None, help="output directory (default bench-out/diagnose/TASK)")
    dg.set_defaults(func=cmd_diagnose)
    cc = sub.add_parser("coord-check", help="μP coordinate check: activation scale vs width, μP against SP")
    cc.add_argument("--widths", nargs="+", type=int, default=[64, 256, 1024, 2048])
    cc.add_argument("--steps", type=int, default=5)
    cc.add_argument("--out", default=None, metavar="PREFIX", help="write PREFIX-mup.png and PREFIX-sp.png")
    cc.set_defaults(func=cmd_coord_check)
    wd = sub.add_parser("wd-sweep", help="weight decay across widths: which exponent keeps top singular values matched")
    wd.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    wd.add_argument("--exponents", nargs="+", type=float, default=[0.0, 0.5, 1.0])
    wd.add_argument("--steps", type=int, default=3000)
    wd.set_defaults(func=cmd_wd_sweep)
    ws = sub.add_parser("width-sweep", help="μP spectral condition across widths (Muon++ vs Muon scales)")
    ws.add_argument("--widths", nargs="+", type=int, default=[64, 128, 256, 512])
    ws.add_argument("--steps", type=int, default=100)
    ws.set_defaults(func=cmd_width_sweep)
    rep = sub.add_parser("report", help="write report.md, figures and CSV for a results directory")
    rep.add_argument("dir")
    rep.add_argument("--export", nargs="+", choices=["tensorboard", "mlflow"], default=[])
    rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the sub-command."""
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
