"""Latency and throughput metrics shared by the real engine, the server and the simulator.

Everything is derived from request timestamps on the engine's clock, so a simulated run and a
real run are measured by the same code.
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass, field

from yaie.core.request import Request


@dataclass(slots=True)
class StepStats:
    step_id: int
    start: float
    end: float
    num_requests: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    blocks_free: int
    blocks_cached: int
    num_preemptions: int  # during this step's scheduling

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(slots=True)
class RequestMetrics:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finish_reason: str | None
    queue_time: float | None  # arrival → first scheduled
    ttft: float | None  # arrival → first token
    e2e: float | None  # arrival → finish
    itls: list[float] = field(default_factory=list)  # gaps between consecutive tokens
    num_preemptions: int = 0

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        return sum(self.itls) / len(self.itls) if self.itls else None

    @classmethod
    def from_request(cls, req: Request) -> RequestMetrics:
        t = req.times

        def since_arrival(x: float | None) -> float | None:
            return None if x is None else x - t.arrival

        tt = t.token_times
        return cls(
            request_id=req.request_id,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=len(req.output_token_ids),
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            queue_time=since_arrival(t.first_scheduled),
            ttft=since_arrival(t.first_token),
            e2e=since_arrival(t.finished),
            itls=list(map(operator.sub, tt[1:], tt)),  # in C: a simulation makes millions
            num_preemptions=req.num_preemptions,
        )


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]); NaN for no values."""
    return _sorted_percentile(sorted(values), q)


def _sorted_percentile(xs: list[float], q: float) -> float:
    if not xs:
        return math.nan
    k = (len(xs) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(
    requests: list[RequestMetrics],
    duration: float,
    ttft_slo: float | None = None,
    tpot_slo: float | None = None,
) -> dict[str, float]:
    """Percentiles of TTFT/TPOT/ITL/E2E, throughput and goodput (requests/s meeting both SLOs)."""
    done = [r for r in requests if r.finish_reason in ("stop", "length")]
    out: dict[str, float] = {
        "requests": len(requests),
        "completed": len(done),
        "duration_s": duration,
        "input_tokens": sum(r.num_prompt_tokens for r in done),
        "cached_tokens": sum(r.num_cached_tokens for r in done),
        "output_tokens": sum(r.num_output_tokens for r in done),
    }
    out["prefix_hit_rate"] = out["cached_tokens"] / out["input_tokens"] if out["input_tokens"] else 0.0
    out["output_tok_s"] = out["output_tokens"] / duration if duration > 0 else math.nan
    out["total_tok_s"] = (out["input_tokens"] + out["output_tokens"]) / duration if duration > 0 else math.nan
    series = {
        "ttft": [r.ttft for r in done if r.ttft is not None],
        "tpot": [r.tpot for r in done if r.tpot is not None],
        "itl": list(itertools.chain.from_iterable(r.itls for r in done)),
        "e2e": [r.e2e for r in done if r.e2e is not None],
        "queue": [r.queue_time for r in done if r.queue_time is not None],
    }
    for name, values in series.items():
        values.sort()  # once: a simulated run has millions of ITLs
        for q in (50, 90, 99):
            out[f"{name}_p{q}"] = _sorted_percentile(values, q)
        out[f"{name}_mean"] = sum(values) / len(values) if values else math.nan
    if ttft_slo is not None or tpot_slo is not None:
        good = [
            r
            for r in done
            if (ttft_slo is None or (r.ttft is not None and r.ttft <= ttft_slo))
            and (tpot_slo is None or r.tpot is None or r.tpot <= tpot_slo)
        ]
        out["goodput_req_s"] = len(good) / duration if duration > 0 else math.nan
    return out
