"""What a simulation run measured: a terminal table, JSON and CSV records, PNG plots.

Latency and throughput come from ``yaie.core.metrics.summarize`` over the engines' own
``RequestMetrics``: the very code that measures the real engine, so a simulated and a real run
of the same trace are compared like for like. This module only adds what a simulation alone
knows: KV-block usage and queues over time, refused requests, the per-replica split and how
fast the simulator ran.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from yaie.core.metrics import summarize
from yaie.simulator.driver import Sample, SimResult
from yaie.simulator.traces import Trace


def build_report(
    result: SimResult,
    setup: dict[str, Any],
    num_blocks: int,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
) -> dict[str, Any]:
    """Everything worth keeping from a run, JSON-ready (NaN becomes ``None``)."""
    metrics = summarize(result.metrics, result.sim_time, ttft_slo, tpot_slo)
    total_blocks = num_blocks * len(result.replicas)
    per_time = _aggregate(result.samples)
    used = [s["blocks_used"] / total_blocks for s in per_time]
    occupied = [(s["blocks_used"] + s["blocks_cached_only"]) / total_blocks for s in per_time]
    busy = sum(r.busy_time for r in result.replicas)
    report = {
        "setup": setup,
        "trace": {"requests": result.num_requests, "notes": result.notes},
        "metrics": metrics,
        "slo": {"ttft_s": ttft_slo, "tpot_s": tpot_slo},
        "engine": {
            "steps": result.steps,
            "preemptions": result.preemptions,
            "kv_used_mean": _mean(used),
            "kv_used_peak": max(used, default=0.0),
            "kv_occupied_peak": max(occupied, default=0.0),
            "running_mean": _mean([s["running"] for s in per_time]),
            "waiting_mean": _mean([s["waiting"] for s in per_time]),
            "waiting_max": int(max((s["waiting"] for s in per_time), default=0)),
            "busy_fraction": busy / (result.sim_time * len(result.replicas))
            if result.sim_time
            else 0.0,
        },
        "rejected": {
            "count": len(result.rejected),
            "by_reason": dict(Counter(r.reason for r in result.rejected)),
        },
        "replicas": [
            {
                "replica": r.index,
                "requests": r.requests,
                "steps": r.steps,
                "preemptions": r.preemptions,
                "prefix_hit_rate": r.prefix_hit_rate,
                "busy_fraction": r.busy_time / result.sim_time if result.sim_time else 0.0,
            }
            for r in result.replicas
        ],
        "speed": {
            "wall_s": result.wall_time,
            "simulated_s": result.sim_time,
            "requests_per_wall_s": result.requests_per_wall_second,
            "steps_per_wall_s": result.steps / result.wall_time if result.wall_time else math.inf,
        },
    }
    return _jsonable(report)


def format_table(report: dict[str, Any]) -> str:
    """The terminal summary: one screen, latencies in milliseconds."""
    m, e, s, setup = report["metrics"], report["engine"], report["speed"], report["setup"]
    lines = [
        f"yaie simulate: {setup.get('model')} on {setup.get('hardware')}"
        + (
            f", {setup['replicas']} replicas ({setup['router']})"
            if setup.get("replicas", 1) > 1
            else ""
        ),
        f"trace: {setup.get('trace')} ({report['trace']['requests']} requests)",
    ]
    lines += [f"  note: {n}" for n in report["trace"]["notes"]]
    rej = report["rejected"]
    if rej["count"]:
        reasons = ", ".join(f"{n} {why}" for why, n in rej["by_reason"].items())
        lines.append(f"  refused: {rej['count']} ({reasons})")
    lines.append("")
    lines.append(f"{'latency (ms)':<14}{'p50':>12}{'p90':>12}{'p99':>12}{'mean':>12}")
    for key, label in (
        ("ttft", "TTFT"),
        ("tpot", "TPOT"),
        ("itl", "ITL"),
        ("e2e", "E2E"),
        ("queue", "queue"),
    ):
        row = [m.get(f"{key}_p{q}") for q in (50, 90, 99)] + [m.get(f"{key}_mean")]
        lines.append(f"{label:<14}" + "".join(f"{_ms(v):>12}" for v in row))
    lines.append("")
    rows = [
        ("completed", f"{m['completed']:,} of {report['trace']['requests']:,} requests"),
        ("simulated time", f"{m['duration_s']:,.1f} s"),
        (
            "throughput",
            f"{_num(m['output_tok_s'])} output tok/s, {_num(m['total_tok_s'])} total tok/s, "
            f"{_num(m['completed'] / m['duration_s'] if m['duration_s'] else None, 2)} req/s",
        ),
    ]
    if "goodput_req_s" in m:
        slo = report["slo"]
        bounds = ", ".join(
            f"{k.split('_')[0].upper()} <= {1000 * v:g} ms" for k, v in slo.items() if v is not None
        )
        rows.append(("goodput", f"{_num(m['goodput_req_s'], 2)} req/s within SLO ({bounds})"))
    rows += [
        (
            "prefix cache",
            f"{m['prefix_hit_rate']:.1%} of prompt tokens hit "
            f"({m['cached_tokens']:,} of {m['input_tokens']:,})",
        ),
        (
            "KV blocks",
            f"{e['kv_used_mean']:.1%} used on average, peak {e['kv_used_peak']:.1%} "
            f"(with cached: {e['kv_occupied_peak']:.1%})",
        ),
        (
            "queues",
            f"running {e['running_mean']:.1f} avg, waiting {e['waiting_mean']:.1f} avg / "
            f"{e['waiting_max']} max",
        ),
        (
            "engine",
            f"{e['steps']:,} steps, {e['preemptions']:,} preemptions, "
            f"busy {e['busy_fraction']:.0%}",
        ),
        (
            "simulator",
            f"{s['wall_s']:.1f} s wall, {_num(s['requests_per_wall_s'])} requests/s, "
            f"{_num(s['steps_per_wall_s'])} steps/s",
        ),
    ]
    lines += [f"{k:<16}{v}" for k, v in rows]
    if len(report["replicas"]) > 1:
        lines.append("")
        lines.append(
            f"{'replica':>8}{'requests':>10}{'steps':>10}{'preempt':>9}{'hit rate':>10}{'busy':>7}"
        )
        for r in report["replicas"]:
            lines.append(
                f"{r['replica']:>8}{r['requests']:>10,}{r['steps']:>10,}{r['preemptions']:>9,}"
                f"{r['prefix_hit_rate']:>10.1%}{r['busy_fraction']:>7.0%}"
            )
    return "\n".join(lines)


# The counts of a ``Sample`` (all but its time and replica): the columns of ``timeseries.csv``
# after those two, and what ``_aggregate`` sums across replicas.
_SAMPLE_COUNTS = (
    "running",
    "waiting",
    "blocks_used",
    "blocks_cached_only",
    "blocks_free",
    "generated_tokens",
    "preemptions",
)


def write_report(
    out_dir: Path, report: dict[str, Any], result: SimResult, trace: Trace, plots: bool = True
) -> list[Path]:
    """``summary.json``, ``requests.csv``, ``timeseries.csv`` and, with ``plots``, PNGs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "summary.json", out_dir / "requests.csv", out_dir / "timeseries.csv"]
    paths[0].write_text(json.dumps(report, indent=2) + "\n")
    arrivals = trace.requests
    _write_csv(
        paths[1],
        [
            "request",
            "arrival_s",
            "prompt_tokens",
            "cached_tokens",
            "output_tokens",
            "finish_reason",
            "queue_s",
            "ttft_s",
            "tpot_s",
            "e2e_s",
            "preemptions",
        ],
        (
            [
                r.request_id,
                _g(arrivals[int(r.request_id)].arrival),
                r.num_prompt_tokens,
                r.num_cached_tokens,
                r.num_output_tokens,
                r.finish_reason,
                _g(r.queue_time),
                _g(r.ttft),
                _g(r.tpot),
                _g(r.e2e),
                r.num_preemptions,
            ]
            for r in sorted(result.metrics, key=lambda r: int(r.request_id))
        ),
    )
    _write_csv(
        paths[2],
        ["time_s", "replica", *_SAMPLE_COUNTS],
        ([_g(s.time), s.replica, *(getattr(s, n) for n in _SAMPLE_COUNTS)] for s in result.samples),
    )
    if plots:
        paths += plot(out_dir, result)
    return paths


