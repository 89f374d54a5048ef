"""The SimPy driver running the real engine: completion, idle pool, determinism, timing against
the cost model, prefix sharing from trace structure, refused requests (the KV recording:
test_kv_recording.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from yaie.core.batch import ScheduledBatch, ScheduledRequest
from yaie.core.sampling import SamplingParams
from yaie.simulator.cost import MODELS, RooflineCostModel
from yaie.simulator.driver import Replica, Sample, SimConfig, Simulation, simulate
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.traces import LoadOptions, Trace, TraceRequest, load_trace

SAMPLES = Path(__file__).parents[2] / "traces"
COST = RooflineCostModel(MODELS["smollm2-135m"], HARDWARE["h100"])


def config(num_blocks: int = 4096, **kw) -> SimConfig:
    return SimConfig(num_blocks=num_blocks, block_size=16, max_model_len=8192, **kw)


def assert_pool_idle(sim: Simulation) -> None:
    for replica in sim.replicas:
        engine = replica.engine
        assert not engine.has_unfinished and not engine.requests
        kv = engine.kv
        cached = kv.radix.cached_block_ids()
        for b, refs in enumerate(kv.pool.ref_counts):
            assert (refs == 0 and b not in cached) or (refs == 1 and b in cached), (
                f"block {b}: {refs} refs"
            )
        kv.check_invariants([])


def test_every_request_finishes_and_the_pool_ends_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    sample = Replica.sample

    def checked(replica: Replica, now: float) -> Sample:
        s = sample(replica, now)  # the KV counts, against the core's own (tree-walking) count
        usage = replica.engine.kv.usage()
        assert (s.blocks_used, s.blocks_cached_only, s.blocks_free) == (
            usage.used,
            usage.evictable,
            usage.free,
        )
        return s

    monkeypatch.setattr(Replica, "sample", checked)
    trace = load_trace(SAMPLES / "shared_prefix.jsonl", options=LoadOptions(rate_scale=5))
    sim = Simulation(trace, config(num_blocks=600), COST)
    result = sim.run()
    assert len(result.metrics) == len(trace) == 200 and not result.rejected
    by_id = {int(m.request_id): m for m in result.metrics}
    for i, req in enumerate(trace.requests):
        m = by_id[i]
        assert m.finish_reason == "length"
        assert (m.num_prompt_tokens, m.num_output_tokens) == (req.input_len, req.output_len)
        assert m.ttft > 0 and m.e2e >= m.ttft
    assert result.sim_time >= trace.requests[-1].arrival
    assert_pool_idle(sim)
    assert len(result.samples) > 400 and any(
        s.blocks_used and s.blocks_cached_only for s in result.samples
    )


def test_simulation_is_deterministic() -> None:
    trace = load_trace(SAMPLES / "bursty.jsonl")
    runs = [
        simulate(load_trace(SAMPLES / "bursty.jsonl"), config(num_blocks=300), COST)
        for _ in range(2)
    ]
    a, b = (
        [
            (m.request_id, m.ttft, m.e2e, m.itls, m.num_cached_tokens, m.num_preemptions)
            for m in r.metrics
        ]
        for r in runs
    )
    assert a == b and len(a) == len(trace)
    assert runs[0].samples == runs[1].samples
    assert runs[0].steps == runs[1].steps and runs[0].preemptions == runs[1].preemptions


def _batch(start: int, n: int, samples: bool = True) -> ScheduledBatch:
    batch = ScheduledBatch(step_id=0, block_size=16)
    batch.requests.append(ScheduledRequest("r", start, n, samples, SamplingParams(), [], []))
    batch.token_ids.extend([0] * n)
    batch.seq_lens.append(start + n)
    if samples:
        batch.sample_indices.append(n - 1)
    batch.num_prefill_tokens = n if n > 1 else 0
    batch.num_decode_tokens = 1 if n == 1 else 0
    return batch


def test_a_lone_request_takes_exactly_the_cost_models_step_times() -> None:
    trace = Trace([TraceRequest(2.0, 3000, 4)], "one")
    result = simulate(trace, config(max_num_batched_tokens=2048), COST)
    (m,) = result.metrics
    # chunked prefill: 2048 tokens, then the last 952 (which samples the first token)
    first = COST.step_time(_batch(0, 2048, samples=False)) + COST.step_time(_batch(2048, 952))
    assert m.ttft == pytest.approx(first, rel=1e-9)
    assert m.itls == pytest.approx(
        [COST.step_time(_batch(3000 + k, 1)) for k in range(3)], rel=1e-9
    )
    assert result.sim_time == pytest.approx(2.0 + m.e2e)


def test_shared_hash_ids_hit_the_radix_cache() -> None:
    # Mooncake style: 50 requests share their first 10 blocks of 512 tokens, then differ.
    reqs = [
        TraceRequest(float(i), 5800, 8, hash_ids=list(range(10)) + [100 + 2 * i, 101 + 2 * i])
        for i in range(50)
    ]
    result = simulate(Trace(reqs, "shared"), config(num_blocks=8192), COST)
    hits = sorted((int(m.request_id), m.num_cached_tokens) for m in result.metrics)
    assert hits[0] == (0, 0)
    assert all(n == 5120 for _, n in hits[1:])  # exactly the 10 shared hash blocks
    assert sum(r.prefix_hit_tokens for r in result.replicas) == 49 * 5120


def test_mooncake_prefix_reuse_is_found_by_the_radix_cache(shared_traces: Path) -> None:
    path = shared_traces / "mooncake" / "conversation_trace_head6000.jsonl"
    trace = load_trace(path, options=LoadOptions(limit=400, input_scale=0.125, max_input_len=8000))
    # The trace's own reuse: each prompt's longest run of leading hash ids seen in an earlier one.
    seen: set[tuple[int, ...]] = set()
    reusable = 0
    for r in trace.requests:
        k = 0
        while k < len(r.hash_ids) and tuple(r.hash_ids[: k + 1]) in seen:
            k += 1
        reusable += min(k * trace.hash_block, r.input_len - 1)
        seen.update(tuple(r.hash_ids[: j + 1]) for j in range(len(r.hash_ids)))
    result = simulate(trace, config(num_blocks=60_000), COST)  # room for everything: no eviction
    hit = sum(m.num_cached_tokens for m in result.metrics)
    assert reusable > 50_000
    assert hit == pytest.approx(reusable, rel=0.02)


def test_conversation_replies_are_found_in_the_cache() -> None:
    trace = load_trace(SAMPLES / "conversations.jsonl")
    with_replies = simulate(trace, config(), COST)
    unnamed = Trace(
        [
            replace(r, reply_group=None)
            for r in load_trace(SAMPLES / "conversations.jsonl").requests
        ],
        "no replies",
    )
    without = simulate(unnamed, config(), COST)

    def hit_rate(result) -> float:
        return sum(m.num_cached_tokens for m in result.metrics) / sum(
            m.num_prompt_tokens for m in result.metrics
        )

    assert hit_rate(with_replies) > 0.6
    assert hit_rate(with_replies) > hit_rate(without) + 0.05


def test_requests_the_engine_refuses_are_counted_not_fatal() -> None:
    reqs = [
        TraceRequest(0.0, 100, 10),
        TraceRequest(0.1, 9000, 10),  # longer than max_model_len = 8192
        TraceRequest(0.2, 4000, 4000),  # 8000 tokens = 500 blocks, more than the pool of 256
        TraceRequest(0.3, 50, 5),
    ]
    sim = Simulation(Trace(reqs, "mixed"), config(num_blocks=256), COST)
    result = sim.run()
    assert sorted(int(m.request_id) for m in result.metrics) == [0, 3]
    assert [(r.index, r.reason) for r in result.rejected] == [
        (1, "prompt not shorter than max_model_len"),
        (2, "needs more KV blocks than the pool"),
    ]
    assert_pool_idle(sim)


def test_a_small_pool_preempts_and_still_finishes_everything() -> None:
    trace = load_trace(SAMPLES / "poisson.jsonl", options=LoadOptions(rate_scale=20))
    sim = Simulation(trace, config(num_blocks=200, max_num_seqs=64), COST)
    result = sim.run()
    assert len(result.metrics) == 200 and result.preemptions > 0
    assert sum(m.num_preemptions for m in result.metrics) == result.preemptions
    assert_pool_idle(sim)
