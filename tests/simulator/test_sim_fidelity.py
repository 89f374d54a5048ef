"""Fidelity at a small size: `yaie profile` on the real default model, then one shared-prefix
trace served for real and simulated with the calibrated model (`--compare-real`).

The full-size check (200 requests, the issue's 10% targets) is a command, not a test; its
figures are in guide.md. At 16 requests a single slow step moves a median, and other jobs on a
shared CI machine slow the real side at random, so this test asserts what holds at this size:
both sides finish every request, they find the same prefix hits, throughput (set mostly by the
arrivals) agrees closely, the latencies agree to within a factor that catches a broken
calibration (a wrong unit, a missing term) but not machine noise, and once the simulation is
scaled to the replay's measured machine speed (one factor, see ``fidelity.speed_factor``) the
medians agree to 50%. (Three runs on the shared dev machine gave errors of 7-12% unscaled and
2-7% scaled; a fourth, 40% on the scaled TTFT median: one slow step among 16 requests.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from yaie.cli import main
from yaie.hub import ResolvedModel

pytestmark = pytest.mark.slow

ENGINE = ["--kv-cache-memory", "64MiB", "--max-num-seqs", "16", "--max-num-batched-tokens", "512"]
# One torch thread: with two on a 2-core machine that other jobs share, a matrix product waits
# for whichever thread was descheduled, and step times swing by 3x.
THREADS = ["--threads", "1"]


def test_simulated_and_real_runs_of_a_trace_agree(
    smollm2: ResolvedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cal = tmp_path / "cal.json"
    argv = ["profile", str(smollm2.gguf_path), "--quick", "-o", str(cal), *ENGINE, *THREADS]
    assert main(argv) == 0
    profiled = json.loads(cal.read_text())
    assert {s[0] for s in profiled["samples"]} == {"decode", "mixed", "prefill"}
    assert profiled["engine"]["num_blocks"] > 0 and profiled["machine"]["device"] == "cpu"

    trace = tmp_path / "trace.jsonl"
    generate = ["trace", "generate", str(trace), "-n", "16", "--rate", "1.5", "--seed", "1"]
    lengths = ["--input-len", "48", "--output-len", "24", "--sigma", "0.5"]
    prefix = ["--prefix-groups", "2", "--prefix-len", "128"]
    assert main([*generate, *lengths, *prefix]) == 0
    out = tmp_path / "fidelity"
    argv = ["simulate", str(trace), "--cost-model", str(cal), "--compare-real", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "real" in text and "simulated" in text and "TPOT p50" in text

    record = json.loads((out / "fidelity.json").read_text())
    real, sim = record["real"], record["simulated"]
    assert real["completed"] == sim["completed"] == 16
    assert real["input_tokens"] == sim["input_tokens"]
    rows = {r["key"]: r for r in record["comparison"]}
    assert abs(rows["prefix_hit_rate"]["error"]) <= 5  # percentage points
    assert real["prefix_hit_rate"] > 0.5  # the shared system prompts were found cached
    assert abs(rows["output_tok_s"]["error"]) <= 0.2
    for key in ("ttft_p50", "tpot_p50"):
        assert 0.4 <= sim[key] / real[key] <= 2.5, (key, real[key], sim[key])
    # at the replay's own machine speed (one factor taken from its steps) the shape is right
    assert 0.5 < record["speed_factor"] < 2.0
    at_speed = record["simulated_at_replay_speed"]
    for key in ("ttft_p50", "tpot_p50"):
        assert abs(at_speed[key] / real[key] - 1) <= 0.5, (key, real[key], at_speed[key])
