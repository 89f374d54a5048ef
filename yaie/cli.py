"""The ``yaie`` command: one entry point, one sub-command per job."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from yaie.api.cli import add_parser as add_serve_parser
from yaie.args import EngineArgs
from yaie.bench.serve import add_parser as add_bench_serve_parser
from yaie.simulator.cli import add_parser as add_simulator_parsers
from yaie.ui.chat_cli import add_parser as add_chat_parser
from yaie.ui.dashboard_cli import add_parser as add_dashboard_parser


def _bench_core(args: argparse.Namespace) -> None:
    from yaie.bench.core import run

    run(tuple(args.sizes), args.steps)


def _bench_kernels(args: argparse.Namespace) -> None:
    from yaie.bench.kernels import run

    run(args.tokens, args.iters)


def _bench_cpu_kernels(args: argparse.Namespace) -> None:
    from yaie.bench.cpu_kernels import run

    run(args.rounds)


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


# Workload defaults of ``yaie bench latency|throughput``: (CPU bench, GPU bench with --preset).
_BENCH_DEFAULTS = {
    "prompt_len": (32, 128), "new_tokens": (128, 256), "batch": (16, 64), "num_requests": (64, 256),
}


def add_gpu_bench_args(parser: argparse.ArgumentParser) -> None:
    """The options of the GPU benchmark (``yaie.bench.gpu``), run when ``--preset`` is given."""
    g = parser.add_argument_group("GPU benchmark (with --preset)")
    g.add_argument("--preset", default=None,
                   help="built-in model shape with random weights: qwen3-0.6b, llama-3.1-8b, ...")
    g.add_argument("--no-peers", dest="peers", action="store_false",
                   help="skip transformers generate_batch")
    g.add_argument("--peer-requests", type=int, default=None,
                   help="throughput: give transformers only the first N requests (default: all)")


def _bench_model(args: argparse.Namespace) -> None:
    for name, (cpu, gpu) in _BENCH_DEFAULTS.items():
        if getattr(args, name, 0) is None:
            setattr(args, name, gpu if args.preset else cpu)
    if args.preset:
        from yaie.bench import gpu

        gpu.run(args)
        return
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
    cpu_kern = bench_sub.add_parser(
        "cpu-kernels", help="CPU projections, decode attention and elementwise ops: numba vs torch"
    )
    cpu_kern.add_argument("--rounds", type=int, default=7)
    cpu_kern.set_defaults(func=_bench_cpu_kernels)
    lat = bench_sub.add_parser("latency", help="batch-1 / batch-N decode and prefill vs peers")
    lat.add_argument("model", nargs="?", default=None)
    lat.add_argument("--prompt-len", type=int, default=None, help="default 32 (128 with --preset)")
    lat.add_argument("--new-tokens", type=int, default=None, help="default 128 (256 with --preset)")
    lat.add_argument("--batch", type=int, default=None, help="default 16 (64 with --preset)")
    lat.add_argument("--prefill-len", type=int, default=512)
    lat.add_argument("--repeat", type=int, default=3)
    EngineArgs.add_cli_args(lat)
    add_gpu_bench_args(lat)
    lat.set_defaults(func=_bench_model)
    thr = bench_sub.add_parser("throughput", help="many requests of random lengths vs transformers")
    thr.add_argument("model", nargs="?", default=None)
    thr.add_argument("--num-requests", type=int, default=None, help="default 64 (256 with --preset)")
    EngineArgs.add_cli_args(thr)
    add_gpu_bench_args(thr)
    thr.set_defaults(func=_bench_model)
    add_bench_serve_parser(bench_sub)
    add_simulator_parsers(sub)
    add_serve_parser(sub)
    add_chat_parser(sub)
    add_dashboard_parser(sub)
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
