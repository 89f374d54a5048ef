"""Build engines over the session's loaded model (shared weights, fresh scheduler and cache)."""

from __future__ import annotations

import time

from yaie.core.engine import EngineConfig, LLMEngine
from yaie.core.scheduler import SchedulerConfig
from yaie.llm import LLM


def engine_on(llm: LLM, num_blocks: int | None = None, caching: bool = True, chunked: bool = True,
              max_num_batched_tokens: int = 2048, max_num_seqs: int = 64) -> LLMEngine:
    """A fresh engine (own scheduler and radix tree) over the session's loaded model."""
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=llm.max_model_len,
        enable_chunked_prefill=chunked,
    )
    config = EngineConfig(
        num_blocks=num_blocks or llm.executor.plan.num_blocks,
        block_size=llm.args.block_size,
        enable_prefix_caching=caching,
        scheduler=sched,
        eos_token_ids=llm.engine.config.eos_token_ids,
    )
    return LLMEngine(config, llm.executor, time.monotonic, llm._text_stream)
