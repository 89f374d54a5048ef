"""What the numba kernel test modules share: how they run under the CUDA simulator, the ``gpu``
marker, and the relative-error check against a float64 reference.

numba reads ``NUMBA_ENABLE_CUDASIM`` once, at import, and other tests of a plain ``pytest``
session import it for real; so each kernel module has one test that re-runs the whole module
in a fresh interpreter with the simulator switched on (``run_in_simulator``), where its ``sim``
tests run and its ``gpu`` tests skip.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

SIMULATED = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

sim = pytest.mark.skipif(
    not SIMULATED, reason="runs in the CUDA-simulator subprocess (run_in_simulator)"
)


def gpu(fn):
    """``@pytest.mark.gpu``, skipped where there is no CUDA GPU (or inside the simulator)."""
    no_gpu = SIMULATED or not torch.cuda.is_available()
    return pytest.mark.gpu(pytest.mark.skipif(no_gpu, reason="needs a CUDA GPU")(fn))


def run_in_simulator(test_file: str) -> None:
    """Run ``test_file``'s tests in a fresh interpreter under ``NUMBA_ENABLE_CUDASIM=1``."""
    if SIMULATED:
        pytest.skip("already running in the simulator")
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def gguf_round_trip(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The fp32 values a GGUF of ``weight`` in ``kind`` (``"Q4_1"``, ``"Q8_0"``) loads as:
    gguf-py's quantizer, then its dequantizer, which the loader and transformers both use."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    qtype = GGMLQuantizationType[kind]
    values = dequantize(quantize(weight.numpy(), qtype), qtype)
    return torch.from_numpy(values.reshape(weight.shape).astype("float32"))


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; fails if any element of ``out`` is NaN (unwritten)."""
    assert not out.isnan().any(), "an output element was left unwritten (still NaN)"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """``out`` within the tolerance of ``dtype`` of the reference ``ref``."""
    err = relative_error(out, ref)
    assert err < TOLERANCE[dtype], f"relative error {err:.2e} for {dtype}"


def check_cache_rows(
    caches: list[torch.Tensor], refs: list[torch.Tensor], slots: torch.Tensor, dtype: torch.dtype
) -> None:
    """Rows ``[slots, ...]`` of each cache (poisoned with NaN before the write) match the
    reference's where the slot is not negative, and every other row is still NaN."""
    written = slots[slots >= 0]
    for got, want in zip(caches, refs):
        check(got[written], want[written], dtype)
        untouched = torch.ones(len(got), dtype=torch.bool)
        untouched[written] = False
        assert got[untouched].isnan().all(), "a K/V row was written outside the slot mapping"
