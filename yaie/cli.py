"""The ``yaie`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from yaie.args import EngineArgs
from yaie.simulator.cli import add_parser as add_simulator_parsers


def _bench_core(args: argparse.Namespace) -> None:
    from yaie.bench.core import run

    run(tuple(args.sizes), args.steps)


def _bench_kernels(args: argparse.Namespace) -> None:
    from yaie.bench.kernels import run

    run(args.tokens, args.iters)


def _generate(args: argparse.Namespace) -> None:
    from yaie.core.sampling import SamplingParams
    from yaie.llm import LLM

    if len(args.words) > 2:
        raise ValueError('usage: yaie generate [MODEL] "PROMPT" (quote the prompt)')
    model, prompt = (None, args.words[0]) if len(args.words) == 1 else args.words
    llm = LLM(**_asdict(EngineArgs.from_cli(args, model=model)))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sampling_seed,
        stop=args.stop or [],
    )
    use_chat = not args.raw and bool(llm.tokenizer.chat_template)
    request = [{"role": "user", "content": prompt}] if use_chat else prompt
    start = time.perf_counter()
    first = None
    last = None
    for out in llm.stream(request, params):
        if first is None:
            first = time.perf_counter()
        sys.stdout.write(out.text)
        sys.stdout.flush()
        last = out
    sys.stdout.write("\n")
    m = last.metrics if last is not None else None
    if m is not None and not args.quiet:
        elapsed = time.perf_counter() - start
        decode = (m.num_output_tokens - 1) / (elapsed - (first - start)) if m.num_output_tokens > 1 else 0.0
        print(
            f"[{m.num_prompt_tokens} prompt tokens, {m.num_output_tokens} generated, "
            f"TTFT {1000 * (m.ttft or 0):.0f} ms, {decode:.1f} tok/s, finish: {m.finish_reason}]",
            file=sys.stderr,
        )


def _bench_model(args: argparse.Namespace) -> None:
    from yaie.bench import model as bench
    from yaie.llm import LLM

    llm = LLM(**_asdict(EngineArgs.from_cli(args)))
    device = f"{llm.executor.device.type}, {llm.executor.dtype}, {torch_threads()} threads"
    if args.bench == "latency":
        rows = bench.latency(
            llm, args.prompt_len, args.new_tokens, args.batch, args.prefill_len, args.repeat
        )
        title = (
            f"yaie bench latency: {llm.model_name} ({device}); prompt {args.prompt_len}, "
            f"{args.new_tokens} new tokens, greedy, median of {args.repeat}"
        )
    else:
        rows = bench.throughput(llm, args.num_requests)
        title = f"yaie bench throughput: {llm.model_name} ({device}); {args.num_requests} requests"
    bench.print_rows(rows, title)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _asdict(args) -> dict:
    from dataclasses import asdict

    return asdict(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="yaie", description="Yet Another Inference Engine")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("words", nargs="+", metavar="[MODEL] PROMPT", help="model (optional) and prompt")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--sampling-seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    gen.add_argument("-q", "--quiet", action="store_true", help="no stats line")
    EngineArgs.add_cli_args(gen)
    gen.set_defaults(func=_generate)

    bench = sub.add_parser("bench", help="benchmarks that print a table")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    core = bench_sub.add_parser("core", help="scheduler + engine overhead per step (fake executor)")
    core.add_argument("--sizes", type=int, nargs="+", default=[32, 256, 1024])
    core.add_argument("--steps", type=int, default=200)
    core.set_defaults(func=_bench_core)
    kern = bench_sub.add_parser("kernels", help="numba kernels vs copy bandwidth and torch (GPU)")
    kern.add_argument("--tokens", type=int, default=4096)
    kern.add_argument("--iters", type=int, default=100)
    kern.set_defaults(func=_bench_kernels)
    lat = bench_sub.add_parser("latency", help="batch-1 / batch-N decode and prefill vs peers")
    lat.add_argument("model", nargs="?", default=None)
    lat.add_argument("--prompt-len", type=int, default=32)
    lat.add_argument("--new-tokens", type=int, default=128)
    lat.add_argument("--batch", type=int, default=16)
    lat.add_argument("--prefill-len", type=int, default=512)
    lat.add_argument("--repeat", type=int, default=3)
    EngineArgs.add_cli_args(lat)
    lat.set_defaults(func=_bench_model)
    thr = bench_sub.add_parser("throughput", help="many requests of random lengths vs transformers")
    thr.add_argument("model", nargs="?", default=None)
    thr.add_argument("--num-requests", type=int, default=64)
    EngineArgs.add_cli_args(thr)
    thr.set_defaults(func=_bench_model)
    add_simulator_parsers(sub)
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
