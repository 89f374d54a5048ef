"""An executor that runs no model: it predicts each step's time and hands back placeholder tokens.

The engine only needs *a* token per sampling request: with ``max_tokens`` set to the trace's
output length and ``ignore_eos``, the trace alone decides when a request stops. A request whose
reply is a named trace segment gets that segment's tokens instead, so a later conversation turn
that re-sends the reply as history matches the reply's blocks in the radix cache, as it would on
a real engine.
"""

from __future__ import annotations

from yaie.core.batch import ScheduledBatch, StepResult
from yaie.simulator.cost import CostModel

PLACEHOLDER_TOKEN = 0


class SimExecutor:
    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        self._replies: dict[str, list[int]] = {}
        self.busy_time = 0.0  # simulated seconds spent in steps

    def set_reply(self, request_id: str, tokens: list[int]) -> None:
        """Make ``request_id`` generate ``tokens``; past their end it gets placeholders."""
        self._replies[request_id] = tokens

    def forget(self, request_id: str) -> None:
        """The request has finished: drop its reply."""
        self._replies.pop(request_id, None)

    def execute(self, batch: ScheduledBatch) -> StepResult:
        duration = self.cost_model.step_time(batch)
        self.busy_time += duration
        replies = self._replies
        if not replies:
            return StepResult([PLACEHOLDER_TOKEN] * len(batch.sample_indices), duration=duration)
        sampled = []
        for r in batch.requests:
            if not r.samples:
                continue
            reply = replies.get(r.request_id)
            if reply is None:
                sampled.append(PLACEHOLDER_TOKEN)
                continue
            k = len(r.output_token_ids)
            sampled.append(reply[k] if k < len(reply) else PLACEHOLDER_TOKEN)
        return StepResult(sampled, duration=duration)
