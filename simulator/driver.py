"""The discrete-event loop: the real engine, stepping in simulated time.

Three kinds of SimPy processes share one clock (``env.now``, seconds):

- arrivals: wait until each trace request's arrival time, build its token ids, hand it to a
  replica (through the router when there are several);
- one engine loop per replica: ``schedule()`` → ``yield env.timeout(predicted duration)`` →
  ``finish_step()``; with nothing to run it sleeps until the next arrival wakes it;
- a sampler: every ``sample_interval`` it records queue lengths and KV-block usage (and, when
  asked, each engine's state for the dashboard's replay: ``kv_recording.py``).

Each replica is a plain ``LLMEngine`` — the same scheduler, KV manager and radix cache as the
real server — whose clock is the simulated time, so request metrics come out of the core exactly
as they do in production. Requests the engine refuses (longer than the context, larger than the
KV pool) are counted and reported, not fatal.

One shortcut keeps the event queue out of the hot loop: a step that ends before the next event
anyone has scheduled (an arrival, a sample, another replica's step) cannot be told apart from one
that waited in the queue, so the replica just moves its own clock (``Replica.now``) past it and
goes on; ``env.now`` catches up at the next step it does yield. Most steps of a busy engine fall
between two arrivals, and a SimPy event costs about as much as the scheduler's work for a few
requests.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import simpy

from yaie.core.engine import EngineConfig, LLMEngine
from yaie.core.metrics import RequestMetrics
from yaie.core.sampling import SamplingParams
from yaie.core.scheduler import SchedulerConfig
from yaie.simulator.cost import CostModel
from yaie.simulator.kv_recording import DEFAULT_MAX_BYTES, KVRecorder
from yaie.simulator.sim_executor import SimExecutor
from yaie.simulator.traces import PromptSynth, Trace, TraceRequest

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class SimConfig:
    """One replica's engine settings, plus how the simulation records what happens."""

    num_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    sample_interval: float | None = None  # seconds between samples; None: about 500 over the trace
    record_kv: Path | None = None  # write the engines' state per sample here (kv_recording.py)
    record_kv_max_bytes: int = DEFAULT_MAX_BYTES  # the recording's size cap
    progress: bool = False  # a tqdm bar on stderr

    def engine_config(self) -> EngineConfig:
        sched = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=self.enable_chunked_prefill,
        )
        return EngineConfig(self.num_blocks, self.block_size, self.enable_prefix_caching, sched)


@dataclass(slots=True)
class Sample:
    """One replica's state at one instant of simulated time."""

    time: float
    replica: int
    running: int
    waiting: int
    blocks_used: int  # referenced by a live request
    blocks_cached_only: int  # held only by the radix tree (evictable)
    blocks_free: int
    generated_tokens: int  # cumulative
    preemptions: int  # cumulative


@dataclass(slots=True)
class ReplicaStats:
    index: int
    requests: int
    steps: int
    busy_time: float
    preemptions: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int

    @property
    def prefix_hit_rate(self) -> float:
        return (
            self.prefix_hit_tokens / self.prefix_queried_tokens
            if self.prefix_queried_tokens
            else 0.0
        )


@dataclass(slots=True)
class Rejection:
    """A request the engine refused; ``reason`` is a short class, ``message`` the engine's words."""

    index: int
    input_len: int
    output_len: int
    reason: str
    message: str


@dataclass(slots=True)
class SimResult:
    metrics: list[RequestMetrics]  # one per finished request, in finishing order
    rejected: list[Rejection]
    sim_time: float  # simulated seconds from time 0 to the last finish
    wall_time: float  # seconds the simulation took to run
    samples: list[Sample]
    replicas: list[ReplicaStats]
    num_requests: int  # in the trace
    notes: list[str] = field(default_factory=list)

    @property
    def steps(self) -> int:
        return sum(r.steps for r in self.replicas)

    @property
    def preemptions(self) -> int:
        return sum(r.preemptions for r in self.replicas)

    @property
    def requests_per_wall_second(self) -> float:
        return self.num_requests / self.wall_time if self.wall_time > 0 else float("inf")


class Router(Protocol):
    """Picks the replica for a request (``yaie.simulator.cluster`` has the implementations)."""

    def choose(self, replicas: list[Replica], prompt: list[int]) -> Replica: ...