def plot(out_dir: Path, result: SimResult) -> list[Path]:
    """``latency.png`` (CDFs) and ``timeline.png`` (KV blocks, queues, throughput over time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in result.metrics if r.finish_reason in ("stop", "length")]
    series = {
        "TTFT (ms)": [1000 * r.ttft for r in done if r.ttft is not None],
        "TPOT (ms)": [1000 * r.tpot for r in done if r.tpot is not None],
        "E2E latency (s)": [r.e2e for r in done if r.e2e is not None],
    }
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (label, values) in zip(axes, series.items()):
        values.sort()
        if values:
            # at most ~2000 points: the curve looks the same and draws in a blink
            n = len(values)
            ranks = sorted({min(n - 1, i * n // 2000) for i in range(2001)})
            ax.plot([values[i] for i in ranks], [(i + 1) / n for i in ranks])
            ax.set_xscale("log" if values[0] > 0 and values[-1] / values[0] > 100 else "linear")
        ax.set_xlabel(label)
        ax.set_ylabel("fraction of requests")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs ({len(done):,} requests)")
    fig.tight_layout()
    latency = out_dir / "latency.png"
    fig.savefig(latency, dpi=110)
    plt.close(fig)

    per_time = _aggregate(result.samples)
    t = [s["time"] for s in per_time]
    fig, axes = plt.subplots(3, 1, figsize=(11, 8.5), sharex=True)
    axes[0].stackplot(
        t,
        [s["blocks_used"] for s in per_time],
        [s["blocks_cached_only"] for s in per_time],
        [s["blocks_free"] for s in per_time],
        labels=["used by requests", "cached only", "free"],
        colors=["#d62728", "#1f77b4", "#dddddd"],
    )
    axes[0].set_ylabel("KV blocks")
    axes[0].legend(loc="upper right", fontsize=8)
    axes[1].plot(t, [s["running"] for s in per_time], label="running")
    axes[1].plot(t, [s["waiting"] for s in per_time], label="waiting")
    axes[1].set_ylabel("requests")
    axes[1].legend(loc="upper right", fontsize=8)
    rate = [0.0] + [
        (b["generated_tokens"] - a["generated_tokens"]) / (b["time"] - a["time"])
        if b["time"] > a["time"]
        else 0.0
        for a, b in zip(per_time, per_time[1:])
    ]
    axes[2].plot(t, rate, color="#2ca02c")
    axes[2].set_ylabel("output tokens/s")
    axes[2].set_xlabel("simulated time (s)")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Engine state over time"
        + (f" (sum of {len(result.replicas)} replicas)" if len(result.replicas) > 1 else "")
    )
    fig.tight_layout()
    timeline = out_dir / "timeline.png"
    fig.savefig(timeline, dpi=110)
    plt.close(fig)
    return [latency, timeline]


def _aggregate(samples: list[Sample]) -> list[dict[str, float]]:
    """Sum the replicas' samples taken at the same instant."""
    by_time: dict[float, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for s in samples:
        row = by_time[s.time]
        for name in _SAMPLE_COUNTS:
            row[name] += getattr(s, name)
    return [{"time": t, **row} for t, row in sorted(by_time.items())]


def _write_csv(path: Path, header: list[str], rows: Iterable[list[Any]]) -> None:
    """One header line, then a line per row (rows stream in: a long run has millions)."""
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _jsonable(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _ms(value: float | None) -> str:
    """Milliseconds, with one decimal while it fits a column (an overloaded run waits hours)."""
    if value is None:
        return "-"
    return f"{1000 * value:,.1f}" if value < 1000 else f"{1000 * value:,.0f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"
