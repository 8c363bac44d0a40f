"""``torchstep`` command line: ``list``, ``demo``, ``bench speed``.

Uses the standard library's ``argparse`` so the core install stays torch + numpy only.
"""
from __future__ import annotations

import argparse
import sys

from .registry import SPECS


LIST_HEADER = ("name", "class", "family", "arXiv", "parity with official code tested")


def list_rows() -> list[tuple[str, ...]]:
    return [(s.name, s.cls.__name__, s.family, s.arxiv, s.parity or "no (equation-level tests)")
            for s in SPECS.values()]


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


def cmd_demo(args: argparse.Namespace) -> None:
    from . import demo
    demo.main(seeds=args.seeds, steps=args.steps)


def cmd_bench_speed(args: argparse.Namespace) -> None:
    from .bench import speed
    speed.main(rounds=args.rounds, steps=args.steps, optimizers=args.optimizers, out=args.out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchstep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="registered optimizers with family, paper and parity status")
    listing.add_argument("--markdown", action="store_true", help="print a markdown table (as in README.md)")
    listing.set_defaults(func=cmd_list)
    demo = sub.add_parser("demo", help="train a small MLP with every optimizer and print a comparison")
    demo.add_argument("--seeds", type=int, default=2)
    demo.add_argument("--steps", type=int, default=200)
    demo.set_defaults(func=cmd_demo)
    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    speed = bench.add_parser("speed", help="optimizer.step() time vs torch AdamW (1 CPU thread)")
    speed.add_argument("--rounds", type=int, default=3)
    speed.add_argument("--steps", type=int, default=30)
    speed.add_argument("--optimizers", nargs="*", default=None, choices=sorted(SPECS))
    speed.add_argument("--out", default=None, help="also write the markdown table to this file")
    speed.set_defaults(func=cmd_bench_speed)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