class Replica:
    """One engine with its executor and its SimPy loop. ``load`` counts the tokens it still
    owes: whole prompts of unfinished requests plus output tokens not yet generated."""

    def __init__(
        self,
        index: int,
        env: simpy.Environment,
        config: EngineConfig,
        cost_model: CostModel,
        on_finish: Callable[[RequestMetrics], None],
    ) -> None:
        self.index = index
        self.env = env
        self.executor = SimExecutor(cost_model)
        self.now = 0.0  # simulated time for this engine: env.now, or ahead of it (see above)
        self.engine = LLMEngine(config, self.executor, clock=lambda: self.now)
        self.load = 0
        self.num_requests = 0
        self._on_finish = on_finish
        self._sizes: dict[str, tuple[int, int]] = {}
        self._wake: simpy.Event | None = None
        self._batches = 0  # batches scheduled
        self._cached_only = ((-1, -1), 0)  # (as of (batches, steps), blocks only in the tree)
        env.process(self._loop())

    def add(
        self, request_id: str, prompt: list[int], output_len: int, reply: list[int] | None
    ) -> None:
        """Queue a request now; raises ``ValueError`` if the engine refuses it."""
        params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
        self.engine.add_request(request_id, prompt, params, arrival_time=self.env.now)
        if reply is not None:
            self.executor.set_reply(request_id, reply)
        self._sizes[request_id] = (len(prompt), output_len)
        self.load += len(prompt) + output_len
        self.num_requests += 1
        if self._wake is not None and not self._wake.triggered:
            self._wake.succeed()

    def _loop(self) -> Generator[simpy.Event, None, None]:
        """schedule() → wait the predicted step time → finish_step(); idle until woken."""
        engine, executor, env = self.engine, self.executor, self.env
        requests = engine.requests
        while True:
            batch = engine.schedule()
            if batch is None:
                if engine.has_unfinished:  # the core guarantees a lone request always fits
                    raise RuntimeError(
                        f"replica {self.index}: requests are queued but nothing can run"
                    )
                self._wake = env.event()
                yield self._wake
                self._wake = None
                self.now = env.now
                continue
            self._batches += 1
            result = executor.execute(batch)
            end = self.now + result.duration
            if env.peek() <= end:  # something happens before this step ends: wait in the queue
                yield env.timeout(end - env.now)
            self.now = end
            live = len(requests)
            outputs = engine.finish_step(batch, result)
            self.load -= len(result.sampled_token_ids)
            if len(requests) < live:  # some finished: only then look at the outputs
                for out in outputs:
                    if out.finished:
                        self._finished(out.request_id, out.metrics)

    def _finished(self, request_id: str, metrics: RequestMetrics) -> None:
        prompt_len, output_len = self._sizes.pop(request_id)
        self.load -= prompt_len + output_len - metrics.num_output_tokens
        self.executor.forget(request_id)
        self._on_finish(metrics)

    def sample(self, now: float) -> Sample:
        engine = self.engine
        kv = engine.kv
        refs = kv.pool.ref_counts
        free = kv.pool.num_free
        # Blocks change only in schedule() and finish_step(): count again only after either.
        version = (self._batches, engine.num_steps)
        if self._cached_only[0] != version:
            # A cached block used by a request has a second reference; one held only by the
            # tree has exactly one. So tree-only = cached - (refcount >= 2), no tree walk.
            shared = kv.pool.num_blocks - free - refs.count(1)
            self._cached_only = (version, kv.radix.num_cached_blocks - shared)
        cached_only = self._cached_only[1]
        return Sample(
            time=now,
            replica=self.index,
            running=engine.num_running,
            waiting=engine.num_waiting,
            blocks_used=kv.pool.num_blocks - free - cached_only,
            blocks_cached_only=cached_only,
            blocks_free=free,
            generated_tokens=engine.num_generated_tokens,
            preemptions=engine.scheduler.num_preemptions,
        )

    def stats(self) -> ReplicaStats:
        radix = self.engine.kv.radix.stats
        return ReplicaStats(
            index=self.index,
            requests=self.num_requests,
            steps=self.engine.num_steps,
            busy_time=self.executor.busy_time,
            preemptions=self.engine.scheduler.num_preemptions,
            prefix_queried_tokens=radix.queried_tokens,
            prefix_hit_tokens=radix.hit_tokens,
        )


