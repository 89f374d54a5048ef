"""Greedy sampling's argmax: the index of each row's largest logit, split across many blocks.

A greedy decode step ends with ``argmax`` over every request's row of logits (128K values for
Llama 3, 152K for Qwen3). torch's ``argmax`` (its generic ``reduce_kernel``) took 26.3 us for
one 128K row on an H100, as long as three decoder layers' norms and SiLU-and-mul together, for
half a megabyte of reading: a row that short leaves most of the GPU idle unless it is cut
into many blocks' worth.

**Who owns what.** Block ``(row, chunk)`` owns ``CHUNK`` consecutive values of a row: each of
its ``THREADS`` threads loads ``PER_THREAD`` of them (indices clamped to the row, so all loads
are unconditional and in flight at once), keeps the best, and the block reduces its threads'
bests (warp shuffles, then one value per warp through shared memory). A row of 128K values is
63 blocks, each one round trip to memory.

**Merging chunks.** As in the split-KV decode kernel (``yaie.kernels.decode_attention``), the
merge runs in the same launch: each block stores its ``(value, index)``, fences, and counts its
arrival on the row's counter; the block that arrives last resets the counter and reduces the
row's chunk results. A second kernel would cost another launch.

**Ties and NaN, as torch.** The larger value wins; equal values go to the lower index; NaN
beats every number (torch's ``argmax`` propagates NaN), the first NaN winning. Greedy decoding
must pick exactly the token the torch path picks, or the two paths' texts diverge.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from yaie.kernels._numba import (
    BF16,
    F16,
    F32,
    KINDS,
    SIMULATOR,
    array_view,
    arrival_counters,
    cuda,
    elements,
    load_element,
    runs_here,
    stream_for,
)

THREADS = 256
PER_THREAD = 8
CHUNK = THREADS * PER_THREAD
"""Values a block reads: one round of ``PER_THREAD`` loads a thread."""
_WARPS = THREADS // 32


def argmax_reference(logits: torch.Tensor) -> torch.Tensor:
    """torch's ``argmax`` over the last dim (int64)."""
    return logits.argmax(dim=-1)


@cuda.jit(device=True)
def _beats(v, i, w, j):
    """Whether value ``v`` at index ``i`` wins over ``w`` at ``j``: the larger value, NaN above
    every number, ties (and NaN against NaN) to the lower index."""
    if math.isnan(v):
        return not math.isnan(w) or i < j
    if math.isnan(w):
        return False
    return v > w or (v == w and i < j)


if SIMULATOR:

    @cuda.jit(device=True)
    def _block_best(value, index):
        """The block's winning ``(value, index)``, for every thread. The simulator has no warp
        shuffles: a tree in shared memory, halving the live threads each round."""
        values = cuda.shared.array(THREADS, np.float32)
        indices = cuda.shared.array(THREADS, np.int64)
        tid = cuda.threadIdx.x
        values[tid] = value
        indices[tid] = index
        cuda.syncthreads()
        stride = THREADS // 2
        while stride > 0:
            if tid < stride and _beats(values[tid + stride], indices[tid + stride],
                                       values[tid], indices[tid]):
                values[tid] = values[tid + stride]
                indices[tid] = indices[tid + stride]
            cuda.syncthreads()
            stride //= 2
        return values[0], indices[0]

