"""``kv_trace.jsonl``: every frame the dashboard rebuilds equals the engine's own snapshot at that
moment, block for block; the size cap thins samples evenly and bounds the file."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from yaie.simulator.cluster import make_router
from yaie.simulator.cost import MODELS, RooflineCostModel
from yaie.simulator.driver import SimConfig, Simulation
from yaie.simulator.hardware import HARDWARE
from yaie.simulator.kv_recording import ReplicaRecorder, pack
from yaie.simulator.traces import LoadOptions, load_trace
from yaie.ui.dashboard_recording import Recording, RecordingError, unpack

SAMPLES = Path(__file__).parents[2] / "traces"
COST = RooflineCostModel(MODELS["smollm2-135m"], HARDWARE["h100"])


def _record(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trace_file: str,
    num_blocks: int,
    replicas: int = 1,
    rate_scale: float = 1.0,
    max_bytes: int = 8_000_000,
) -> tuple[Simulation, Recording, dict[tuple[int, int], dict]]:
    """Simulate with a recording; also keep the engine's own snapshot at every recorded frame,
    keyed by (sample, replica)."""
    truth: dict[tuple[int, int], dict] = {}
    frame = ReplicaRecorder.frame

    def frame_and_snapshot(recorder: ReplicaRecorder, now: float, sample: int) -> dict:
        truth[sample, recorder.index] = recorder.engine.snapshot()
        return frame(recorder, now, sample)

    monkeypatch.setattr(ReplicaRecorder, "frame", frame_and_snapshot)
    trace = load_trace(SAMPLES / trace_file, options=LoadOptions(rate_scale=rate_scale))
    config = SimConfig(
        num_blocks=num_blocks,
        sample_interval=0.05,
        record_kv=tmp_path / "kv_trace.jsonl",
        record_kv_max_bytes=max_bytes,
    )
    router = make_router("prefix") if replicas > 1 else None
    sim = Simulation(trace, config, COST, replicas, router)
    sim.run()
    return sim, Recording.load(tmp_path), truth


def _by_id(requests: list[dict]) -> list[dict]:
    return sorted(
        ({**r, "arrival": round(r["arrival"], 3)} for r in requests), key=lambda r: r["id"]
    )


def _assert_same(replayed: dict, truth: dict) -> None:
    assert replayed["kv"] == truth["kv"]  # blocks (state, refcount, owners, tokens) and radix
    for queue in ("running", "waiting"):
        assert _by_id(replayed[queue]) == _by_id(truth[queue])


@pytest.mark.parametrize(
    ("trace_file", "num_blocks", "replicas", "rate_scale"),
    [
        ("shared_prefix.jsonl", 1000, 1, 1.0),  # system prompts shared while in use
        ("poisson.jsonl", 200, 1, 20.0),  # a pool too small: preemptions rewrite block tables
        ("shared_prefix.jsonl", 600, 2, 2.0),  # two replicas behind the prefix router
    ],
)
def test_every_frame_rebuilds_the_engine_snapshot(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trace_file: str,
    num_blocks: int,
    replicas: int,
    rate_scale: float,
) -> None:
    sim, rec, truth = _record(tmp_path, monkeypatch, trace_file, num_blocks, replicas, rate_scale)
    assert rec.replicas == replicas and rec.num_blocks == num_blocks and rec.block_size == 16
    seen = Counter()
    for replica in range(replicas):
        frames = rec.frames_of(replica)
        assert [f["sample"] for f in frames] == list(range(len(frames)))  # nothing skipped
        for i, frame in enumerate(frames):
            replayed = rec.snapshot(i, replica)
            _assert_same(replayed, truth[frame["sample"], replica])
            states = Counter(b["state"] for b in replayed["kv"]["blocks"])
            assert {s: frame[s] for s in ("free", "cached", "owned", "shared")} == {
                s: states[s] for s in ("free", "cached", "owned", "shared")
            }
            seen.update(states)
            seen["locked"] += any(n["locked"] for n in replayed["kv"]["radix"]["nodes"])
            seen["preempted"] += any(r["status"] == "preempted" for r in replayed["waiting"])
        assert sum(f["batch"][0] for f in frames) == sim.replicas[replica].engine.num_steps
    assert seen["owned"] and seen["cached"]
    if trace_file == "poisson.jsonl":  # no common prefixes, but preemptions
        assert seen["preempted"] and sim.replicas[0].engine.scheduler.num_preemptions > 0
    else:
        assert seen["shared"] and seen["locked"]
    # Out of order: a jump back starts again from the first frame.
    last = len(rec.frames_of(0)) - 1
    for i in (last, 3, last // 2, 0):
        _assert_same(rec.snapshot(i), truth[rec.frames_of(0)[i]["sample"], 0])


def test_the_size_cap_thins_samples_evenly_and_bounds_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = tmp_path / "full"
    full.mkdir()
    _, uncapped, _ = _record(full, monkeypatch, "shared_prefix.jsonl", 1000)
    size = (full / "kv_trace.jsonl").stat().st_size
    cap = size // 8
    _, rec, truth = _record(tmp_path, monkeypatch, "shared_prefix.jsonl", 1000, max_bytes=cap)
    lines = (tmp_path / "kv_trace.jsonl").read_bytes().splitlines(keepends=True)
    assert sum(map(len, lines)) <= cap + max(map(len, lines))  # at most one frame past the cap
    frames = rec.frames_of(0)
    samples = [f["sample"] for f in frames]
    total = len(uncapped.frames_of(0))
    assert 20 < len(frames) < total / 4 and samples == sorted(set(samples))
    assert samples[0] == 0 and samples[-1] > 0.95 * total  # spread over the whole run
    halves = Counter(s < total // 2 for s in samples)
    assert min(halves.values()) > len(frames) / 4
    # A skipped sample's changes are in the next frame's delta: every frame is still exact,
    # and the steps of skipped samples are still counted.
    for i, frame in enumerate(frames):
        _assert_same(rec.snapshot(i), truth[frame["sample"], 0])
    steps = sum(f["batch"][0] for f in uncapped.frames_of(0)[: samples[-1] + 1])
    assert sum(f["batch"][0] for f in frames) == steps


def test_frames_store_only_what_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _record(tmp_path, monkeypatch, "shared_prefix.jsonl", 1000)
    lines = (tmp_path / "kv_trace.jsonl").read_text().splitlines()
    header, frames = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["format"] == "yaie-kv-trace" and header["version"] == 2
    assert frames[0]["free"] == 1000 and "tree" not in frames[0]  # an empty engine
    # A request is described once, and left out altogether if it came and went between two
    # samples (0.05 s apart here).
    first_seen = Counter(rid for f in frames for rid in f.get("new", {}))
    assert 50 < len(first_seen) < 200 and set(first_seen.values()) == {1}
    gone = [rid for f in frames for rid in f.get("gone", [])]
    assert sorted(gone) == sorted(first_seen)
    base = {"t", "sample", "replica", "step", "running", "waiting", "batch"}
    base |= {"free", "cached", "owned", "shared"}
    idle = [f for f in frames[1:] if f["batch"][0] == 0 and "new" not in f]
    assert idle and all(set(f) == base for f in idle)  # nothing moved: no delta
    assert (tmp_path / "kv_trace.jsonl").stat().st_size < 3000 * len(frames)


@pytest.mark.parametrize(
    "ids", [[], [5], [7, 8, 9, 10, 3], [3, 2, 1], [0, 1, 5, 6, 7, 6, 7], list(range(1000))]
)
def test_packed_block_ids_unpack_to_themselves(ids: list[int]) -> None:
    packed = pack(ids)
    assert unpack(packed) == ids and len(packed) <= len(ids)
    assert pack(range(100)) == [0, -99] and pack([7, 8, 9, 10, 3]) == [7, -3, 3]


def test_an_old_or_foreign_file_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "kv_trace.jsonl"
    path.write_text(json.dumps({"num_blocks": 10, "block_size": 16, "cells": 5}) + "\n{}\n")
    with pytest.raises(RecordingError, match="no yaie-kv-trace header"):
        Recording.load(tmp_path)
    path.write_text(json.dumps({"format": "yaie-kv-trace", "version": 9}) + "\n{}\n")
    with pytest.raises(RecordingError, match="a version 9 recording; this yaie reads version 2"):
        Recording.load(path)
