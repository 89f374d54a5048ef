"""``yaie simulate TRACE`` and ``yaie trace generate|info``: the simulator's commands.

``add_parser`` registers them on the ``yaie`` command's sub-parsers. Errors a user can cause
(a missing file, a bad option) raise ``ValueError`` / ``FileNotFoundError``, which ``yaie``
prints as one line.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

from yaie.args import EngineArgs
from yaie.simulator.cluster import ROUTERS
from yaie.simulator.cost import MODELS
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.traces import FORMATS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "simulate",
        help="replay a request trace through the engine's scheduler in simulated time",
        description="Replay TRACE through the real scheduler and KV cache, with step times from a "
        "roofline cost model of MODEL on HARDWARE or a calibrated one (--cost-model, from `yaie "
        "profile`); print a summary and (with --out) write summary.json, requests.csv, "
        "timeseries.csv and plots. --compare-real also serves TRACE with the real model.",
    )
    sim.add_argument("trace", type=Path, help="trace file: our JSONL, Azure CSV or Mooncake JSONL")
    sim.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    sim.add_argument(
        "--model",
        default=None,
        help=f"roofline: {', '.join(MODELS)} or a path to a config.json (default: llama-3.1-8b)",
    )
    sim.add_argument(
        "--hardware",
        default=None,
        type=str.lower,
        choices=list(HARDWARE),
        help="roofline: the device (default: h100)",
    )
    sim.add_argument(
        "--cost-model",
        type=Path,
        default=None,
        metavar="FILE",
        help="a calibrated cost model written by `yaie profile` instead of the roofline; "
        "the engine settings it was measured with become the defaults",
    )
    sim.add_argument(
        "--compare-real",
        action="store_true",
        help="also serve the trace with the real model in real time (needs --cost-model) and "
        "print both side by side with the simulator's errors",
    )
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
    eng.add_argument("--max-num-seqs", type=int, default=None, help="default: 256")
    eng.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: 2048")
    eng.add_argument("--block-size", type=int, default=None, help="default: 16")
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
        help="also write kv_trace.jsonl: the engine's state per sample, for `yaie dashboard "
        "--replay` (block tables, radix tree, requests; as deltas)",
    )
    rep.add_argument(
        "--record-kv-mb",
        type=float,
        default=8.0,
        metavar="MB",
        help="size cap of kv_trace.jsonl: past its share of the run, samples are skipped "
        "(default: 8)",
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

    prof = subparsers.add_parser(
        "profile",
        help="time the real engine's steps and fit a calibrated cost model for `yaie simulate`",
        description="Run a grid of batch shapes (requests decoding at several context lengths, "
        "joined by prompt chunks with and without a cached prefix) through the real engine, "
        "time every step, fit step time = f(tokens) + attention and per-request terms by least "
        "squares, and save it as JSON for `yaie simulate --cost-model`.",
    )
    prof.add_argument("model", nargs="?", default=None, help="default: the default model")
    prof.add_argument(
        "-o", "--out", type=Path, default=Path("cost_model.json"), help="default: cost_model.json"
    )
    prof.add_argument(
        "--quick",
        action="store_true",
        help="a small grid: under a minute, not five (a rougher fit)",
    )
    prof.add_argument("--repeats", type=int, default=None, help="timed steps per shape")
    prof.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); `--compare-real` uses the same",
    )
    EngineArgs.add_cli_args(prof)
    prof.set_defaults(func=run_profile)

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


# Engine settings when neither the command line nor a calibrated cost model gives them.
ENGINE_DEFAULTS = {"max_num_seqs": 256, "max_num_batched_tokens": 2048, "block_size": 16}


def run_simulate(args: argparse.Namespace) -> None:
    from yaie.simulator.cluster import make_router
    from yaie.simulator.driver import SimConfig, simulate
    from yaie.simulator.report import build_report, format_table, write_report
    from yaie.simulator.traces import LoadOptions, load_trace

    if args.record_kv and args.out is None:
        raise ValueError("--record-kv writes into the report folder: give --out DIR too")
    if args.record_kv_mb <= 0:
        raise ValueError("--record-kv-mb must be > 0")
    if args.compare_real and (args.cost_model is None or args.replicas != 1):
        raise ValueError(
            "--compare-real needs a calibrated cost model (--cost-model FILE, written by "
            "`yaie profile`) and one replica"
        )
    cost_model, setup = _cost_model_and_engine(args)
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
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    real = None
    if args.compare_real:
        llm = _real_engine(setup, cost_model.info)
        setup["num_blocks"] = llm.engine.config.num_blocks  # what the real cache holds
        real = _serve_for_real(llm, trace)
    config = SimConfig(
        num_blocks=setup["num_blocks"],
        block_size=setup["block_size"],
        max_num_seqs=setup["max_num_seqs"],
        max_num_batched_tokens=setup["max_num_batched_tokens"],
        max_model_len=setup["max_model_len"],
        enable_prefix_caching=args.prefix_caching,
        enable_chunked_prefill=args.chunked_prefill,
        sample_interval=args.sample_interval,
        record_kv=args.out / "kv_trace.jsonl" if args.record_kv else None,
        record_kv_max_bytes=int(args.record_kv_mb * 1e6),
        progress=args.progress
        if args.progress is not None
        else sys.stderr.isatty() and len(trace) >= 1000,
    )
    router = make_router(args.router) if args.replicas > 1 else None
    result = simulate(trace, config, cost_model, args.replicas, router)
    # Millions of result objects live until the command exits and hold no cycles: keep the
    # cyclic collector from scanning them again and again while the report is built.
    gc.freeze()
    setup.update(trace=str(args.trace), replicas=args.replicas)
    setup["router"] = args.router if args.replicas > 1 else None
    ttft_slo = args.ttft_slo / 1000 if args.ttft_slo is not None else None
    tpot_slo = args.tpot_slo / 1000 if args.tpot_slo is not None else None
    report = build_report(result, setup, setup["num_blocks"], ttft_slo, tpot_slo)
    if real is not None:
        _print_comparison(args, setup, real, report, result, (trace, config, cost_model))
        return
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


def _cost_model_and_engine(args: argparse.Namespace):
    """The cost model and the engine it prices: a calibrated model brings the settings it was
    measured with (explicit options still win); the roofline takes its model and hardware."""
    from yaie.simulator.cost import (
        CalibratedCostModel,
        RooflineCostModel,
        get_model,
        num_kv_blocks,
        with_dtype,
    )
    from yaie.simulator.hardware import get_hardware

    for name in ("replicas", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_blocks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.cost_model is not None:
        if args.model is not None or args.hardware is not None or args.dtype_bytes is not None:
            raise ValueError(
                "--model, --hardware and --dtype-bytes shape the roofline; a calibrated cost "
                "model (--cost-model) was measured on one model and machine already"
            )
        cost_model = CalibratedCostModel.load(args.cost_model)
        machine = cost_model.info.get("machine", {})
        measured = cost_model.info.get("engine", {})
        if not {"num_blocks", "max_model_len"} <= measured.keys():
            raise ValueError(f"{args.cost_model}: no engine settings (num_blocks, max_model_len)")
        setup = {
            "model": machine.get("model", "?"),
            "hardware": f"{machine.get('cpu', '?')}, {machine.get('device', '?')} "
            f"{machine.get('dtype', '')}, {machine.get('threads', '?')} threads",
            "cost_model": f"calibrated ({args.cost_model})",
        }
        defaults = {**ENGINE_DEFAULTS, **measured}
    else:
        hw = get_hardware(args.hardware or "h100")
        model = with_dtype(
            get_model(args.model or "llama-3.1-8b"), args.dtype_bytes or hw.dtype_bytes
        )
        cost_model = RooflineCostModel(model, hw)
        setup = {
            "model": model.name,
            "hardware": hw.name,
            "dtype_bytes": model.dtype_bytes,
            "cost_model": "roofline",
        }
        block_size = args.block_size or ENGINE_DEFAULTS["block_size"]
        defaults = {
            **ENGINE_DEFAULTS,
            "max_model_len": model.max_position_embeddings,
            "num_blocks": None if args.num_blocks else num_kv_blocks(model, hw, block_size),
        }
    for name in (*ENGINE_DEFAULTS, "num_blocks", "max_model_len"):
        value = getattr(args, name)
        setup[name] = value if value is not None else defaults[name]
    setup.update(prefix_caching=args.prefix_caching, chunked_prefill=args.chunked_prefill)
    return cost_model, setup


def _real_engine(setup: dict, info: dict):
    """The real model, set up as the calibrated cost model was measured (torch loads here)."""
    import torch

    from yaie.llm import LLM

    machine, engine = info.get("machine", {}), info.get("engine", {})
    if machine.get("threads"):
        torch.set_num_threads(machine["threads"])
    return LLM(
        engine.get("model_arg"),
        device=machine.get("device"),
        dtype=machine.get("dtype"),
        kv_cache_memory=engine.get("kv_cache_memory", EngineArgs().kv_cache_memory),
        block_size=setup["block_size"],
        max_num_seqs=setup["max_num_seqs"],
        max_num_batched_tokens=setup["max_num_batched_tokens"],
        max_model_len=setup["max_model_len"],
        enable_prefix_caching=setup["prefix_caching"],
        enable_chunked_prefill=setup["chunked_prefill"],
    )


def _serve_for_real(llm, trace):
    from yaie.simulator.fidelity import replay

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(trace), unit="req", desc="real engine", leave=False)
    try:
        return replay(llm, trace, (lambda n: bar.update(n - bar.n)) if bar else None)
    finally:
        if bar is not None:
            bar.close()


def _print_comparison(args, setup: dict, real, report: dict, result, rerun) -> None:
    """Real against simulated, and against a simulation scaled to the replay's machine speed."""
    import dataclasses
    import json

    from yaie.core.metrics import summarize
    from yaie.simulator.driver import simulate
    from yaie.simulator.fidelity import compare, format_comparison, speed_factor, step_errors

    trace, config, cost_model = rerun
    real_metrics = summarize(real.metrics, real.duration)
    rows = compare(real_metrics, report["metrics"])
    factor = speed_factor(cost_model, real.steps)
    again = simulate(trace, config, cost_model.scaled(factor))
    corrected = summarize(again.metrics, again.sim_time)
    steps = step_errors(cost_model, real.steps)
    load = ", ".join(f"{x:.2f}" for x in real.load_before)
    load_after = ", ".join(f"{x:.2f}" for x in real.load_after)
    title = [
        f"yaie simulate --compare-real: {setup['model']} on {setup['hardware']}",
        f"trace: {setup['trace']} ({report['trace']['requests']} requests)",
        f"cost model: {setup['cost_model']}",
        (
            f"real engine: {len(real.steps):,} steps in {real.duration:.1f} s, "
            f"{real.rejected} refused; load average {load} before, {load_after} after"
        ),
        f"simulator:   {result.steps:,} steps in {report['metrics']['duration_s']:.1f} simulated s",
        (
            f"the cost model on the real run's steps: {steps['predicted_busy_s']:.1f} s predicted "
            f"for {steps['busy_s']:.1f} s measured (machine speed x{factor:.2f} of the profile's), "
            f"single steps off by {steps['all_mean_rel_error']:.1%} on average"
        ),
    ]
    print(format_comparison(rows, compare(real_metrics, corrected), factor, title))
    if args.out is not None:
        record = {
            "setup": setup,
            "real": real_metrics,
            "simulated": report["metrics"],
            "simulated_at_replay_speed": corrected,
            "speed_factor": factor,
            "comparison": [dataclasses.asdict(r) for r in rows],
            "real_steps": len(real.steps),
            "simulated_steps": result.steps,
            "cost_model_on_real_steps": steps,
            "load_average_before": list(real.load_before),
            "load_average_after": list(real.load_after),
            "real_step_samples": [s.to_json() for s in real.steps],
        }
        path = args.out / "fidelity.json"
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        print(f"\nwrote {path}")


def run_profile(args: argparse.Namespace) -> None:
    import dataclasses

    from yaie.llm import LLM
    from yaie.simulator.profile import Grid, format_fit, profile

    grid = Grid.quick() if args.quick else Grid()
    for name in ("repeats", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1")
    if args.repeats is not None:
        grid.repeats = args.repeats
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    engine_args = EngineArgs.from_cli(args)
    llm = LLM(**dataclasses.asdict(engine_args))
    model = profile(llm, grid, lambda line: print(line, file=sys.stderr, flush=True))
    model.info["engine"]["model_arg"] = args.model
    model.save(args.out)
    m = model.info["machine"]
    print(
        f"yaie profile: {m['model']} on {m['cpu']} ({m['device']}, {m['dtype']}, "
        f"{m['threads']} threads), {model.info['profile_seconds']:.0f} s; load average "
        f"{m['load_average'][0]:.2f} before, {m['load_average_after'][0]:.2f} after"
    )
    print("\n".join(format_fit(model)))
    print(f"\nwrote {args.out}")


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
