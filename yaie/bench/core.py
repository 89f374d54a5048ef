"""``yaie bench core``: the scheduler + engine's own cost per step, with a near-free executor.

The simulator replays million-request traces through this very loop, and on a GPU a decode step
of a small model takes about a millisecond, so the engine's Python must stay well below that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from yaie.core.batch import ScheduledBatch, StepResult
from yaie.core.engine import EngineConfig, LLMEngine
from yaie.core.hash_executor import HashExecutor
from yaie.core.sampling import SamplingParams
from yaie.core.scheduler import SchedulerConfig


class _TimedExecutor:
    """Wraps an executor and adds up the time spent inside it, so it can be subtracted."""

    def __init__(self, inner: HashExecutor) -> None:
        self.inner = inner
        self.seconds = 0.0

    def execute(self, batch: ScheduledBatch) -> StepResult:
        t0 = time.perf_counter()
        result = self.inner.execute(batch)
        self.seconds += time.perf_counter() - t0
        return result


@dataclass(slots=True)
class CoreBenchRow:
    running: int
    steps: int
    step_ms: float
    executor_ms: float

    @property
    def engine_ms(self) -> float:
        return self.step_ms - self.executor_ms

    @property
    def engine_us_per_request(self) -> float:
        return 1000 * self.engine_ms / self.running


def measure(running: int, steps: int = 200, prompt_len: int = 64, block_size: int = 16) -> CoreBenchRow:
    """Time ``steps`` pure-decode steps with ``running`` requests in flight (prefill excluded)."""
    total = prompt_len + steps + 64
    num_blocks = running * -(-total // block_size) + 16
    sched = SchedulerConfig(
        max_num_seqs=running,
        max_num_batched_tokens=max(running, 2048),
        max_model_len=total + 1,
    )
    executor = _TimedExecutor(HashExecutor(num_blocks, block_size))
    engine = LLMEngine(EngineConfig(num_blocks, block_size, scheduler=sched), executor, time.perf_counter)
    params = SamplingParams(max_tokens=steps + 32, ignore_eos=True)
    for i in range(running):
        # distinct prompts with a shared head, as in a chat service with a system prompt
        engine.add_request(str(i), [1, 2, 3, 4] * (prompt_len // 8) + [i % 997 + 5] * (prompt_len // 2), params)
    while engine.num_waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    executor.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    elapsed = time.perf_counter() - t0
    return CoreBenchRow(running, steps, 1000 * elapsed / steps, 1000 * executor.seconds / steps)


def run(sizes: tuple[int, ...] = (32, 256, 1024), steps: int = 200) -> list[CoreBenchRow]:
    rows = [measure(n, steps) for n in sizes]
    print(f"{'running':>8} {'step ms':>9} {'executor ms':>12} {'engine ms':>10} {'engine us/req':>14}")
    for r in rows:
        print(
            f"{r.running:>8} {r.step_ms:>9.3f} {r.executor_ms:>12.3f} {r.engine_ms:>10.3f} "
            f"{r.engine_us_per_request:>14.2f}"
        )
    return rows
