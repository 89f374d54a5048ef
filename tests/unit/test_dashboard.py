"""The dashboard's views, without a browser: block states, aggregation, radix tree, replays."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from engine_helpers import make_engine

from yaie.core.sampling import SamplingParams
from yaie.simulator.cost import MODELS, RooflineCostModel
from yaie.simulator.driver import SimConfig, simulate
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.kv_recording import ReplicaRecorder
from yaie.simulator.traces import LoadOptions, load_trace
from yaie.ui.dashboard import (
    MAX_CELLS,
    BlockMap,
    radix_html,
    replay_views,
    request_colour,
)
from yaie.ui.dashboard_recording import Recording, RecordingError


def _run(engine, steps: int) -> None:
    for _ in range(steps):
        engine.step()
        engine.clock.now += 0.01


def _cells(html: str) -> list[str]:
    return re.findall(r'data-state="(\w+)"', html)


def _lightness(colour: str) -> int:
    return int(re.fullmatch(r"hsl\(\d+,\d+%,(\d+)%\)", colour).group(1))


PROMPT = list(range(1, 18))  # 17 tokens: 4 full blocks of 4 and one token more


def test_a_lone_request_owns_its_blocks_then_the_tree_keeps_the_full_ones() -> None:
    engine = make_engine(num_blocks=16, block_size=4)
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=6, ignore_eos=True))
    _run(engine, 2)
    kv = engine.snapshot()["kv"]
    running = BlockMap.from_snapshot(kv)
    # 17 prompt tokens + 1 sampled: 5 blocks, all computed by "a" itself: owned, none shared,
    # though the tree holds the 4 full ones too (refcount 2).
    assert [(b["state"], b["refcount"]) for b in kv["blocks"][:5]] == [("owned", 2)] * 4 + [
        ("owned", 1)
    ]
    assert running.counts == {"free": 11, "cached": 0, "owned": 5, "shared": 0}
    assert all(c.colour == request_colour("a") for c in running.cells if c.state == "owned")
    first = running.cells[0]
    assert first.title(4) == "block 0: owned, in the radix tree\nowners: a\nrefcount 2\n4/4 tokens"
    last = next(c for c in running.cells if c.state == "owned" and c.refcount == 1)
    assert last.tokens == 2  # tokens 16 and 17 of 18 computed so far
    _run(engine, 10)
    done = BlockMap.from_snapshot(engine.snapshot()["kv"])
    # 17 + 6 tokens, 22 computed: 5 full blocks stay in the tree, the partial one is freed
    assert done.counts == {"free": 11, "cached": 5, "owned": 0, "shared": 0}


def test_blocks_taken_from_the_prefix_cache_are_shared_and_darker_with_more_holders() -> None:
    engine = make_engine(num_blocks=32, block_size=4)
    engine.add_request("a", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True))
    _run(engine, 5)
    engine.add_request("b", PROMPT[:16] + [50, 51], SamplingParams(max_tokens=4, ignore_eos=True))
    _run(engine, 1)
    one = BlockMap.from_snapshot(engine.snapshot()["kv"])
    assert one.counts["shared"] == 4  # b found a's 4 full blocks in the tree
    reused = one.cells[0]
    assert reused.state == "shared" and reused.owners == ["b"] and reused.refcount == 2
    assert "reused from the prefix cache" in reused.title(4)
    engine.add_request("c", PROMPT[:16] + [60], SamplingParams(max_tokens=4, ignore_eos=True))
    _run(engine, 1)
    two = BlockMap.from_snapshot(engine.snapshot()["kv"])
    assert two.counts["shared"] == 4 and two.cells[0].owners == ["b", "c"]
    assert two.cells[0].refcount == 3 and _lightness(two.cells[0].colour) < _lightness(
        reused.colour
    )


def test_a_pool_larger_than_the_screen_is_aggregated_and_says_so() -> None:
    engine = make_engine(num_blocks=100_000, block_size=16, max_num_batched_tokens=512)
    engine.add_request("a", list(range(1, 300)), SamplingParams(max_tokens=4, ignore_eos=True))
    _run(engine, 2)  # 299 prompt tokens and one decode: 300 tokens in 19 blocks
    blocks = BlockMap.from_snapshot(engine.snapshot()["kv"])
    assert len(blocks.cells) == MAX_CELLS
    assert sum(c.count for c in blocks.cells) == 100_000
    assert {c.count for c in blocks.cells} == {24, 25}
    assert blocks.counts["owned"] == 19 and blocks.counts["free"] == 100_000 - 19
    html = blocks.to_html()
    assert len(_cells(html)) == MAX_CELLS
    assert 'data-blocks="100000"' in html and 'data-owned="19"' in html
    assert "each of the 4,096 cells stands for 24-25 neighbouring blocks" in html
    head = blocks.cells[0]  # blocks 0-23: "a" has 19 of them
    assert head.state == "owned" and head.mix == {"free": 5, "owned": 19} and head.tokens == 300
    assert "blocks 0-23: 5 free, 19 owned\nowners: a\nmax refcount 2\n300/384 tokens" in html


def test_a_small_pool_gets_one_cell_per_block_and_no_aggregation_note() -> None:
    engine = make_engine(num_blocks=40, block_size=4)
    html = BlockMap.from_snapshot(engine.snapshot()["kv"]).to_html()
    assert _cells(html) == ["free"] * 40 and "data-aggregated" not in html


def test_radix_tree_view_collapses_chains_and_marks_locks() -> None:
    radix = {
        "cached_blocks": 7,
        "hit_rate": 0.25,
        "truncated": False,
        "nodes": [
            {"id": 0, "parent": None, "tokens": 0, "blocks": 0, "hits": 0, "locked": False},
            {"id": 1, "parent": 0, "tokens": 32, "blocks": 2, "hits": 3, "locked": True},
            {"id": 2, "parent": 1, "tokens": 16, "blocks": 1, "hits": 1, "locked": False},
            {"id": 3, "parent": 1, "tokens": 16, "blocks": 1, "hits": 0, "locked": True},
            {"id": 4, "parent": 3, "tokens": 16, "blocks": 1, "hits": 0, "locked": True},
            {"id": 5, "parent": 4, "tokens": 32, "blocks": 2, "hits": 0, "locked": False},
        ],
    }
    html = radix_html(radix)
    assert "7 cached blocks in 5 nodes" in html and "prefix hit rate 25%" in html
    assert "32 tokens · 2 blocks · 3 hits" in html  # the shared node, locked
    assert "16 tokens · 1 blocks · 1 hits" in html
    assert "3 nodes in a row: 64 tokens · 4 blocks · 0 hits" in html
    assert html.count('data-locked="0"') == 2 and 'data-locked="2"' in html


def _simulate(tmp_path: Path) -> Recording:
    """A recording of 200 requests whose prompts start with one of a few system prompts."""
    trace = load_trace(
        Path(__file__).parents[2] / "traces" / "shared_prefix.jsonl",
        options=LoadOptions(rate_scale=5),
    )
    cost = RooflineCostModel(MODELS["smollm2-135m"], HARDWARE["h100"])
    record = tmp_path / "kv_trace.jsonl"
    simulate(trace, SimConfig(num_blocks=600, sample_interval=0.05, record_kv=record), cost)
    (tmp_path / "requests.csv").write_text(
        "request,arrival_s,ttft_s,tpot_s,e2e_s\n0,0.1,0.05,0.01,0.5\n"
    )
    return Recording.load(tmp_path)


def test_a_replay_draws_hues_per_request_the_radix_tree_and_the_requests(tmp_path: Path) -> None:
    rec = _simulate(tmp_path)
    frames = rec.frames_of(0)
    busiest = max(range(len(frames)), key=lambda i: (frames[i]["running"], frames[i]["shared"]))
    status, block_map, usage, _, tokens, _, ttft, _, radix, table = replay_views(rec, busiest)
    state = rec.snapshot(busiest)
    running = state["running"]
    assert len(running) == frames[busiest]["running"] > 2
    # One hue per running request in the map, each the hue of its row in the requests table.
    fills = set(re.findall(r'fill="([^"]+)" data-state="owned"', block_map))
    assert fills == {request_colour(r["id"]) for r in running if _owns_a_block(state, r["id"])}
    assert len(fills) > 2 and all(request_colour(r["id"]) in table for r in running)
    assert table.count('data-status="running"') == len(running)
    assert 'data-shared="0"' not in block_map and "owners: " in block_map
    # The radix tree, with the system prompts' node locked by the requests using it.
    assert radix.count("<li") > 3 and "hits" in radix and 'data-locked="0"' in radix
    assert re.search(r'data-locked="[1-9]', radix)
    assert f"{busiest}/{len(frames) - 1}" in status and "prefix hit rate" in status
    assert len(usage) == 3 * (busiest + 1) and set(tokens["kind"]) == {"prefill", "decode"}
    assert list(ttft["requests"]) == ([1] if frames[busiest]["t"] >= 0.6 else [0])
    # Another moment, another picture.
    other = replay_views(rec, busiest // 2)
    assert other[1] != block_map and other[8] != radix


def _owns_a_block(state: dict, request_id: str) -> bool:
    return any(b["state"] == "owned" and request_id in b["owners"] for b in state["kv"]["blocks"])


def test_a_replayed_frame_is_drawn_as_the_live_snapshot_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same drawing code, fed the same snapshot: the block map and the radix tree of a
    replayed frame are the HTML the live view drew from the engine at that moment."""
    truth: dict[int, dict] = {}
    frame = ReplicaRecorder.frame

    def frame_and_snapshot(recorder: ReplicaRecorder, now: float, sample: int) -> dict:
        truth[sample] = recorder.engine.snapshot()
        return frame(recorder, now, sample)

    monkeypatch.setattr(ReplicaRecorder, "frame", frame_and_snapshot)
    rec = _simulate(tmp_path)
    for i in range(0, len(rec.frames_of(0)), 25):
        live = truth[rec.frames_of(0)[i]["sample"]]
        _, block_map, *_, radix, _ = replay_views(rec, i)
        assert block_map == BlockMap.from_snapshot(live["kv"]).to_html()
        assert radix == radix_html(live["kv"]["radix"])


def test_a_folder_without_a_recording_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RecordingError, match="no kv_trace.jsonl; record one with"):
        Recording.load(tmp_path)
    (tmp_path / "kv_trace.jsonl").write_text("not json\n")
    with pytest.raises(RecordingError, match="not a KV recording"):
        Recording.load(tmp_path)
