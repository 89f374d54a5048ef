"""The contract between the scheduler and an executor.

The scheduler speaks in tokens and blocks, never tensors: a ``ScheduledBatch`` is plain Python
lists, so the same batch can drive a torch model, a cost model in a simulator, or a test double.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from yaie.core.sampling import SamplingParams


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: ``num_new_tokens`` tokens from position ``start_pos``.

    A decode has ``num_new_tokens == 1``; a prefill chunk has more and starts after the prefix
    that is already in the KV cache (matched in the radix tree or computed in earlier chunks).
    ``samples`` is true when this step computes the request's last known token, so the logits
    of that token are sampled. ``prompt_token_ids`` and ``output_token_ids`` are the request's
    own lists (shared, not copied): read them, never mutate them.
    """

    request_id: str
    start_pos: int
    num_new_tokens: int
    samples: bool
    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]

    @property
    def seq_len(self) -> int:
        """Context length once this step's tokens are in the cache."""
        return self.start_pos + self.num_new_tokens


@dataclass(slots=True)
class ScheduledBatch:
    """A ragged batch: prefill chunks and decode tokens flattened into one token stream.

    Request ``i`` owns the flat token range ``query_start_loc[i]:query_start_loc[i + 1]``;
    ``slot_mapping[t] = block_id * block_size + offset`` says where token ``t``'s K/V is written;
    ``block_tables[i]`` lists the blocks holding request ``i``'s context in order (the request's
    own list, not a copy). ``sample_indices`` are the flat indices whose logits are sampled, in
    the order of the requests that sample.
    """

    step_id: int
    block_size: int
    requests: list[ScheduledRequest] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slot_mapping: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    sample_indices: list[int] = field(default_factory=list)
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    @property
    def sampling_requests(self) -> list[ScheduledRequest]:
        return [r for r in self.requests if r.samples]


@dataclass(slots=True)
class StepResult:
    """What an executor returns: one token per sampling request, in ``sample_indices`` order.

    ``logprobs[i]``, when asked for, is ``(logprob of the sampled token, {token: logprob} of the
    top-n)``. ``duration`` is the predicted step time a simulated executor reports (seconds);
    a real executor leaves it ``None``: its time is whatever the clock says.
    """

    sampled_token_ids: list[int]
    logprobs: list[tuple[float, dict[int, float]] | None] | None = None
    duration: float | None = None


class Executor(Protocol):
    """Runs one ``ScheduledBatch``. Implemented by ``ModelExecutor`` and ``SimExecutor``."""

    def execute(self, batch: ScheduledBatch) -> StepResult: ...
