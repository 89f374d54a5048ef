"""Helpers to drive an LLMEngine on the HashExecutor with a fake clock."""

from __future__ import annotations

from dataclasses import dataclass

from yaie.core.engine import EngineConfig, LLMEngine
from yaie.core.hash_executor import HashExecutor
from yaie.core.scheduler import SchedulerConfig


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


def make_engine(
    num_blocks: int = 256,
    block_size: int = 4,
    caching: bool = True,
    chunked: bool = True,
    max_num_batched_tokens: int = 64,
    max_num_seqs: int = 8,
    max_model_len: int = 1024,
    vocab_size: int = 100,
    eos: frozenset[int] = frozenset({7}),
    **config,
) -> LLMEngine:
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
        enable_chunked_prefill=chunked,
        policy=config.pop("policy", "fcfs"),
    )
    cfg = EngineConfig(num_blocks, block_size, caching, sched, eos_token_ids=eos, **config)
    return LLMEngine(cfg, HashExecutor(num_blocks, block_size, vocab_size), FakeClock())


def drain(engine: LLMEngine, check: bool = True, max_steps: int = 100_000) -> dict[str, list[int]]:
    """Step until idle; return every request's tokens. Checks block invariants after each step."""
    outputs: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished:
            break
        for out in engine.step():
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if check:
            engine.kv.check_invariants(engine.live_requests())
        engine.clock.now += 0.01
    assert not engine.has_unfinished, "engine did not drain"
    return outputs


def assert_idle_pool(engine: LLMEngine) -> None:
    """After every request ends, each block is free or held only by the radix cache."""
    refs = engine.kv.pool.ref_counts
    cached = engine.kv.radix.cached_block_ids()
    for b, r in enumerate(refs):
        assert (r == 0 and b not in cached) or (r == 1 and b in cached), f"block {b} refcount {r}"
    engine.kv.check_invariants([])
