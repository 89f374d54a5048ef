"""Trace readers on the real public files, reshaping options, generators' statistics and the
deterministic prompt tokens behind prefix sharing."""

from __future__ import annotations

import json
import math
import random
import statistics
from pathlib import Path

import pytest

from yaie.simulator.traces import (
    Arrivals,
    LengthDist,
    LoadOptions,
    PromptSynth,
    TraceRequest,
    detect_format,
    generate,
    generate_conversations,
    load_trace,
    write_jsonl,
)

SAMPLES = Path(__file__).parents[2] / "traces"


# ---------------------------------------------------------------------------- public traces


def test_azure_reader_whole_conversation_trace(shared_traces: Path) -> None:
    path = shared_traces / "azure2023" / "AzureLLMInferenceTrace_conv.csv"
    assert detect_format(path) == "azure"
    trace = load_trace(path)
    assert len(trace) == 19_366
    first, last = trace.requests[0], trace.requests[-1]
    assert first.arrival == 0.0
    # 2023-11-16 18:15:46.6805900 (first row) to 19:14:08.4025270 (last row)
    assert trace.span == pytest.approx(3501.7219370, abs=1e-3)
    assert (first.input_len, first.output_len) == (374, 44)
    assert (last.input_len, last.output_len) == (197, 183)
    assert all(a.arrival <= b.arrival for a, b in zip(trace.requests, trace.requests[1:]))
    assert statistics.mean(r.input_len for r in trace.requests) == pytest.approx(1154.7, abs=0.1)
    assert all(r.hash_ids is None for r in trace.requests)


def test_mooncake_reader(shared_traces: Path) -> None:
    path = shared_traces / "mooncake" / "conversation_trace_head6000.jsonl"
    assert detect_format(path) == "mooncake"
    trace = load_trace(path)
    assert len(trace) == 6000
    assert trace.hash_block == 512
    assert trace.span == pytest.approx(1872.0)  # milliseconds became seconds
    r0 = trace.requests[0]
    assert (r0.arrival, r0.input_len, r0.output_len) == (0.0, 6758, 500)
    assert r0.hash_ids == list(range(14))
    # one hash id per 512-token block, the last one partial
    assert all(len(r.hash_ids) == math.ceil(r.input_len / 512) for r in trace.requests)


def test_mooncake_clipping_and_scaling_are_reported(shared_traces: Path) -> None:
    path = shared_traces / "mooncake" / "synthetic_trace.jsonl"
    full = load_trace(path)
    opts = LoadOptions(window=(100.0, 400.0), rate_scale=2.0, input_scale=0.25, max_input_len=4000)
    trace = load_trace(path, options=opts)
    kept = [r for r in full.requests if 100.0 <= r.arrival < 400.0]
    assert len(trace) == len(kept)
    assert trace.requests[0].arrival == pytest.approx((kept[0].arrival - 100.0) / 2)
    assert trace.requests[-1].arrival < 150.0  # 300 s window, twice the rate
    assert trace.hash_block == 128
    assert max(r.input_len for r in trace.requests) == 4000
    for r, orig in zip(trace.requests, kept):
        assert r.input_len == min(4000, round(orig.input_len * 0.25))
        assert len(r.hash_ids) == math.ceil(r.input_len / 128)
        assert r.hash_ids == orig.hash_ids[: len(r.hash_ids)]
    notes = " | ".join(trace.notes)
    assert (
        "time window [100, 400)" in notes
        and "rate x2" in notes
        and "hash block 512 -> 128" in notes
    )
    assert "clipped to 4000 tokens" in notes


# ---------------------------------------------------------------------------- our JSONL


def test_jsonl_round_trip_keeps_prefix_structure(tmp_path: Path) -> None:
    reqs = [
        TraceRequest(0.5, 300, 20, hash_ids=[1, 2, 3]),
        TraceRequest(0.1, 700, 9, prefix_groups=[("sys", 512), ("c1u0", 100)], reply_group="c1a0"),
        TraceRequest(0.3, 5, 1, prompt="hello", request_id="x"),
    ]
    path = tmp_path / "t.jsonl"
    write_jsonl(reqs, path, hash_block=128)
    assert json.loads(path.read_text().splitlines()[0]) == {"hash_block": 128}
    trace = load_trace(path)
    assert trace.hash_block == 128
    assert [r.arrival for r in trace.requests] == [0.1, 0.3, 0.5]  # sorted on read
    assert trace.requests[0].prefix_groups == [("sys", 512), ("c1u0", 100)]
    assert trace.requests[0].reply_group == "c1a0"
    assert trace.requests[1].prompt == "hello" and trace.requests[1].request_id == "x"
    assert trace.requests[2].hash_ids == [1, 2, 3]


def test_bad_trace_files_give_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_trace(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"arrival": 0, "input_len": 5, "output_len": 1}\n{"arrival": 1, "input_len": 5}\n'
    )
    with pytest.raises(ValueError, match=r"bad.jsonl:2: missing field 'output_len'"):
        load_trace(bad)
    bad.write_text('{"arrival": 0, "input_len": 0, "output_len": 1}\n')
    with pytest.raises(ValueError, match="input_len must be >= 1"):
        load_trace(bad)
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an Azure trace CSV"):
        load_trace(csv)


def test_samples_in_repo_are_small_and_readable() -> None:
    files = sorted(SAMPLES.glob("*.jsonl"))
    assert len(files) >= 3
    assert sum(f.stat().st_size for f in files) < 200_000
    for f in files:
        assert len(load_trace(f)) >= 100


# ---------------------------------------------------------------------------- generators


