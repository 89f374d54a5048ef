"""The ``yaie`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys


def _bench_core(args: argparse.Namespace) -> None:
    from yaie.bench.core import run

    run(tuple(args.sizes), args.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yaie", description="Yet Another Inference Engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    core = bench_sub.add_parser("core", help="scheduler + engine overhead per step (fake executor)")
    core.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    core.add_argument("--steps", type=int, default=200)
    core.set_defaults(func=_bench_core)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as exc:  # errors a user can cause: one clear line
        print(f"yaie: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
