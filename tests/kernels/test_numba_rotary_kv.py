"""The fused q/k norm + rotary + K/V write kernel against its torch reference (the unfused ops).

Runs the way the other kernel test modules do: under plain ``pytest``,
``test_rotary_kv_in_cuda_simulator`` re-runs this module in a subprocess with
``NUMBA_ENABLE_CUDASIM=1`` for the ``sim`` tests (tiny sizes); ``pytest -m gpu`` runs the ``gpu``
tests at Qwen3-0.6B and Llama-3-8B head shapes.

Each check draws fresh random inputs, fills the caches with NaN so that a stray write (or one for
a padding token) shows, and compares the queries and the written cache rows with the reference
run in float64 by ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_helpers import check, check_cache_rows, gpu, run_in_simulator, sim

rotary_kv_mod = importlib.import_module("yaie.kernels.rotary_kv")
rotary_mod = importlib.import_module("yaie.kernels.rotary")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def check_rotary_write_kv(
    tokens: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, dtype: torch.dtype,
    device: str, block_size: int = 16,
) -> None:
    num_blocks = -(-tokens // block_size) + 2
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if tokens > 1:
        slots[tokens // 2] = -1  # a padding token: computes q, stores no K/V
    positions = torch.randint(0, 4096, (tokens,))
    table = rotary_mod.build_cos_sin_cache(head_dim, 4096, 500000.0, None, dtype)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, head_dim).to(dtype)
    norm = None
    if qk_norm:
        norm = (torch.randn(head_dim).to(dtype), torch.randn(head_dim).to(dtype), 1e-6)

    def run(fn, to):
        caches = [to(torch.full(cache_shape, float("nan"), dtype=dtype)) for _ in range(2)]
        weights = None if norm is None else (to(norm[0]), to(norm[1]), norm[2])
        where = caches[0].device
        q = fn(positions.to(where), to(qkv).clone(), heads, kv_heads, to(table), *caches,
               slots.to(where), weights)
        return q.cpu(), [c.cpu().flatten(0, 1) for c in caches]

    # The kernel, or on the GPU the dispatch where the kernel declines (fp32 Llama-3-8B heads:
    # 48 heads of 32-lane groups are more than a block's rounds hold).
    fused = rotary_kv_mod.rotary_write_kv_numba
    if device == "cuda":
        fused = rotary_kv_mod.rotary_write_kv
    q, caches = run(fused, lambda t: t.to(device))
    ref_q, ref_caches = run(rotary_kv_mod.rotary_write_kv_reference, lambda t: t.double())
    check(q, ref_q, dtype)
    check_cache_rows(caches, ref_caches, slots, dtype)


def test_rotary_kv_in_cuda_simulator() -> None:
    run_in_simulator(__file__)


@sim
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("qk_norm", [True, False], ids=["qk_norm", "plain"])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 64), (3, 1, 32)])
def test_sim_rotary_write_kv(
    heads: int, kv_heads: int, head_dim: int, qk_norm: bool, dtype: torch.dtype
) -> None:
    check_rotary_write_kv(3, heads, kv_heads, head_dim, qk_norm, dtype, "cpu")


def test_unsupported_head_dims_take_the_reference() -> None:
    """A half head of 12 words (bf16 head_dim 96) does not tile a warp: the reference runs."""
    qkv = torch.randn(2, 6, 96).bfloat16()
    cache = torch.zeros(2, 16, 2, 96).bfloat16()
    table = rotary_mod.build_cos_sin_cache(96, 8, 10000.0, None, torch.bfloat16)
    args = (torch.arange(2), qkv, 2, 2, table, cache, cache.clone(), torch.arange(2), None)
    assert not rotary_kv_mod.numba_supports(*args)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "qk_norm"), [(16, 8, True), (32, 8, False)], ids=["qwen3", "llama"]
)
def test_gpu_rotary_write_kv(heads: int, kv_heads: int, qk_norm: bool,
                             dtype: torch.dtype) -> None:
    qkv = torch.empty(1, heads + 2 * kv_heads, 128, dtype=dtype, device="cuda")
    cache = torch.empty(1, 16, kv_heads, 128, dtype=dtype, device="cuda")
    table = torch.empty(1, 2, 128, dtype=dtype, device="cuda")
    ints = torch.zeros(1, dtype=torch.int64, device="cuda")
    weights = (table[0, 0], table[0, 0], 1e-6) if qk_norm else None
    supported = rotary_kv_mod.numba_supports(ints, qkv, heads, kv_heads, table, cache, cache,
                                             ints, weights)
    assert supported == (dtype != torch.float32 or heads == 16)
    check_rotary_write_kv(1000, heads, kv_heads, 128, qk_norm, dtype, "cuda")
    check_rotary_write_kv(1, heads, kv_heads, 128, qk_norm, dtype, "cuda")
