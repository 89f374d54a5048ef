"""``AsyncEngine``: the engine loop on a background thread, for asyncio front ends.

A server (or the terminal chat) must never block its event loop on a model step, which takes
tens of milliseconds on a GPU and seconds for a long prompt on a CPU. So one thread owns the
``LLMEngine`` and steps it whenever there is work; event-loop code talks to that thread only
through a command queue (add, abort) and per-request ``asyncio.Queue``s of outputs, filled with
``loop.call_soon_threadsafe``. Nothing on the event loop waits for a step to end:

* ``generate()`` checks the request (``LLMEngine.validate``: pure, reads only configuration) and
  the waiting-queue bound on the caller's thread, so a bad or excess request fails at once with a
  ``ValueError`` / ``EngineOverloadedError``, then enqueues it and streams its outputs.
* Leaving ``generate()`` early (the client went away, the task was cancelled) enqueues an abort:
  the engine thread frees the request's blocks before its next step.
* A step that raises fails only the requests of that step (``LLMEngine.step``); anything else
  that escapes the loop fails every live request with an error output, so no caller hangs.

Reads for dashboards and metrics (``snapshot``, ``stats``) take the same lock the step holds, so
they see the engine between steps, never half-way through one; call them from a worker thread
(``asyncio.to_thread``) to keep the event loop free.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from yaie.core.engine import EngineOverloadedError, LLMEngine, RequestOutput
from yaie.core.request import FinishReason
from yaie.core.sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int


@dataclass(slots=True)
class _Stream:
    """Where one caller's outputs go: its event loop and queue, and how many choices are left."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    unfinished: int


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: deque[_Add | str] = deque()  # _Add, or a request id to abort
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self.loop_error: str | None = None  # the last unexpected loop failure, for /health

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._running = True
        self._thread = threading.Thread(target=self._run, name="yaie-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop after the current step; unfinished requests end with ABORT."""
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._step_lock:
            for rid in list(self._streams):
                self._deliver(self.engine.abort(rid))

    async def __aenter__(self) -> AsyncEngine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # ------------------------------------------------------------ requests

    def new_request_id(self, prefix: str = "req") -> str:
        return f"{prefix}-{next(self._ids)}"

    async def generate(
        self,
        prompt_token_ids: list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs (deltas of all ``params.n`` choices, each with
        ``parent_id``/``index``) until every choice has finished.

        Raises ``ValueError`` (a request that can never run) or ``EngineOverloadedError``
        (waiting queue full) before yielding anything. Closing the iterator early aborts the
        request in the engine and frees its blocks.
        """
        params = params or SamplingParams()
        rid = request_id or self.new_request_id()
        self._admit(rid, prompt_token_ids, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), params.n)
        self._streams[rid] = stream
        self._send(_Add(rid, list(prompt_token_ids), params, priority))
        try:
            while stream.unfinished:
                out = await stream.queue.get()
                if out.finished:
                    stream.unfinished -= 1
                yield out
        finally:
            if stream.unfinished:
                self.abort(rid)
            self._streams.pop(rid, None)

    def abort(self, request_id: str) -> None:
        """Ask the loop to stop a request before its next step (safe from any thread)."""
        self._send(request_id)

    def _admit(self, rid: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        self.engine.validate(rid, prompt_token_ids, params)
        bound = self.engine.config.max_waiting
        queued = self.engine.num_waiting + sum(
            c.params.n for c in list(self._commands) if isinstance(c, _Add)
        )
        if bound is not None and queued + params.n > bound:
            raise EngineOverloadedError(
                f"the engine is overloaded ({queued} requests waiting); retry later"
            )

    def _send(self, command: _Add | str) -> None:
        with self._wake:
            self._commands.append(command)
            self._wake.notify()

    # ------------------------------------------------------------ views

    def snapshot(self) -> dict:
        """``LLMEngine.snapshot()`` between steps (blocking: call it via ``asyncio.to_thread``)."""
        with self._step_lock:
            return self.engine.snapshot()

    def stats(self) -> dict:
        """Counters and gauges for ``/metrics``, read between steps."""
        with self._step_lock:
            eng = self.engine
            kv = eng.kv
            return {
                "num_steps": eng.num_steps,
                "prompt_tokens": eng.num_prompt_tokens,
                "generation_tokens": eng.num_generated_tokens,
                "running": eng.num_running,
                "waiting": eng.num_waiting,
                "blocks_total": kv.pool.num_blocks,
                "blocks_free": kv.pool.num_free,
                "blocks_cached": kv.radix.num_cached_blocks,
                "prefix_hit_rate": eng.prefix_hit_rate,
                "preemptions": eng.scheduler.num_preemptions,
            }

    @property
    def is_idle(self) -> bool:
        """No command queued and nothing unfinished in the engine."""
        return not self._commands and not self.engine.has_unfinished

    # ------------------------------------------------------------ the loop

    def _run(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._commands and not self.engine.has_unfinished:
                    self._wake.wait()
                if not self._running:
                    return
                commands = list(self._commands)
                self._commands.clear()
            with self._step_lock:
                try:
                    for command in commands:
                        self._apply(command)
                    self._deliver(self.engine.step())
                except Exception as exc:  # a bug outside the executor: fail all, keep serving
                    logger.exception("engine loop failed")
                    self.loop_error = f"{type(exc).__name__}: {exc}"
                    self._deliver(self.engine.fail_all(f"internal error in the engine loop: {exc}"))

    def _apply(self, command: _Add | str) -> None:
        if isinstance(command, str):
            self._deliver(self.engine.abort(command))
            return
        if command.request_id not in self._streams:  # the caller already left
            return
        try:
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, priority=command.priority
            )
        except (ValueError, EngineOverloadedError) as exc:  # lost a race with another caller
            self._deliver(
                [
                    RequestOutput(
                        command.request_id, [], finished=True, finish_reason=FinishReason.ERROR,
                        error=str(exc), parent_id=command.request_id, index=i,
                    )
                    for i in range(command.params.n)
                ]
            )

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.parent_id or out.request_id)
            if stream is not None and not stream.loop.is_closed():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
