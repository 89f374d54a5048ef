"""Does the simulator tell the truth? The same trace through the real engine and the simulator.

``replay`` serves a trace with the real model in real time: one loop adds every request whose
arrival time has come (stamped with its trace arrival time, so a request that arrives during a
step is measured from when it arrived, not from when the loop noticed it) and then runs one
``engine.step()``; with nothing to do it sleeps until the next arrival. That is what the
simulator's SimPy processes do in simulated time, and what a server's engine thread does, so
both sides make the same scheduling decisions on the same token ids (``PromptSynth``). The
metrics come from the same ``summarize`` on the same ``RequestMetrics`` records.

What differs is only each step's duration: measured on one side, predicted by the cost model on
the other. ``compare`` puts both side by side with relative errors.

torch is imported (through ``yaie.llm``) only by the caller that builds the ``LLM``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from yaie.core.metrics import RequestMetrics
from yaie.core.sampling import SamplingParams
from yaie.simulator.cost import CalibratedCostModel
from yaie.simulator.profile import StepSample, StepTimer, fit_quality, warm_up
from yaie.simulator.traces import PromptSynth, Trace

if TYPE_CHECKING:
    from yaie.llm import LLM

logger = logging.getLogger(__name__)

# summarize's key → (label, unit scale, format): the rows of the comparison table
ROWS = {
    "output_tok_s": ("throughput (output tok/s)", 1.0, ",.1f"),
    "total_tok_s": ("throughput (total tok/s)", 1.0, ",.1f"),
    "ttft_p50": ("TTFT p50 (ms)", 1000.0, ",.1f"),
    "ttft_p90": ("TTFT p90 (ms)", 1000.0, ",.1f"),
    "tpot_p50": ("TPOT p50 (ms)", 1000.0, ",.1f"),
    "tpot_p90": ("TPOT p90 (ms)", 1000.0, ",.1f"),
    "e2e_p50": ("E2E p50 (s)", 1.0, ",.2f"),
    "prefix_hit_rate": ("prefix hit rate (%)", 100.0, ".1f"),
}
# the targets: these within 10%, the hit rate within 5 points
TARGETS = {"output_tok_s": 0.10, "ttft_p50": 0.10, "tpot_p50": 0.10, "prefix_hit_rate": 5.0}


@dataclass(slots=True)
class Comparison:
    """One metric on both sides. ``error`` is the simulator's relative error, except for the
    prefix hit rate: there it is the difference in percentage points."""

    key: str
    real: float | None
    simulated: float | None
    error: float | None
    target: float | None
    ok: bool | None


@dataclass(slots=True)
class RealRun:
    metrics: list[RequestMetrics]
    duration: float  # seconds from the trace's time 0 to the last finish
    steps: list[StepSample]  # every step's shape and measured duration
    rejected: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def replay(
    llm: LLM,
    trace: Trace,
    progress: Callable[[int], None] | None = None,
) -> RealRun:
    """Serve ``trace`` on ``llm``'s engine in real time; returns every finished request's
    metrics and every step's shape and duration. The engine must be idle. Outputs end at the
    trace's output lengths (EOS ignored); a reply the trace names (``reply_group``) is not
    forced on the real model, so conversation traces share less than in the simulator."""
    engine = llm.engine
    if engine.has_unfinished:
        raise ValueError("the engine must be idle to replay a trace")
    synth = PromptSynth(trace.hash_block)
    requests = trace.requests
    prompts = [synth.prompt(r, i) for i, r in enumerate(requests)]  # not on the clock
    warm_up(engine)
    load_before = os.getloadavg()
    clock = engine.clock
    metrics: list[RequestMetrics] = []
    rejected = 0
    nxt = 0
    with StepTimer(engine) as timer:
        t0 = clock()
        while nxt < len(requests) or engine.has_unfinished:
            now = clock() - t0
            while nxt < len(requests) and requests[nxt].arrival <= now:
                req = requests[nxt]
                params = SamplingParams(max_tokens=req.output_len, temperature=0.0, ignore_eos=True)
                try:
                    engine.add_request(
                        str(nxt), prompts[nxt], params, arrival_time=t0 + req.arrival
                    )
                except ValueError as exc:
                    logger.warning("request %d refused: %s", nxt, exc)
                    rejected += 1
                nxt += 1
            if engine.has_unfinished:
                for out in timer.step():
                    if out.finished and out.metrics is not None:
                        metrics.append(out.metrics)
                        if progress is not None:
                            progress(len(metrics))
            elif nxt < len(requests):
                time.sleep(max(0.0, t0 + requests[nxt].arrival - clock()))
        duration = clock() - t0
    return RealRun(metrics, duration, timer.samples, rejected, load_before, os.getloadavg())


def step_errors(model: CalibratedCostModel, steps: list[StepSample]) -> dict[str, float]:
    """The cost model on the real run's own steps, without the scheduling feedback of a whole
    simulation: predicted and measured busy time, and the error of single steps."""
    predicted = [model.predict(s.tokens, s.features) for s in steps]
    out = {
        "steps": len(steps),
        "busy_s": sum(s.seconds for s in steps),
        "predicted_busy_s": sum(predicted),
    }
    for kind, quality in fit_quality(steps, predicted).items():
        out.update({f"{kind}_{name}": value for name, value in quality.items()})
    return out


def compare(real: dict[str, float], sim: dict[str, float]) -> list[Comparison]:
    """Both ``summarize`` dicts, row by row, against the issue's targets."""
    rows = []
    for key in ROWS:
        r, s = real.get(key), sim.get(key)
        if r is None or s is None or (not r and key != "prefix_hit_rate"):
            error = None
        else:
            error = 100 * (s - r) if key == "prefix_hit_rate" else (s - r) / r
        target = TARGETS.get(key)
        ok = None if target is None or error is None else abs(error) <= target
        rows.append(Comparison(key, r, s, error, target, ok))
    return rows