class Simulation:
    """Replays ``trace`` on ``num_replicas`` engines; ``router`` picks one per request."""

    def __init__(
        self,
        trace: Trace,
        config: SimConfig,
        cost_model: CostModel,
        num_replicas: int = 1,
        router: Router | None = None,
    ) -> None:
        if num_replicas < 1:
            raise ValueError(f"need at least one replica, got {num_replicas}")
        if num_replicas > 1 and router is None:
            raise ValueError("several replicas need a router")
        self.trace = trace
        self.config = config
        self.env = simpy.Environment()
        self.router = router
        self.synth = PromptSynth(trace.hash_block)
        engine_config = config.engine_config()
        self.replicas = [
            Replica(i, self.env, engine_config, cost_model, self._on_finish)
            for i in range(num_replicas)
        ]
        self.metrics: list[RequestMetrics] = []
        self.rejected: list[Rejection] = []
        self.samples: list[Sample] = []
        self._pending = 0
        self._arrivals_done = False
        self._done = self.env.event()
        self._bar = None
        self._recorder: KVRecorder | None = None

    def run(self) -> SimResult:
        # The step loop allocates millions of short-lived objects but no reference cycles, so
        # the cyclic collector's repeated scans of the growing heap (metrics, token times) are
        # pure overhead: about a tenth of the run. Reference counting still frees everything.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run()
        finally:
            if collecting:
                gc.enable()

    def _run(self) -> SimResult:
        start = time.perf_counter()
        cfg = self.config
        interval = cfg.sample_interval or max(self.trace.span / 500, 1e-3)
        if cfg.record_kv is not None:
            engines = [r.engine for r in self.replicas]
            self._recorder = KVRecorder(
                cfg.record_kv, engines, len(self.trace), cfg.record_kv_max_bytes
            )
        try:
            self._bar = _progress_bar(len(self.trace)) if cfg.progress else None
            self.env.process(self._arrivals())
            self.env.process(self._sampler(interval))
            if self.trace.requests:
                self.env.run(until=self._done)
            end = max(self.env.now, *(r.now for r in self.replicas))  # the last step's end
            self._take_samples(end)
        finally:
            if self._recorder is not None:
                self._recorder.close()
            if self._bar is not None:
                self._bar.close()
        return SimResult(
            metrics=self.metrics,
            rejected=self.rejected,
            sim_time=end,
            wall_time=time.perf_counter() - start,
            samples=self.samples,
            replicas=[r.stats() for r in self.replicas],
            num_requests=len(self.trace),
            notes=list(self.trace.notes),
        )

    # ------------------------------------------------------------ processes

    def _arrivals(self) -> Generator[simpy.Event, None, None]:
        env, synth, replicas, router = self.env, self.synth, self.replicas, self.router
        for index, req in enumerate(self.trace.requests):
            if req.arrival > env.now:
                yield env.timeout(req.arrival - env.now)
            prompt = synth.prompt(req, index)
            replica = replicas[0] if router is None else router.choose(replicas, prompt)
            try:
                replica.add(str(index), prompt, req.output_len, synth.reply(req))
            except ValueError as exc:
                self._reject(index, req, str(exc))
                continue
            self._pending += 1
        self._arrivals_done = True
        self._check_done()

    def _sampler(self, interval: float) -> Generator[simpy.Event, None, None]:
        while True:
            self._take_samples(self.env.now)
            yield self.env.timeout(interval)

    def _take_samples(self, now: float) -> None:
        if self.samples and self.samples[-1].time == now:  # the final one, if the sampler was there
            return
        for replica in self.replicas:
            self.samples.append(replica.sample(now))
        if self._recorder is not None:
            self._recorder.sample(now, len(self.metrics) + len(self.rejected))

    # ------------------------------------------------------------ bookkeeping

    def _on_finish(self, metrics: RequestMetrics) -> None:
        self.metrics.append(metrics)
        self._pending -= 1
        if self._bar is not None:
            self._bar.update(1)
        self._check_done()

    def _reject(self, index: int, req: TraceRequest, message: str) -> None:
        logger.debug("request %d refused: %s", index, message)
        if req.input_len >= self.config.max_model_len:
            reason = "prompt not shorter than max_model_len"
        elif "KV blocks" in message:
            reason = "needs more KV blocks than the pool"
        else:
            reason = "refused"
        self.rejected.append(Rejection(index, req.input_len, req.output_len, reason, message))
        if self._bar is not None:
            self._bar.update(1)

    def _check_done(self) -> None:
        if self._arrivals_done and self._pending == 0 and not self._done.triggered:
            self._done.succeed()


def _progress_bar(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="req", desc="simulating", mininterval=0.5, leave=False)


def simulate(
    trace: Trace,
    config: SimConfig,
    cost_model: CostModel,
    num_replicas: int = 1,
    router: Router | None = None,
) -> SimResult:
    """Run ``trace`` to completion and return every finished request's metrics."""
    return Simulation(trace, config, cost_model, num_replicas, router).run()
