"""The engine loop: add requests, step, stream outputs.

``LLMEngine`` owns the scheduler, the KV cache manager and an executor. It never sleeps and
never reads the wall clock: it is handed a clock, so the same loop runs in real time (a server's
background thread) and in simulated time (a SimPy process that advances ``env.now`` by the
executor's predicted step duration between ``schedule()`` and ``finish_step()``).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from yaie.core.batch import Executor, ScheduledBatch, StepResult
from yaie.core.kv_manager import KVCacheManager
from yaie.core.metrics import RequestMetrics, StepStats
from yaie.core.request import FinishReason, Request, RequestStatus
from yaie.core.sampling import SamplingParams
from yaie.core.scheduler import Scheduler, SchedulerConfig

logger = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""


class TextStream(Protocol):
    """Incremental detokenizer with stop strings (``yaie.detokenizer.IncrementalDetokenizer``)."""

    stopped: bool

    def step(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass(slots=True)
class EngineConfig:
    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    eos_token_ids: frozenset[int] = frozenset()
    max_waiting: int | None = None  # bound on queued requests; None = unbounded
    max_recorded_steps: int = 4096  # how many recent StepStats to keep


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (a streaming delta, not the whole text)."""

    request_id: str
    new_token_ids: list[int]
    text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    parent_id: str | None = None  # the id the caller used; differs from request_id when n > 1
    index: int = 0  # which of the n choices
    metrics: RequestMetrics | None = None  # set once finished


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        executor: Executor,
        clock: Callable[[], float],
        text_stream: Callable[[Request], TextStream] | None = None,
    ) -> None:
        self.config = config
        self.executor = executor
        self.clock = clock
        self.text_stream = text_stream
        self.kv = KVCacheManager(config.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self.requests: dict[str, Request] = {}
        self._streams: dict[str, TextStream] = {}
        self._parents: dict[str, list[str]] = {}  # caller's id → its n choices, when n > 1
        self._origin: dict[str, tuple[str, int]] = {}  # choice id → (caller's id, index)
        self._pending_outputs: list[RequestOutput] = []
        self.steps: deque[StepStats] = deque(maxlen=config.max_recorded_steps)
        self.finished_metrics: deque[RequestMetrics] = deque(maxlen=100_000)
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        # Over finished requests: prompt tokens, and how many of them came from the prefix cache.
        self.num_finished_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0

    # ------------------------------------------------------------ requests

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> list[str]:
        """Queue a request; ``params.n > 1`` queues n choices sharing the prompt's KV.

        Raises ``ValueError`` with a clear message for a request that could never run (empty,
        longer than the context, larger than the whole KV pool, duplicate id) and
        ``EngineOverloadedError`` when the waiting queue is full. Returns the queued ids.
        """
        params = params or SamplingParams()
        self.validate(request_id, prompt_token_ids, params)
        bound = self.config.max_waiting
        if bound is not None and len(self.scheduler.waiting) + params.n > bound:
            raise EngineOverloadedError(
                f"the engine is overloaded ({len(self.scheduler.waiting)} requests waiting); retry later"
            )
        now = self.clock() if arrival_time is None else arrival_time
        if params.n == 1:
            ids = [request_id]
            children = [params]
        else:
            ids = [f"{request_id}-{i}" for i in range(params.n)]
            seed = params.seed
            children = [replace(params, n=1, seed=None if seed is None else seed + i) for i in range(params.n)]
            self._parents[request_id] = ids
            self._origin.update((rid, (request_id, i)) for i, rid in enumerate(ids))
        for rid, p in zip(ids, children):
            req = Request(rid, list(prompt_token_ids), p, now, priority)
            self.requests[rid] = req
            if self.text_stream is not None:
                self._streams[rid] = self.text_stream(req)
            self.scheduler.add(req)
        self.num_prompt_tokens += len(prompt_token_ids)
        return ids

    def validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The checks of ``add_request`` without queueing: front ends call it to fail early."""
        n = len(prompt_token_ids)
        cfg, sched = self.config, self.config.scheduler
        if request_id in self.requests or request_id in self._parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= sched.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but the model's context is {sched.max_model_len} tokens; "
                "shorten it (at least one token must be left for the reply)"
            )
        if not sched.enable_chunked_prefill and n > sched.max_num_batched_tokens:
            raise ValueError(
                f"the prompt has {n} tokens, more than max_num_batched_tokens="
                f"{sched.max_num_batched_tokens}, and chunked prefill is off"
            )
        longest = min(n + (params.max_tokens or sched.max_model_len), sched.max_model_len)
        need = self.kv.blocks_for(longest - 1)
        if need > cfg.num_blocks:
            raise ValueError(
                f"the request needs up to {need} KV blocks ({longest} tokens) but the cache has "
                f"{cfg.num_blocks}; lower max_tokens or give the KV cache more memory"
            )

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request (or all n choices of it) now and free its blocks. Unknown or already
        finished ids are ignored, so a late abort after a normal finish is harmless."""
        outputs = []
        for rid in self._parents.pop(request_id, [request_id]):
            req = self.requests.get(rid)
            if req is not None and not req.is_finished:
                outputs.append(self._finish(req, FinishReason.ABORT))
        return outputs

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        """Schedule, execute and process one iteration. Returns the outputs it produced."""
        batch = self.schedule()
        if batch is None:
            return []
        try:
            result = self.executor.execute(batch)
        except Exception as exc:  # one bad step must not take the engine down
            logger.exception("step %d failed", batch.step_id)
            return self.fail_step(batch, f"internal error while running the model: {exc}")
        return self.finish_step(batch, result)

    def schedule(self) -> ScheduledBatch | None:
        """First half of a step: decide the batch (None when there is nothing to run)."""
        self._step_start = self.clock()
        self._preemptions_before = self.scheduler.num_preemptions
        batch, reqs = self.scheduler.schedule(self._step_start)
        if batch.is_empty:
            return None
        self._inflight = reqs
        return batch

    def finish_step(self, batch: ScheduledBatch, result: StepResult) -> list[RequestOutput]:
        """Second half of a step: advance requests by what the executor computed."""
        now = self.clock()
        outputs, self._pending_outputs = self._pending_outputs, []
        sampled = iter(result.sampled_token_ids)
        logprobs = iter(result.logprobs) if result.logprobs is not None else None
        streams, origin = self._streams, self._origin
        kv, scheduler = self.kv, self.scheduler
        bs = kv.block_size
        eos, max_len = self.config.eos_token_ids, self.config.scheduler.max_model_len
        finished = RequestStatus.FINISHED
        generated = 0
        # The simulator runs this loop once per request per step, millions of times: it calls
        # out only when there is work — the radix tree only when a step completed a block
        # (cache_computed is a no-op otherwise), the in-flight prefix table only for steps that
        # computed prompt tokens (only those can finish advertising one) — and the stop checks
        # are written out here rather than in a method of their own.
        for req, sreq in zip(self._inflight, batch.requests):
            token = next(sampled) if sreq.samples else None
            lp = next(logprobs) if (logprobs is not None and token is not None) else None
            if req.status is finished:  # aborted while the step ran
                continue
            done = req.num_computed_tokens
            req.num_computed_tokens = computed = done + sreq.num_new_tokens
            if computed // bs != done // bs:
                kv.cache_computed(req, now)
            prompt = req.prompt_token_ids
            if done < len(prompt):
                scheduler.on_step_done(req)
            if token is None:
                continue
            output_ids = req.output_token_ids
            output_ids.append(token)
            times = req.times
            times.token_times.append(now)
            if times.first_token is None:
                times.first_token = now
            generated += 1
            rid = req.request_id
            stream = streams.get(rid) if streams else None
            text = stream.step(token) if stream is not None else ""
            # Stop: an EOS id (unless ignored), a stop token, a stop string the text stream
            # saw; length: max_tokens, or the context is full.
            p = req.sampling_params
            num_output = len(output_ids)
            if (
                token in p.stop_token_ids
                or (not p.ignore_eos and token in eos)
                or (stream is not None and stream.stopped)
            ):
                reason = FinishReason.STOP
            elif (p.max_tokens is not None and num_output >= p.max_tokens) or (
                len(prompt) + num_output >= max_len
            ):
                reason = FinishReason.LENGTH
            else:
                reason = None
            parent, index = origin[rid] if origin and rid in origin else (rid, 0)
            # positional: keyword arguments cost a third more, once per generated token
            out = RequestOutput(
                rid, [token], text, False, None, None, None if lp is None else [lp], parent, index
            )
            if reason is not None:
                final = self._finish(req, reason, now)
                out.text += final.text
                out.finished, out.finish_reason, out.metrics = True, reason, final.metrics
            outputs.append(out)
        self.num_generated_tokens += generated
        self._record_step(batch, now, result)
        self._inflight = []
        return outputs

    def fail_step(self, batch: ScheduledBatch, message: str) -> list[RequestOutput]:
        """End every request of a failed step with an error; the others keep going."""
        outputs = [
            self._finish(req, FinishReason.ERROR, error=message)
            for req in self._inflight
            if not req.is_finished
        ]
        self._inflight = []
        return outputs

    # ------------------------------------------------------------ internals

    def _finish(
        self,
        req: Request,
        reason: FinishReason,
        now: float | None = None,
        error: str | None = None,
    ) -> RequestOutput:
        """Finish ``req``: release its blocks, drop its bookkeeping, return its last output."""
        now = self.clock() if now is None else now
        self.scheduler.remove(req)
        req.finish(reason, now, error)
        stream = self._streams.pop(req.request_id, None)
        # Text held back as a possible stop-string prefix is real output unless a stop matched.
        text = stream.flush() if stream is not None and not stream.stopped else ""
        del self.requests[req.request_id]
        parent, index = self._origin.pop(req.request_id, (req.request_id, 0))
        if parent in self._parents and all(c not in self.requests for c in self._parents[parent]):
            del self._parents[parent]
        metrics = RequestMetrics.from_request(req)
        self.finished_metrics.append(metrics)
        self.num_finished_prompt_tokens += metrics.num_prompt_tokens
        self.num_cached_prompt_tokens += metrics.num_cached_tokens
        return RequestOutput(
            req.request_id,
            [],
            text,
            finished=True,
            finish_reason=reason,
            error=error,
            parent_id=parent,
            index=index,
            metrics=metrics,
        )

    def _record_step(self, batch: ScheduledBatch, now: float, result: StepResult) -> None:
        self.num_steps += 1
        start = self._step_start
        end = start + result.duration if result.duration is not None else now
        sched, kv = self.scheduler, self.kv
        self.steps.append(
            StepStats(  # in field order: positional is cheaper, and this runs every step
                batch.step_id,
                start,
                end,
                len(batch.requests),
                batch.num_prefill_tokens,
                batch.num_decode_tokens,
                len(sched.running),
                len(sched.waiting),
                kv.pool.num_free,
                kv.radix.num_cached_blocks,
                sched.num_preemptions - self._preemptions_before,
            )
        )

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every live request with an error (the loop around the engine broke)."""
        return [self._finish(req, FinishReason.ERROR, error=message) for req in list(self.requests.values())]

    @property
    def prefix_hit_rate(self) -> float:
        """Share of finished requests' prompt tokens served from the prefix cache."""
        total = self.num_finished_prompt_tokens
        return self.num_cached_prompt_tokens / total if total else 0.0

    # ------------------------------------------------------------ views

    def live_requests(self) -> list[Request]:
        return list(self.requests.values())

    def snapshot(self) -> dict:
        """Engine state for dashboards: KV block map, radix summary, queues, recent steps."""
        sched = self.scheduler
        return {
            "time": self.clock(),
            "kv": self.kv.snapshot(self.live_requests()),
            "running": [_request_view(r) for r in sched.running],
            "waiting": [_request_view(r) for r in sched.waiting],
            "steps": [_step_view(s) for s in list(self.steps)[-200:]],
            "finished": [_metrics_view(m) for m in list(self.finished_metrics)[-1000:]],
            "num_preemptions": sched.num_preemptions,
        }


def _request_view(req: Request) -> dict:
    return {
        "id": req.request_id,
        "status": req.status.value,
        "prompt_tokens": req.num_prompt_tokens,
        "output_tokens": len(req.output_token_ids),
        "computed_tokens": req.num_computed_tokens,
        "cached_tokens": req.num_cached_tokens,
        "blocks": len(req.block_ids),
        "arrival": req.arrival_time,
    }


def _metrics_view(m: RequestMetrics) -> dict:
    return {"id": m.request_id, "ttft": m.ttft, "tpot": m.tpot, "e2e": m.e2e}


def _step_view(s: StepStats) -> dict:
    return {
        "step": s.step_id,
        "start": s.start,
        "end": s.end,
        "requests": s.num_requests,
        "prefill_tokens": s.num_prefill_tokens,
        "decode_tokens": s.num_decode_tokens,
        "running": s.num_running,
        "waiting": s.num_waiting,
        "blocks_free": s.blocks_free,
        "blocks_cached": s.blocks_cached,
        "preemptions": s.num_preemptions,
    }
