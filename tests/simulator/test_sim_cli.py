"""``yaie simulate`` and ``yaie trace``: the report files, and one-line errors."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from yaie.cli import main

SAMPLES = Path(__file__).parents[2] / "traces"


def test_simulate_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    code = main(
        [
            "simulate",
            str(SAMPLES / "shared_prefix.jsonl"),
            "--model",
            "smollm2-135m",
            "--hardware",
            "l4",
            "--out",
            str(out),
            "--record-kv",
            "--ttft-slo",
            "200",
            "--tpot-slo",
            "20",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    for expected in (
        "SmolLM2-135M on NVIDIA L4",
        "TTFT",
        "TPOT",
        "ITL",
        "E2E",
        "goodput",
        "prefix cache",
        "requests/s",
        "wrote summary.json",
    ):
        assert expected in text
    summary = json.loads((out / "summary.json").read_text())
    m = summary["metrics"]
    assert m["completed"] == 200 and m["requests"] == 200
    assert 0 < m["ttft_p50"] <= m["ttft_p90"] <= m["ttft_p99"]
    assert 0.5 < m["prefix_hit_rate"] < 1
    assert 0 < m["goodput_req_s"] <= m["completed"] / m["duration_s"]
    assert (
        summary["setup"]["num_blocks"] == int((0.9 * 24e9 - 134_515_008 * 2) // (16 * 23040))
        and summary["setup"]["dtype_bytes"] == 2
    )
    assert summary["speed"]["requests_per_wall_s"] > 0
    with (out / "requests.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and rows[0]["finish_reason"] == "length"
    assert float(rows[0]["ttft_s"]) > 0
    with (out / "timeseries.csv").open() as f:
        assert len(list(csv.DictReader(f))) > 100
    for png in ("latency.png", "timeline.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "kv_trace.jsonl").read_text().splitlines()) > 100


def test_cluster_and_trace_shaping_from_the_command_line(
    tmp_path: Path, shared_traces: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "simulate",
            str(shared_traces / "mooncake" / "synthetic_trace.jsonl"),
            "--model",
            "qwen3-0.6b",
            "--hardware",
            "a100",
            "--replicas",
            "2",
            "--router",
            "least",
            "--window",
            "0:60",
            "--input-scale",
            "0.25",
            "--max-input-len",
            "6000",
            "--out",
            str(tmp_path),
            "--no-plots",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert (
        "2 replicas (least)" in text
        and "time window [0, 60)" in text
        and "hash block 512 -> 128" in text
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["replica"] for r in summary["replicas"]] == [0, 1]
    assert not (tmp_path / "latency.png").exists()


def test_trace_generate_and_info(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conv.jsonl"
    assert (
        main(["trace", "generate", str(path), "--conversations", "-n", "20", "--prefix-len", "100"])
        == 0
    )
    assert main(["trace", "info", str(path)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "prefix groups" in text
    assert main(["simulate", str(path), "--model", "smollm2-135m", "--hardware", "cpu"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "missing.jsonl"], "no trace file at missing.jsonl"),
        (["simulate", "{samples}/poisson.jsonl", "--model", "gpt-9"], "unknown model 'gpt-9'"),
        (["simulate", "{samples}/poisson.jsonl", "--window", "10"], "--window takes START:END"),
        (["simulate", "{samples}/poisson.jsonl", "--record-kv"], "give --out DIR too"),
        (["simulate", "{samples}/poisson.jsonl", "--replicas", "0"], "--replicas must be >= 1"),
        (["simulate", "{samples}/poisson.jsonl", "--num-blocks", "0"], "--num-blocks must be >= 1"),
        (["simulate", "{samples}/poisson.jsonl", "--window", "900:1000"], "no requests left"),
        (
            [
                "simulate",
                "{samples}/poisson.jsonl",
                "--model",
                "llama-3.1-8b",
                "--hardware",
                "cpu",
                "--dtype-bytes",
                "4",
            ],
            "no memory for the KV cache",
        ),
    ],
)
def test_user_errors_are_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.format(samples=SAMPLES) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and err.startswith("yaie: error:")


def test_the_simulate_path_never_imports_torch(tmp_path: Path) -> None:
    """DESIGN: the simulator runs on machines without torch; keep it off the import path."""
    code = (
        "import sys\n"
        "from yaie.cli import main\n"
        f"assert main(['simulate', {str(SAMPLES / 'poisson.jsonl')!r}, '--model', 'smollm2-135m', "
        f"'--out', {str(tmp_path)!r}]) == 0\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "heavy = sorted(loaded & {'torch', 'transformers', 'numba'})\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
