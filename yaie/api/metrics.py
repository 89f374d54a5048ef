"""``GET /metrics``: the server's counters in the Prometheus text format, written by hand.

Two sources feed it. Latencies (TTFT, TPOT, end-to-end, queue time) come from the
``RequestMetrics`` each finished choice carries, observed here as the server streams it; HTTP
outcomes come from a small ASGI middleware. Gauges and token counters are read from the engine
(``AsyncEngine.stats()``) at scrape time, so they cannot drift from it. The process's resident
memory is exported too: the load test (``yaie bench serve --load-test``) reads it to check
that memory returns to its warm-up level.
"""

from __future__ import annotations

import bisect
import os
import resource
import sys
from collections import Counter
from dataclasses import dataclass, field

from yaie.core.metrics import RequestMetrics

PREFIX = "yaie"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_GAP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass(slots=True)
class Histogram:
    """A cumulative Prometheus histogram (counts per upper bound, plus sum and count)."""

    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.count += 1

    def render(self) -> list[str]:
        name = f"{PREFIX}_{self.name}"
        lines = [f"# HELP {name} {self.help}", f"# TYPE {name} histogram"]
        cumulative = 0
        for bound, n in zip(self.buckets, self.counts):
            cumulative += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        lines += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.total}",
            f"{name}_count {self.count}",
        ]
        return lines


class ServerMetrics:
    """What the API layer observes; ``render`` adds the engine's own counters and gauges."""

    def __init__(self) -> None:
        self.http_responses: Counter[tuple[str, int]] = Counter()  # (path, status) → count
        self.finished: Counter[str] = Counter()  # finish reason → choices
        self.ttft = Histogram(
            "time_to_first_token_seconds", "Arrival to first token.", _LATENCY_BUCKETS
        )
        self.tpot = Histogram(
            "time_per_output_token_seconds", "Mean gap between output tokens.", _TOKEN_GAP_BUCKETS
        )
        self.e2e = Histogram("e2e_request_latency_seconds", "Arrival to finish.", _LATENCY_BUCKETS)
        self.queue = Histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", _LATENCY_BUCKETS
        )

    def observe_finished(self, m: RequestMetrics) -> None:
        self.finished[m.finish_reason or "unknown"] += 1
        for histogram, value in (
            (self.ttft, m.ttft),
            (self.tpot, m.tpot),
            (self.e2e, m.e2e),
            (self.queue, m.queue_time),
        ):
            if value is not None:
                histogram.observe(value)

    def render(self, stats: dict) -> str:
        """The whole exposition; ``stats`` is ``AsyncEngine.stats()``."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            full = f"{PREFIX}_{name}"
            lines.extend((f"# HELP {full} {help}", f"# TYPE {full} {kind}"))
            lines.extend(f"{full}{labels} {value}" for labels, value in samples)

        metric(
            "http_responses_total",
            "counter",
            "HTTP responses by path and status code.",
            [
                (f'{{path="{p}",status="{s}"}}', n)
                for (p, s), n in sorted(self.http_responses.items())
            ],
        )
        metric(
            "requests_finished_total",
            "counter",
            "Finished choices (one per n) by finish reason.",
            [(f'{{finish_reason="{r}"}}', n) for r, n in sorted(self.finished.items())],
        )
        metric(
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of admitted requests.",
            [("", stats["prompt_tokens"])],
        )
        metric(
            "generation_tokens_total",
            "counter",
            "Generated tokens.",
            [("", stats["generation_tokens"])],
        )
        metric("engine_steps_total", "counter", "Engine steps run.", [("", stats["num_steps"])])
        metric(
            "preemptions_total",
            "counter",
            "Requests preempted for KV space.",
            [("", stats["preemptions"])],
        )
        metric(
            "num_requests_running",
            "gauge",
            "Requests in the running batch.",
            [("", stats["running"])],
        )
        metric(
            "num_requests_waiting",
            "gauge",
            "Requests in the waiting queue.",
            [("", stats["waiting"])],
        )
        free, cached, total = stats["blocks_free"], stats["blocks_cached"], stats["blocks_total"]
        metric(
            "kv_blocks",
            "gauge",
            "KV cache blocks by state: used (held by requests), cached (held only by the radix tree), free.",
            [
                ('{state="used"}', total - free - cached),
                ('{state="cached"}', cached),
                ('{state="free"}', free),
            ],
        )
        metric("kv_blocks_total", "gauge", "KV cache blocks in the pool.", [("", total)])
        metric(
            "prefix_cache_hit_rate",
            "gauge",
            "Share of finished requests' prompt tokens served from the prefix cache.",
            [("", stats["prefix_hit_rate"])],
        )
        for histogram in (self.ttft, self.tpot, self.e2e, self.queue):
            lines.extend(histogram.render())
        lines += [
            "# HELP process_resident_memory_bytes Resident memory size in bytes.",
            "# TYPE process_resident_memory_bytes gauge",
            f"process_resident_memory_bytes {resident_memory_bytes()}",
        ]
        return "\n".join(lines) + "\n"


def resident_memory_bytes() -> int:
    """This process's RSS now (Linux ``/proc``); elsewhere its peak RSS, the best available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, others KiB
