"""The calibrated cost model: its formula, the least-squares fit, the JSON file, the CLI."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_sim_cost import batch_of

from yaie.cli import main
from yaie.simulator.cost import CalibratedCostModel, interpolate
from yaie.simulator.profile import StepSample, fit

SAMPLES = Path(__file__).parents[2] / "traces"
ENGINE = {
    "num_blocks": 300,
    "block_size": 16,
    "max_num_seqs": 12,
    "max_num_batched_tokens": 512,
    "max_model_len": 2048,
    "kv_cache_memory": "64MiB",
    "model_arg": None,
}
MACHINE = {
    "model": "TinyTest",
    "cpu": "Test CPU",
    "device": "cpu",
    "dtype": "float32",
    "threads": 2,
}


def known_model() -> CalibratedCostModel:
    """A CPU-like engine: 30 ms to stream the weights, then ~1.4 ms per token once the
    matrix products are compute-bound; attention and sampled rows on top."""
    knots = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    times = [0.030 if k <= 16 else 0.030 + 0.0014 * (k - 16) for k in knots]
    coefficients = {
        "requests": 2e-4,
        "decode_context": 3e-7,
        "prefills": 1e-3,
        "prefill_context": 2e-6,
        "prefill_pairs": 4e-9,
        "sampled_rows": 1e-4,
    }
    return CalibratedCostModel(knots, times, coefficients, {"machine": MACHINE, "engine": ENGINE})


def test_step_time_is_the_token_curve_plus_the_feature_prices() -> None:
    model = known_model()
    c = model.coefficients
    decodes = batch_of(*[(100, 1)] * 8)  # 8 decodes reading 101 tokens of K/V each
    assert model.step_time(decodes) == pytest.approx(
        0.030 + 8 * c["requests"] + 808 * c["decode_context"] + 8 * c["sampled_rows"]
    )
    # a 200-token chunk after a 64-token cached prefix, beside 3 decodes: 203 tokens lie
    # between the knots 128 and 256, so f interpolates
    mixed = batch_of((64, 200), *[(50, 1)] * 3)
    f = interpolate(model.knots, model.knot_times, 203)
    assert f == pytest.approx(0.030 + 0.0014 * (203 - 16))
    pairs = 200 * 64 + 200 * 201 // 2
    assert model.step_time(mixed) == pytest.approx(
        f
        + 4 * c["requests"]
        + 3 * 51 * c["decode_context"]
        + c["prefills"]
        + 264 * c["prefill_context"]
        + pairs * c["prefill_pairs"]
        + 4 * c["sampled_rows"]
    )
    # past the last knot the curve goes on with its last slope
    assert model.token_time(1024) == pytest.approx(0.030 + 0.0014 * (1024 - 16))


def test_the_fit_recovers_a_known_engine_from_its_step_times() -> None:
    truth = known_model()
    rng = random.Random(0)
    samples = []
    for _ in range(300):
        decodes = rng.choice([0, 1, 2, 4, 8, 16, 32])
        chunk = rng.choice([0, 0, 16, 64, 256, 480])
        if decodes + chunk == 0:
            continue
        entries = [(rng.randrange(10, 1000), 1) for _ in range(decodes)]
        if chunk:
            entries.append((rng.choice([0, 0, 128, 512]), chunk))
        batch = batch_of(*entries)
        tokens, features = CalibratedCostModel.features(batch)
        noise = 1 + rng.uniform(-0.02, 0.02)  # a quiet machine's jitter
        kind = "decode" if not chunk else "prefill" if not decodes else "mixed"
        samples.append(StepSample(tokens, features, truth.step_time(batch) * noise, kind))
    fitted = fit(samples, {"machine": MACHINE, "engine": ENGINE})
    assert fitted.info["fit"]["all"]["mean_rel_error"] < 0.02
    assert all(c >= 0 for c in fitted.coefficients.values())
    # and it predicts batches it never saw
    for entries in ([(700, 1)] * 24, [(0, 300), (40, 1)], [(256, 100)] + [(900, 1)] * 10):
        batch = batch_of(*entries)
        assert fitted.step_time(batch) == pytest.approx(truth.step_time(batch), rel=0.05)


def test_the_json_file_round_trips_and_bad_files_are_one_clear_error(tmp_path: Path) -> None:
    model = known_model()
    path = tmp_path / "cal.json"
    model.save(path)
    loaded = CalibratedCostModel.load(path)
    batch = batch_of((0, 300), *[(500, 1)] * 5)
    assert loaded.step_time(batch) == model.step_time(batch)
    assert loaded.info["engine"] == ENGINE
    (tmp_path / "other.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match="not a cost model written by `yaie profile`"):
        CalibratedCostModel.load(tmp_path / "other.json")
    data = json.loads(path.read_text())
    data["knots"] = [4, 2]
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="increasing knots"):
        CalibratedCostModel.load(tmp_path / "bad.json")


def test_simulate_with_a_calibrated_model_uses_its_engine_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cal.json"
    known_model().save(path)
    trace = str(SAMPLES / "poisson.jsonl")
    assert main(["simulate", trace, "--cost-model", str(path), "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "TinyTest on Test CPU, cpu float32, 2 threads" in text
    setup = json.loads((tmp_path / "a" / "summary.json").read_text())["setup"]
    assert setup["cost_model"].startswith("calibrated")
    for name in ("num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len"):
        assert setup[name] == ENGINE[name]
    # an explicit option still wins over what the file measured
    argv = ["simulate", trace, "--cost-model", str(path), "--max-num-seqs", "4", "--no-plots"]
    assert main([*argv, "--out", str(tmp_path / "b")]) == 0
    setup = json.loads((tmp_path / "b" / "summary.json").read_text())["setup"]
    assert setup["max_num_seqs"] == 4 and setup["num_blocks"] == 300


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--compare-real"], "--compare-real needs a calibrated cost model"),
        (["--cost-model", "{cal}", "--hardware", "h100"], "shape the roofline"),
        (["--cost-model", "{missing}"], "does not exist"),
        (["--cost-model", "{cal}", "--compare-real", "--replicas", "2"], "and one replica"),
    ],
)
def test_calibrated_user_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    known_model().save(tmp_path / "cal.json")
    names = {"cal": tmp_path / "cal.json", "missing": tmp_path / "missing.json"}
    argv = ["simulate", str(SAMPLES / "poisson.jsonl"), *(a.format(**names) for a in extra)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_calibrated_simulation_never_imports_torch_or_numpy(tmp_path: Path) -> None:
    known_model().save(tmp_path / "cal.json")
    code = (
        "import sys; from yaie.cli import main; "
        f"assert main(['simulate', {str(SAMPLES / 'poisson.jsonl')!r}, '--cost-model', "
        f"{str(tmp_path / 'cal.json')!r}]) == 0; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, 'heavy import'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