def _gaps(trace) -> list[float]:
    times = [0.0] + [r.arrival for r in trace.requests]
    return [b - a for a, b in zip(times, times[1:])]


def test_poisson_and_bursty_arrivals_have_the_asked_rate_and_variability() -> None:
    lengths = LengthDist(100, 0.0)
    poisson = generate(20_000, Arrivals(rate=50.0), lengths, lengths, seed=1)
    gaps = _gaps(poisson)
    assert len(poisson) / poisson.requests[-1].arrival == pytest.approx(50.0, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.03)
    bursty = generate(20_000, Arrivals(rate=50.0, cv=3.0), lengths, lengths, seed=1)
    gaps = _gaps(bursty)
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.08)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(3.0, rel=0.1)


def test_lognormal_lengths_have_the_asked_mean_and_bounds() -> None:
    rng = random.Random(0)
    dist = LengthDist(mean=300, sigma=0.7, low=1, high=100_000)
    xs = [dist.sample(rng) for _ in range(40_000)]
    assert statistics.mean(xs) == pytest.approx(300, rel=0.03)
    assert statistics.median(xs) == pytest.approx(300 * math.exp(-(0.7**2) / 2), rel=0.05)
    clipped = LengthDist(mean=300, sigma=1.5, low=10, high=500)
    ys = [clipped.sample(rng) for _ in range(5000)]
    assert min(ys) >= 10 and max(ys) == 500
    empirical = LengthDist(empirical=[3, 7])
    assert {empirical.sample(rng) for _ in range(100)} == {3, 7}


def test_shared_system_prompts() -> None:
    trace = generate(
        4000,
        Arrivals(10),
        LengthDist(50, 0.5),
        LengthDist(20, 0.5),
        seed=3,
        num_prefix_groups=4,
        prefix_len=256,
    )
    groups = [r.prefix_groups for r in trace.requests]
    assert all(g is not None and len(g) == 1 and g[0][1] == 256 for g in groups)
    counts = {
        name: sum(1 for g in groups if g[0][0] == name) for name in ("sys0", "sys1", "sys2", "sys3")
    }
    assert all(c == pytest.approx(1000, rel=0.1) for c in counts.values())
    assert all(r.input_len > 256 for r in trace.requests)


def test_conversations_resend_their_history() -> None:
    trace = generate_conversations(
        300,
        Arrivals(1.0),
        turns=4,
        user_len=LengthDist(60, 0.5),
        reply_len=LengthDist(80, 0.5),
        think_time=5.0,
        system_len=100,
        max_context=4096,
        seed=5,
    )
    by_conv: dict[str, list[TraceRequest]] = {}
    for r in trace.requests:
        by_conv.setdefault(r.request_id.split("t")[0], []).append(r)
    assert statistics.mean(len(v) for v in by_conv.values()) == pytest.approx(4.0, rel=0.15)
    for turns in by_conv.values():
        turns.sort(key=lambda r: int(r.request_id.split("t")[1]))
        for prev, cur in zip(turns, turns[1:]):
            assert cur.arrival >= prev.arrival
            history = prev.prefix_groups + [(prev.reply_group, prev.output_len)]
            assert cur.prefix_groups[: len(history)] == history  # the whole history, re-sent
            assert cur.input_len == sum(n for _, n in cur.prefix_groups)
        assert all(r.input_len + r.output_len <= 4096 for r in turns)


def test_generators_are_deterministic() -> None:
    a = generate(100, Arrivals(5, 2.0), LengthDist(), LengthDist(), seed=9)
    b = generate(100, Arrivals(5, 2.0), LengthDist(), LengthDist(), seed=9)
    c = generate(100, Arrivals(5, 2.0), LengthDist(), LengthDist(), seed=10)
    assert [r.to_json() for r in a.requests] == [r.to_json() for r in b.requests]
    assert [r.to_json() for r in a.requests] != [r.to_json() for r in c.requests]


# ---------------------------------------------------------------------------- token ids


def test_hash_ids_become_shared_token_blocks() -> None:
    synth = PromptSynth(hash_block=512)
    a = synth.prompt(TraceRequest(0, 1500, 1, hash_ids=[7, 8, 9]), index=0)
    b = synth.prompt(TraceRequest(0, 1100, 1, hash_ids=[7, 8, 4]), index=1)
    c = synth.prompt(TraceRequest(0, 600, 1), index=2)
    assert len(a) == 1500 and len(b) == 1100 and len(c) == 600
    assert a[:1024] == b[:1024]  # two shared ids = 1024 shared tokens
    assert a[1024:1100] != b[1024:1100]
    assert a[:512] != c[:512]
    # a partial last block is the start of the full block with the same id
    short = synth.prompt(TraceRequest(0, 700, 1, hash_ids=[7, 8]), index=3)
    assert short == a[:700]
    # same names, same tokens in a new synthesizer (no process-dependent hashing)
    assert PromptSynth(512).prompt(TraceRequest(0, 1500, 1, hash_ids=[7, 8, 9]), index=0) == a
    assert all(0 <= t < 16384 for t in a + c)


def test_prefix_groups_and_replies_become_tokens() -> None:
    synth = PromptSynth()
    first = TraceRequest(
        0, 300, 50, prefix_groups=[("sys", 200), ("c0u0", 100)], reply_group="c0a0"
    )
    second = TraceRequest(
        9, 420, 10, prefix_groups=[("sys", 200), ("c0u0", 100), ("c0a0", 50), ("c0u1", 70)]
    )
    p1, p2 = synth.prompt(first, 0), synth.prompt(second, 1)
    reply = synth.reply(first)
    assert len(reply) == 50
    assert p2[:300] == p1 and p2[300:350] == reply
    assert synth.reply(second) is None
