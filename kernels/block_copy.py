"""Copying whole KV-cache blocks: ``cache[dst[i]] = cache[src[i]]`` (copy-on-write).

When a request must write into a block it shares (a partly filled block forked from a common
prefix), the engine gives it a fresh block and copies the shared one's contents first. A block
is ``block_size * num_kv_heads * head_dim`` contiguous values of each cache tensor, so a copy
is a plain memory copy of that span, done for every layer's K and V cache.

The numba kernel gives block ``(i, y)`` of the grid pair ``i``'s words
``y * blockDim + t, (y + gridDim.y) * blockDim + t, ...``: consecutive threads move consecutive
8-byte words (coalesced, 256 bytes a warp), and one launch covers every pair of a cache tensor.
Pairs must not chain (no ``dst`` also a ``src``): blocks of one launch run in any order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from yaie.kernels._numba import cuda, integers, runs_here, stream_for, words, words_fit

_THREADS = 256
_WORDS_PER_THREAD = 4


def copy_blocks_reference(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """``cache [num_blocks, ...]``: block ``dst[i]`` becomes a copy of block ``src[i]``."""
    cache.index_copy_(0, dst, cache.index_select(0, src))


@cuda.jit(cache=True)
def copy_blocks_kernel(cache, src, dst):
    """``cache``: words ``[num_blocks, words_per_block]``; ``src``/``dst``: int64 block ids."""
    i = cuda.blockIdx.x
    s = src[i]
    d = dst[i]
    step = cuda.blockDim.x * cuda.gridDim.y
    for w in range(cuda.blockIdx.y * cuda.blockDim.x + cuda.threadIdx.x, cache.shape[1], step):
        cache[d, w] = cache[s, w]


def copy_blocks_numba(cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
    """The numba kernel's ``copy_blocks_reference`` (``src``/``dst`` int64 on the cache's device)."""
    if src.numel() == 0:
        return
    flat = cache.view(cache.shape[0], -1)
    per_block = flat.shape[1] * flat.element_size() // 8
    spread = max(1, -(-per_block // (_THREADS * _WORDS_PER_THREAD)))
    copy_blocks_kernel[(src.numel(), spread), _THREADS, stream_for(cache)](
        words(flat), integers(src), integers(dst)
    )


def copy_blocks(caches: Iterable[torch.Tensor], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy blocks ``src[i] -> dst[i]`` in every cache tensor (each ``[num_blocks, ...]``).

    The model's entry point: the numba kernel for contiguous CUDA caches, else the reference.
    """
    for cache in caches:
        flat = cache.view(cache.shape[0], -1) if cache.is_contiguous() else None
        if cache.is_cuda and flat is not None and runs_here(cache) and words_fit(flat):
            copy_blocks_numba(cache, src, dst)
        else:
            copy_blocks_reference(cache, src, dst)
