"""``yaie simulate TRACE`` and ``yaie trace generate|info``: the simulator's commands.

``add_parser`` registers them on the ``yaie`` command's sub-parsers. Errors a user can cause
(a missing file, a bad option) raise ``ValueError`` / ``FileNotFoundError``, which ``yaie``
prints as one line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from yaie.simulator.cluster import ROUTERS
from yaie.simulator.cost import MODELS
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.traces import FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "simulate",
        help="replay a request trace through the engine's scheduler in simulated time",
        description="Replay TRACE through the real scheduler and KV cache, with step times from a "
        "roofline cost model of MODEL on HARDWARE; print a summary and (with --out) write "
        "summary.json, requests.csv, timeseries.csv and plots.",
    )
    sim.add_argument("trace", type=Path, help="trace file: our JSONL, Azure CSV or Mooncake JSONL")
    sim.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    sim.add_argument(
        "--model",
        default="llama-3.1-8b",
        help=f"{', '.join(MODELS)} or a path to a config.json (default: llama-3.1-8b)",
    )
    sim.add_argument("--hardware", default="h100", type=str.lower, choices=list(HARDWARE))
    sim.add_argument(
        "--dtype-bytes",
        type=int,
        choices=[1, 2, 4],
        default=None,
        help="bytes per weight/KV element (default: the hardware's: 2 on GPUs, 4 on cpu)",
    )
    sim.add_argument("--replicas", type=int, default=1, help="engines behind a router")
    sim.add_argument(
        "--router",
        default="prefix",
        choices=ROUTERS,
        help="rr: round-robin, least: least outstanding tokens, prefix: longest cached prefix",
    )
    eng = sim.add_argument_group("engine (per replica)")
    eng.add_argument("--max-num-seqs", type=int, default=256)
    eng.add_argument("--max-num-batched-tokens", type=int, default=2048)
    eng.add_argument("--block-size", type=int, default=16)
    eng.add_argument(
        "--num-blocks",
        type=int,
        default=None,
        help="KV blocks (default: what fits in the hardware's memory beside the weights)",
    )
    eng.add_argument("--max-model-len", type=int, default=None, help="default: the model's context")
    eng.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false")
    eng.add_argument("--no-chunked-prefill", dest="chunked_prefill", action="store_false")
    tr = sim.add_argument_group("trace shaping")
    tr.add_argument(
        "--window",
        default=None,
        metavar="START:END",
        help="keep arrivals in [START, END) seconds, re-based to 0",
    )
    tr.add_argument("--limit", type=int, default=None, help="keep the first N requests")
    tr.add_argument("--rate-scale", type=float, default=1.0, help="multiply the arrival rate")
    tr.add_argument(
        "--input-scale",
        type=float,
        default=1.0,
        help="multiply prompt lengths (and the hash block, keeping prefix sharing)",
    )
    tr.add_argument("--max-input-len", type=int, default=None, help="clip prompts to N tokens")
    tr.add_argument("--max-output-len", type=int, default=None, help="clip outputs to N tokens")
    rep = sim.add_argument_group("report")
    rep.add_argument("--out", type=Path, default=None, help="write the report files into DIR")
    rep.add_argument(
        "--ttft-slo", type=float, default=None, metavar="MS", help="TTFT SLO for goodput (ms)"
    )
    rep.add_argument(
        "--tpot-slo", type=float, default=None, metavar="MS", help="TPOT SLO for goodput (ms)"
    )
    rep.add_argument(
        "--record-kv",
        action="store_true",
        help="also write kv_trace.jsonl: per-sample KV block maps for the dashboard",
    )
    rep.add_argument(
        "--sample-interval",
        type=float,
        default=None,
        metavar="S",
        help="seconds between time-series samples (default: ~500 over the trace)",
    )
    rep.add_argument("--no-plots", dest="plots", action="store_false")
    rep.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="progress bar on stderr (default: on a terminal, for 1000+ requests)",
    )
    sim.set_defaults(func=run_simulate)

    trace = subparsers.add_parser("trace", help="generate or inspect request traces")
    trace_sub = trace.add_subparsers(dest="trace_command", required=True)
    gen = trace_sub.add_parser(
        "generate",
        help="write a synthetic trace (our JSONL)",
        description="Independent requests (Poisson or Gamma-bursty arrivals, lognormal lengths, "
        "optional shared system prompts) or, with --conversations, multi-turn chats that re-send "
        "their history.",
    )
    gen.add_argument("out", type=Path, help="output .jsonl")
    gen.add_argument(
        "-n",
        "--requests",
        type=int,
        default=1000,
        help="requests (or conversations, with --conversations)",
    )
    gen.add_argument("--rate", type=float, default=10.0, help="arrivals per second")
    gen.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="coefficient of variation of inter-arrival gaps (1 = Poisson, >1 = bursty)",
    )
    gen.add_argument(
        "--input-len", type=float, default=512, help="mean prompt (or user message) tokens"
    )
    gen.add_argument("--output-len", type=float, default=128, help="mean output tokens")
    gen.add_argument(
        "--sigma", type=float, default=1.0, help="lognormal spread of lengths (0 = fixed)"
    )
    gen.add_argument("--max-len", type=int, default=8192, help="clip each sampled length to this")
    gen.add_argument(
        "--lengths-from",
        type=Path,
        default=None,
        help="draw (input, output) lengths from this trace instead (empirical)",
    )
    gen.add_argument("--prefix-groups", type=int, default=0, help="number of shared system prompts")
    gen.add_argument("--prefix-len", type=int, default=0, help="tokens of each system prompt")
    gen.add_argument("--conversations", action="store_true", help="multi-turn conversations")
    gen.add_argument("--turns", type=float, default=4.0, help="mean turns per conversation")
    gen.add_argument("--think-time", type=float, default=20.0, help="mean seconds between turns")
    gen.add_argument(
        "--max-context", type=int, default=8192, help="a conversation stops before this"
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.set_defaults(func=run_generate)
    info = trace_sub.add_parser("info", help="print a trace's size, rate, lengths and prefix reuse")
    info.add_argument("trace", type=Path)
    info.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    info.set_defaults(func=run_info)


def run_simulate(args: argparse.Namespace) -> None:
    from yaie.simulator.cluster import make_router
    from yaie.simulator.cost import RooflineCostModel, get_model, num_kv_blocks, with_dtype
    from yaie.simulator.driver import SimConfig, simulate
    from yaie.simulator.hardware import get_hardware
    from yaie.simulator.report import build_report, format_table, write_report
    from yaie.simulator.traces import LoadOptions, load_trace

    for name in ("replicas", "max_num_seqs", "max_num_batched_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.record_kv and args.out is None:
        raise ValueError("--record-kv writes into the report folder: give --out DIR too")
    hw = get_hardware(args.hardware)
    model = with_dtype(get_model(args.model), args.dtype_bytes or hw.dtype_bytes)
    options = LoadOptions(
        window=_parse_window(args.window),
        rate_scale=args.rate_scale,
        input_scale=args.input_scale,
        max_input_len=args.max_input_len,
        max_output_len=args.max_output_len,
        limit=args.limit,
    )
    started = time.perf_counter()
    trace = load_trace(args.trace, args.format, options)
    loaded = time.perf_counter()
    if not trace.requests:
        raise ValueError(f"{args.trace}: no requests left to simulate")
    if args.num_blocks is not None and args.num_blocks < 1:
        raise ValueError("--num-blocks must be >= 1")
    num_blocks = args.num_blocks or num_kv_blocks(model, hw, args.block_size)
    max_model_len = args.max_model_len or model.max_position_embeddings
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    config = SimConfig(
        num_blocks=num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_prefix_caching=args.prefix_caching,
        enable_chunked_prefill=args.chunked_prefill,
        sample_interval=args.sample_interval,
        record_kv=args.out / "kv_trace.jsonl" if args.record_kv else None,
        progress=args.progress
        if args.progress is not None
        else sys.stderr.isatty() and len(trace) >= 1000,
    )
    router = make_router(args.router) if args.replicas > 1 else None
    result = simulate(trace, config, RooflineCostModel(model, hw), args.replicas, router)
    setup = {
        "trace": str(args.trace),
        "model": model.name,
        "hardware": hw.name,
        "dtype_bytes": model.dtype_bytes,
        "cost_model": "roofline",
        "replicas": args.replicas,
        "router": args.router if args.replicas > 1 else None,
        "num_blocks": num_blocks,
        "block_size": args.block_size,
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": max_model_len,
        "prefix_caching": args.prefix_caching,
        "chunked_prefill": args.chunked_prefill,
    }
    ttft_slo = args.ttft_slo / 1000 if args.ttft_slo is not None else None
    tpot_slo = args.tpot_slo / 1000 if args.tpot_slo is not None else None
    report = build_report(result, setup, num_blocks, ttft_slo, tpot_slo)
    print(format_table(report))
    if args.out is not None:
        paths = write_report(args.out, report, result, trace, plots=args.plots)
        if config.record_kv is not None:
            paths.append(config.record_kv)
        print(f"\nwrote {', '.join(p.name for p in paths)} to {args.out}")
    total, load = time.perf_counter() - started, loaded - started
    print(
        f"wall time {total:.1f} s: trace {load:.1f} s, simulation {result.wall_time:.1f} s, "
        f"report {total - load - result.wall_time:.1f} s"
    )


def run_generate(args: argparse.Namespace) -> None:
    from yaie.simulator.traces import (
        Arrivals,
        LengthDist,
        generate,
        generate_conversations,
        load_trace,
        write_jsonl,
    )

    arrivals = Arrivals(args.rate, args.burstiness)
    if args.lengths_from is not None:
        source = load_trace(args.lengths_from)
        inputs = LengthDist(empirical=[r.input_len for r in source.requests], high=args.max_len)
        outputs = LengthDist(empirical=[r.output_len for r in source.requests], high=args.max_len)
    else:
        inputs = LengthDist(args.input_len, args.sigma, high=args.max_len)
        outputs = LengthDist(args.output_len, args.sigma, high=args.max_len)
    if args.conversations:
        trace = generate_conversations(
            args.requests,
            arrivals,
            args.turns,
            inputs,
            outputs,
            args.think_time,
            system_len=args.prefix_len,
            num_system_prompts=max(1, args.prefix_groups),
            max_context=args.max_context,
            seed=args.seed,
        )
    else:
        trace = generate(
            args.requests, arrivals, inputs, outputs, args.seed, args.prefix_groups, args.prefix_len
        )
    write_jsonl(trace, args.out)
    print(f"wrote {len(trace)} requests over {trace.span:.1f} s to {args.out}")


def run_info(args: argparse.Namespace) -> None:
    from yaie.simulator.traces import load_trace

    trace = load_trace(args.trace, args.format)
    reqs = trace.requests
    if not reqs:
        print(f"{args.trace}: no requests")
        return
    inputs = [r.input_len for r in reqs]
    outputs = [r.output_len for r in reqs]
    print(
        f"{args.trace}: {len(reqs):,} requests over {trace.span:,.1f} s "
        f"({len(reqs) / trace.span if trace.span else float('inf'):.2f} req/s)"
    )
    for name, xs in (("input", inputs), ("output", outputs)):
        print(
            f"  {name:<7} mean {statistics.fmean(xs):,.0f}  median {statistics.median(xs):,.0f}  "
            f"max {max(xs):,}  total {sum(xs):,} tokens"
        )
    hashed = [h for r in reqs for h in (r.hash_ids or ())]
    if hashed:
        seen: set[int] = set()
        reused = 0
        for h in hashed:
            reused += h in seen
            seen.add(h)
        print(
            f"  hash_ids: {len(hashed):,} blocks of {trace.hash_block} tokens, "
            f"{reused / len(hashed):.0%} "
            "seen earlier in the trace"
        )
    grouped = sum(1 for r in reqs if r.prefix_groups)
    if grouped:
        print(f"  prefix groups: {grouped:,} requests start with named shared segments")


def _parse_window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    start, sep, end = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(start or 0), float(end) if end else float("inf")
    except ValueError:
        raise ValueError(
            f"--window takes START:END in seconds (e.g. 0:600), got {text!r}"
        ) from None
