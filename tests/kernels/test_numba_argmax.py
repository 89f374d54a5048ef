"""The numba argmax (greedy sampling) against torch's ``argmax``: exactly the same indices.

Plain ``pytest`` re-runs this module under ``NUMBA_ENABLE_CUDASIM=1`` (``run_in_simulator``),
where the ``sim`` tests run the kernel on CPU tensors at small vocabularies of one and several
chunks; ``pytest -m gpu`` runs the ``gpu`` tests at Llama-3 and Qwen3 vocabularies. Each check
plants the cases a greedy decode must get right: the maximum in any chunk, equal maxima in two
chunks (the lower index wins), NaN (wins, as in torch), and rows read through a strided view.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import gpu, run_in_simulator, sim

argmax_mod = importlib.import_module("yaie.kernels.argmax")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_argmax(rows: int, vocab: int, dtype: torch.dtype, device: str) -> None:
    wide = torch.randn(rows, vocab + 8, device=device).to(dtype)
    logits = wide[:, 3 : 3 + vocab]  # rows one stride apart, not contiguous as a whole
    chunk = argmax_mod.CHUNK
    for row in range(rows):
        kind = row % 4
        if kind == 1:  # the maximum in the last, partial chunk
            logits[row, vocab - 1] = 50
        elif kind == 2 and vocab > chunk:  # equal maxima in two chunks: the first one wins
            logits[row, vocab - 2] = 50
            logits[row, chunk - 5] = 50
        elif kind == 3:  # NaN beats every number, the first NaN wins
            logits[row, vocab // 2] = float("nan")
            logits[row, vocab // 3] = float("nan")
    got = argmax_mod.argmax_numba(logits)
    assert torch.equal(got.cpu(), argmax_mod.argmax_reference(logits).cpu())


def test_kernels_in_cuda_simulator() -> None:
    run_in_simulator(__file__)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
def test_sim_argmax_one_chunk(dtype: torch.dtype) -> None:
    check_argmax(4, 300, dtype, "cpu")


@sim
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sim_argmax_merges_chunks(dtype: torch.dtype) -> None:
    """Three chunks a row, twice: the merging block zeroes its row's counter for the next."""
    for _ in range(2 if dtype == torch.float32 else 1):
        check_argmax(4, 2 * argmax_mod.CHUNK + 77, dtype, "cpu")


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 64])
@pytest.mark.parametrize("vocab", [128256, 151936])
def test_gpu_argmax(vocab: int, rows: int, dtype: torch.dtype) -> None:
    for _ in range(3):
        check_argmax(rows, vocab, dtype, "cuda")


@gpu
def test_gpu_sampler_dispatch_runs_the_kernel() -> None:
    logits = torch.randn(8, 151936, device="cuda")
    assert torch.equal(argmax_mod.argmax(logits), argmax_mod.argmax_numba(logits))
