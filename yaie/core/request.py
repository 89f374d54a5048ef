"""A request's life: WAITING → RUNNING ⇄ PREEMPTED → FINISHED(reason).

The request owns everything the scheduler needs to know about it in token units: the prompt,
the tokens generated so far, how many of those tokens already have K/V in the cache, and the
blocks holding that K/V. All times come from the engine's injected clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from yaie.core.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    STOP = "stop"  # EOS, a stop token or a stop string
    LENGTH = "length"  # max_tokens or the model's context
    ABORT = "abort"  # the caller gave up (disconnect, Ctrl+C)
    ERROR = "error"  # the request can never run (too long) or its step failed


_ALLOWED = {
    RequestStatus.WAITING: {RequestStatus.RUNNING, RequestStatus.FINISHED},
    RequestStatus.RUNNING: {RequestStatus.PREEMPTED, RequestStatus.FINISHED},
    RequestStatus.PREEMPTED: {RequestStatus.RUNNING, RequestStatus.FINISHED},
    RequestStatus.FINISHED: set(),
}


@dataclass(slots=True)
class RequestTimes:
    """Timestamps (engine clock, seconds) from which every latency metric is derived."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)
    finished: float | None = None


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float
    priority: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens (prompt + output) whose K/V is in the cache. The next step computes from here.
    num_computed_tokens: int = 0
    # Tokens of the prompt found in the radix cache on the latest admission.
    num_cached_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    times: RequestTimes = field(init=False)

    def __post_init__(self) -> None:
        self.times = RequestTimes(arrival=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus generated tokens: the sequence whose K/V the cache must hold."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """``all_token_ids[start:end]`` without copying the whole sequence first."""
        prompt = self.prompt_token_ids
        n = len(prompt)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def set_status(self, status: RequestStatus) -> None:
        if status not in _ALLOWED[self.status]:
            raise RuntimeError(f"request {self.request_id}: illegal {self.status} → {status}")
        self.status = status

    def finish(self, reason: FinishReason, now: float, error: str | None = None) -> None:
        self.set_status(RequestStatus.FINISHED)
        self.finish_reason = reason
        self.error = error
        self.times.finished = now
