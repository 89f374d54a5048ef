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
    flat_words,
    integers,
    load_word,
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
_MAX_THREADS = 256


@cuda.jit(cache=True)
def write_kv_kernel(k, k_stride, v, v_stride, k_cache, v_cache, slot_mapping):
    """Block ``(t, y)`` stores words ``y * span .. (y + 1) * span`` of token ``t``'s K and V
    rows (``span = _WORDS_PER_THREAD * blockDim``; one block covers a Llama-3-8B row of 8 KV
    heads x 128 bf16); padded tokens (slot < 0) store nothing.

    k, v: flat word arrays, token ``t``'s row (its KV heads, flattened) at word
    ``t * k_stride`` (row-strided slices of the QKV output qualify); caches ``[slots, row]``
    words. Thread ``i`` owns words ``i + r * blockDim`` of the span: a warp reads consecutive
    words of the token's row and writes consecutive words of its slot's row. Every load, the
    slot's and the rows', is issued before any of them is used (``load_word``): the slot
    decides only whether to store, and waiting for it before loading the rows would put a
    second round trip to memory on a kernel that is little more than one.
    """
    t = np.uint64(cuda.blockIdx.x)
    slot = slot_mapping[t]
    n = np.uint64(k_cache.shape[1])
    tid = np.uint64(cuda.threadIdx.x)
    step = np.uint64(cuda.blockDim.x)
    first = np.uint64(cuda.blockIdx.y) * step * np.uint64(_WORDS_PER_THREAD) + tid
    last = n - np.uint64(1)
    k_row = t * np.uint64(k_stride)
    v_row = t * np.uint64(v_stride)
    keys = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    values = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for r in range(_WORDS_PER_THREAD):
        i = min(first + np.uint64(r) * step, last)
        keys[r] = load_word(k, k_row + i)
        values[r] = load_word(v, v_row + i)
    if slot >= 0:
        row = np.uint64(slot)
        for r in range(_WORDS_PER_THREAD):
            i = first + np.uint64(r) * step
            if i < n:
                k_cache[row, i] = keys[r]
                v_cache[row, i] = values[r]


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
    k_flat, (k_stride,) = flat_words(k_rows)
    v_flat, (v_stride,) = flat_words(v_rows)
    words_per_row = k_rows.shape[1] * k.element_size() // 8
    threads = pow2_threads(-(-words_per_row // _WORDS_PER_THREAD), hi=_MAX_THREADS)
    spans = -(-words_per_row // (threads * _WORDS_PER_THREAD))
    write_kv_kernel[(k.shape[0], spans), threads, stream_for(k)](
        k_flat,
        k_stride,
        v_flat,
        v_stride,
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
