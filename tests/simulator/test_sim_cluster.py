"""Replicas behind routers: everything finishes, round-robin spreads evenly, least-load balances
tokens, and routing by cached prefix keeps conversations where their history is cached."""

from __future__ import annotations

from pathlib import Path

import pytest

from yaie.simulator.cluster import (
    LeastLoadRouter,
    PrefixAwareRouter,
    RoundRobinRouter,
    cached_prefix_len,
    make_router,
)
from yaie.core.metrics import summarize
from yaie.simulator.cost import MODELS, RooflineCostModel, with_dtype
from yaie.simulator.driver import SimConfig, Simulation
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.traces import LoadOptions, PromptSynth, TraceRequest, load_trace

SAMPLES = Path(__file__).parents[2] / "traces"
L4 = RooflineCostModel(MODELS["smollm2-135m"], HARDWARE["l4"])  # the sample traces barely load it
CPU = RooflineCostModel(with_dtype(MODELS["smollm2-135m"], 4), HARDWARE["cpu"])  # they load this


def run(trace_file: str, router, replicas: int = 4, cost=L4, rate_scale: float = 1.0) -> Simulation:
    trace = load_trace(SAMPLES / trace_file, options=LoadOptions(rate_scale=rate_scale))
    sim = Simulation(trace, SimConfig(num_blocks=1456), cost, replicas, router)
    sim.result = sim.run()
    return sim


def hit_rate(sim: Simulation) -> float:
    return sum(r.prefix_hit_tokens for r in sim.result.replicas) / sum(
        r.prefix_queried_tokens for r in sim.result.replicas
    )


def test_prefix_aware_routing_beats_round_robin_on_conversations() -> None:
    rr = run("conversations.jsonl", RoundRobinRouter())
    prefix = run("conversations.jsonl", PrefixAwareRouter())
    for sim in (rr, prefix):
        assert len(sim.result.metrics) == 196 and not sim.result.rejected
        for replica in sim.replicas:
            replica.engine.kv.check_invariants([])
            assert replica.load == 0  # every owed token was delivered
    # Round-robin sends a conversation's next turn to a replica that mostly lacks its history;
    # the shared system prompts are cached everywhere, so it still hits those.
    assert hit_rate(prefix) > hit_rate(rr) + 0.2
    assert hit_rate(prefix) > 0.8


def test_prefix_aware_routing_cuts_latency_under_load() -> None:
    rr = run("conversations.jsonl", RoundRobinRouter(), cost=CPU, rate_scale=4)
    prefix = run("conversations.jsonl", PrefixAwareRouter(), cost=CPU, rate_scale=4)
    assert hit_rate(prefix) > hit_rate(rr) + 0.1
    ttft = [summarize(sim.result.metrics, sim.result.sim_time)["ttft_p90"] for sim in (rr, prefix)]
    assert ttft[1] < 0.5 * ttft[0]
    # under load the balance bound spreads the conversations over every replica
    assert min(r.requests for r in prefix.result.replicas) > 20


def test_round_robin_spreads_requests_evenly() -> None:
    sim = run("poisson.jsonl", RoundRobinRouter())
    assert [r.requests for r in sim.result.replicas] == [50, 50, 50, 50]


def test_least_load_cuts_tail_latency_on_bursty_traffic() -> None:
    least = run("bursty.jsonl", LeastLoadRouter(), cost=CPU, rate_scale=2)
    rr = run("bursty.jsonl", RoundRobinRouter(), cost=CPU, rate_scale=2)
    assert len(least.result.metrics) == 200
    p90 = [summarize(sim.result.metrics, sim.result.sim_time)["ttft_p90"] for sim in (least, rr)]
    assert p90[0] < 0.8 * p90[1]


def test_idle_ties_do_not_all_go_to_the_first_replica() -> None:
    sim = run("poisson.jsonl", LeastLoadRouter())  # the L4 replicas are idle most of the time
    assert min(r.requests for r in sim.result.replicas) > 30


def test_cached_prefix_len_reads_without_touching_the_tree() -> None:
    trace = load_trace(SAMPLES / "shared_prefix.jsonl")
    sim = Simulation(trace, SimConfig(num_blocks=4096), L4)
    sim.run()
    radix = sim.replicas[0].engine.kv.radix
    synth = PromptSynth()
    probe = synth.prompt(TraceRequest(0, 900, 1, prefix_groups=[("sys2", 512)]), index=10_000)
    before = radix.summary(max_nodes=10_000)
    n = cached_prefix_len(radix, probe)
    assert n == 512  # the system prompt, in whole blocks of 16
    assert radix.summary(max_nodes=10_000) == before
    blocks, _ = radix.match_prefix(probe, now=1e9)
    assert len(blocks) * 16 == n


def test_unknown_router_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="unknown router 'random'"):
        make_router("random")