def format_comparison(
    rows: list[Comparison], corrected: list[Comparison], factor: float, title: list[str]
) -> str:
    """The table: real, simulated and its error against the target, then the simulation
    repeated with every step time scaled by ``factor`` (see ``speed_factor``)."""
    head = f"{'':<27}{'real':>10}{'simulated':>11}{'error':>9}  {'target':<12}"
    lines = [*title, "", f"{head}{f'x{factor:.2f} speed':>12}{'error':>9}"]
    for row, again in zip(rows, corrected):
        label, scale, fmt = ROWS[row.key]
        points = row.key == "prefix_hit_rate"
        verdict = ""
        if row.target is not None:
            bound = f"±{row.target:g} pt" if points else f"±{100 * row.target:g}%"
            verdict = f"{bound} {'met' if row.ok else 'MISSED'}"
        real, sim, fast = (
            "-" if x is None else format(x * scale, fmt)
            for x in (row.real, row.simulated, again.simulated)
        )
        lines.append(
            f"{label:<27}{real:>10}{sim:>11}{_error(row.error, points):>9}  {verdict:<12}"
            f"{fast:>12}{_error(again.error, points):>9}"
        )
    return "\n".join(lines)


def _error(error: float | None, points: bool) -> str:
    if error is None:
        return "-"
    return f"{error:+.1f} pt" if points else f"{100 * error:+.1f}%"


def speed_factor(model: CalibratedCostModel, steps: list[StepSample]) -> float:
    """Measured over predicted busy time on the real run's steps: how much slower (> 1) or
    faster the machine ran during the replay than during ``yaie profile``. On a machine shared
    with other jobs this drifts by tens of percent within minutes, the same for every kind of
    step; a simulation scaled by it shows what is left: the error of the model's shape and of
    the simulated scheduling, which is what the simulator itself is answerable for."""
    predicted = sum(model.predict(s.tokens, s.features) for s in steps)
    return sum(s.seconds for s in steps) / predicted if predicted > 0 else 1.0
