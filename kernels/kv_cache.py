"""Writing a step's new keys and values into the paged KV cache.

Each cache is ``[num_blocks, block_size, num_kv_heads, head_dim]``; flattened over its first two
dims it is a table of ``[num_kv_heads, head_dim]`` rows, one per slot
(``slot = block_id * block_size + offset``), so a write is a row scatter by slot.

The numba kernel copies raw 8-byte words, so one kernel serves every dtype, and skips padded
slots on the GPU without the host synchronization the reference's check needs.
"""

from __future__ import annotations

import numpy as np
import torch

from yaie.kernels._numba import (
    cuda,
    integers,
    pow2_threads,
    runs_here,
    stream_for,
    words,
    words_fit,
)


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k, v [T, Hkv, D]`` at rows ``slot_mapping [T]`` (int64) of the caches.

    A negative slot marks a padding token (batches padded to a captured size) and is skipped.
    """
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k)
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v)


# --- numba.cuda kernel ----------------------------------------------------------------------------


_WORDS_PER_THREAD = 4


@cuda.jit(cache=True)
def write_kv_kernel(k, v, k_cache, v_cache, slot_mapping):
    """One block stores one token's K and V rows; padded tokens (slot < 0) return at once.

    Arguments are 8-byte-word views with a token's heads flattened into one row: k, v
    ``[T, Hkv * W]`` (row-strided slices of the QKV output qualify), caches ``[slots, Hkv * W]``.
    Thread ``t`` owns words ``t + r * blockDim`` of the row: it loads all of them, K and V,
    before storing any (numba cannot tell that the caches don't alias k and v, so an earlier
    store would hold back later loads). A warp reads consecutive words of the token's row and
    writes consecutive words of its slot's row.
    """
    t = cuda.blockIdx.x
    slot = slot_mapping[t]
    if slot < 0:
        return
    n = k.shape[1]
    keys = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    values = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    base = cuda.threadIdx.x
    while base < n:
        for r in range(_WORDS_PER_THREAD):
            i = base + r * cuda.blockDim.x
            if i < n:
                keys[r] = np.uint64(k[t, i])
                values[r] = np.uint64(v[t, i])
        for r in range(_WORDS_PER_THREAD):
            i = base + r * cuda.blockDim.x
            if i < n:
                k_cache[slot, i] = keys[r]
                v_cache[slot, i] = values[r]
        base += _WORDS_PER_THREAD * cuda.blockDim.x


def numba_supports(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> bool:
    """Whether the numba kernel handles these operands here (else the reference runs)."""
    return (
        runs_here(k)
        and k.dim() == 3
        and k.shape == v.shape
        and k.shape[0] == slot_mapping.shape[0] > 0
        and k_cache.dim() == 4
        and k_cache.shape == v_cache.shape
        and k_cache.shape[2:] == k.shape[1:]
        and k.dtype == v.dtype == k_cache.dtype == v_cache.dtype
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and words_fit(k)
        and words_fit(v)
        and words_fit(k_cache)
        and not slot_mapping.is_floating_point()
    )


def write_kv_numba(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The numba kernel's ``write_kv``."""
    k_rows, v_rows = k.flatten(1), v.flatten(1)  # views when heads are adjacent, else copies
    words_per_row = k_rows.shape[1] * k.element_size() // 8
    threads = pow2_threads(-(-words_per_row // _WORDS_PER_THREAD))
    write_kv_kernel[k.shape[0], threads, stream_for(k)](
        words(k_rows),
        words(v_rows),
        words(k_cache.view(-1, k_rows.shape[1])),
        words(v_cache.view(-1, v_rows.shape[1])),
        integers(slot_mapping),
    )


# --- dispatch -------------------------------------------------------------------------------------


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if k.is_cuda and numba_supports(k, v, k_cache, v_cache, slot_mapping):
        write_kv_numba(k, v, k_cache, v_cache, slot_mapping)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