else:

    @cuda.jit(device=True)
    def _block_best(value, index):
        """The block's winning ``(value, index)``, for every thread: five xor-shuffle steps
        give each warp its best in registers; lane 0 of each warp posts it to shared memory,
        and after one barrier every thread reduces the (eight) warp results itself."""
        values = cuda.shared.array(_WARPS, np.float32)
        indices = cuda.shared.array(_WARPS, np.int64)
        width = 16
        while width > 0:
            other_value = cuda.shfl_xor_sync(0xFFFFFFFF, value, width)
            other_index = cuda.shfl_xor_sync(0xFFFFFFFF, index, width)
            if _beats(other_value, other_index, value, index):
                value, index = other_value, other_index
            width //= 2
        tid = cuda.threadIdx.x
        if tid % 32 == 0:
            values[tid // 32] = value
            indices[tid // 32] = index
        cuda.syncthreads()
        value, index = values[0], indices[0]
        for w in range(1, _WARPS):
            if _beats(values[w], indices[w], value, index):
                value, index = values[w], indices[w]
        return value, index


@cuda.jit(device=True)
def _argmax_chunk(x, out, chunk_values, chunk_indices, arrivals, kind):
    """Block ``(row, chunk)``: its chunk's best, and the row's answer if it arrives last."""
    row = cuda.blockIdx.x
    chunk = cuda.blockIdx.y
    chunks = cuda.gridDim.y
    tid = cuda.threadIdx.x
    last = x.shape[1] - 1
    loaded = cuda.local.array(PER_THREAD, np.float32)
    for e in range(PER_THREAD):
        loaded[e] = load_element(x[row, min(chunk * CHUNK + e * THREADS + tid, last)], kind)
    value, index = loaded[0], min(chunk * CHUNK + tid, last)
    for e in range(1, PER_THREAD):
        i = min(chunk * CHUNK + e * THREADS + tid, last)
        if _beats(loaded[e], i, value, index):
            value, index = loaded[e], i
    value, index = _block_best(value, index)
    if chunks == 1:
        if tid == 0:
            out[row] = index
        return

    arrived_last = cuda.shared.array(1, np.int32)
    if tid == 0:
        chunk_values[row, chunk] = value
        chunk_indices[row, chunk] = index
    cuda.threadfence()  # this chunk's result is visible before its arrival is counted
    cuda.syncthreads()
    if tid == 0:
        arrived = cuda.atomic.add(arrivals, row, 1) + 1
        arrived_last[0] = 1 if arrived == chunks else 0
        if arrived == chunks:
            arrivals[row] = 0  # ready for the next launch (or graph replay)
    cuda.syncthreads()
    if arrived_last[0] == 0:
        return
    cuda.threadfence()
    value, index = chunk_values[row, 0], chunk_indices[row, 0]
    for c in range(tid, chunks, THREADS):
        if _beats(chunk_values[row, c], chunk_indices[row, c], value, index):
            value, index = chunk_values[row, c], chunk_indices[row, c]
    value, index = _block_best(value, index)
    if tid == 0:
        out[row] = index


@cuda.jit(cache=True)
def argmax_f32(x, out, chunk_values, chunk_indices, arrivals):
    _argmax_chunk(x, out, chunk_values, chunk_indices, arrivals, F32)


@cuda.jit(cache=True)
def argmax_bf16(x, out, chunk_values, chunk_indices, arrivals):
    _argmax_chunk(x, out, chunk_values, chunk_indices, arrivals, BF16)


@cuda.jit(cache=True)
def argmax_f16(x, out, chunk_values, chunk_indices, arrivals):
    _argmax_chunk(x, out, chunk_values, chunk_indices, arrivals, F16)


ARGMAX_KERNELS = {torch.float32: argmax_f32, torch.bfloat16: argmax_bf16, torch.float16: argmax_f16}


def numba_supports(logits: torch.Tensor) -> bool:
    """Rows of logits with a contiguous last dim, in a dtype the kernels read."""
    return (
        runs_here(logits)
        and logits.dim() == 2
        and logits.dtype in KINDS
        and logits.stride(-1) == 1
        and logits.shape[0] > 0
        and logits.shape[1] > 0
    )


_ChunkScratch = tuple[torch.Tensor, torch.Tensor, object, object]
_SCRATCH: dict[torch.device, _ChunkScratch] = {}


def _chunk_scratch(device: torch.device, rows: int, chunks: int) -> tuple[object, object]:
    """Numba views of ``[rows, chunks]`` (at least) buffers for the blocks' ``(value, index)``
    results. A launch reads only what its own blocks wrote, so one pair per device, grown when
    a launch needs more, serves every launch: the sampler runs each step, and allocating and
    converting two tensors a call was host time spent on every one of them."""
    held = _SCRATCH.get(device)
    have = held[0].shape if held else (0, 0)
    if have[0] < rows or have[1] < chunks:
        shape = (max(rows, have[0]), max(chunks, have[1]))
        values = torch.empty(shape, dtype=torch.float32, device=device)
        indices = torch.empty(shape, dtype=torch.int64, device=device)
        held = (values, indices, array_view(values), array_view(indices))
        _SCRATCH[device] = held
    return held[2], held[3]


def argmax_numba(logits: torch.Tensor) -> torch.Tensor:
    """The kernel's argmax of each row of ``logits [rows, vocab]`` (int64, on its device)."""
    rows, vocab = logits.shape
    chunks = -(-vocab // CHUNK)
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    chunk_values, chunk_indices = _chunk_scratch(logits.device, rows, chunks)
    counters = arrival_counters(logits.device, rows)
    ARGMAX_KERNELS[logits.dtype][(rows, chunks), THREADS, stream_for(logits)](
        elements(logits), array_view(out), chunk_values, chunk_indices, array_view(counters),
    )
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The sampler's entry point: the numba kernel on CUDA rows it supports, else torch."""
    if logits.is_cuda and numba_supports(logits):
        return argmax_numba(logits)
    return argmax_reference(logits)
