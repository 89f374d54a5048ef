"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

Statistics are computed in fp32 whatever the activation dtype: a bf16 sum of squares over a few
thousand channels loses enough precision to shift logits visibly.

The numba kernel gives each row to one block, whose threads hold the row in registers between
the sum of squares and the normalization: device memory sees each input byte once and each
output byte once, where the torch reference runs five kernels with fp32 temporaries.

The fused add also takes the sub-layer's output as split-K partial products (``[S, T, H]``,
``yaie.kernels.linear.linear_partials``): it adds all ``S`` of them into the residual, so the
split GEMM's reduction costs no launch of its own.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from yaie.kernels._numba import (
    BF16,
    F16,
    F32,
    SIMULATOR,
    cuda,
    flat_words,
    pack,
    per_word,
    pow2_threads,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
)
from yaie.kernels.elementwise_cpu import rms_norm_cpu, rms_norm_cpu_supported

_MAX_THREADS = 1024
_MAX_WARPS = _MAX_THREADS // 32
_WORDS_PER_THREAD = 8
"""Register-resident words per thread: rows up to 8 * 1024 words (32K bf16, 16K fp32 values).
A Llama-3-8B row (4,096 bf16 values, 1,024 words) takes a block of 128 threads: small blocks,
many resident per multiprocessor, each with its whole row's loads in flight at once."""

MAX_PARTIALS = 4
"""Most split-K partial products the fused add takes (``yaie.kernels.linear`` splits 2 or 4 ways)."""


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, in fp32, returned in ``x``'s dtype."""
    x32 = x.float()
    inv_rms = x32.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return (x32 * inv_rms).mul_(weight).to(x.dtype)


def fused_add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place, then return ``rms_norm(residual)``.

    The decoder keeps one residual stream per step and folds each sub-layer's output into it
    here, so the stream is updated without allocating a new tensor per layer. ``x`` is
    ``residual``-shaped, or ``[S, *residual.shape]`` partial sums (``is_partials``), added in
    fp32 and rounded once.
    """
    if is_partials(x, residual):
        x = x.sum(0, dtype=torch.promote_types(x.dtype, torch.float32))
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps)


def is_partials(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether ``x`` is split-K partial sums of a ``residual``-shaped tensor (a leading dim)."""
    return x.dim() == residual.dim() + 1 and x.shape[1:] == residual.shape


# --- numba.cuda kernel ----------------------------------------------------------------------------


if SIMULATOR:

    @cuda.jit(device=True)
    def _block_sum(value):
        """Sum ``value`` over the block (a power-of-two size, at least one warp); every thread
        gets the total. The simulator has no warp shuffles: this twin reduces by a tree in
        shared memory, halving the live threads each round."""
        scratch = cuda.shared.array(_MAX_THREADS, np.float32)
        tid = cuda.threadIdx.x
        scratch[tid] = value
        cuda.syncthreads()
        stride = cuda.blockDim.x // 2
        while stride > 0:
            if tid < stride:
                scratch[tid] += scratch[tid + stride]
            cuda.syncthreads()
            stride //= 2
        return scratch[0]

else:

    @cuda.jit(device=True)
    def _block_sum(value):
        """Sum ``value`` over the block (a power-of-two size, at least one warp); every thread
        gets the total. Five xor-shuffle steps sum each warp in registers; lane 0 of every warp
        posts its warp's sum to shared memory, and after the block's one barrier each thread
        adds up the (at most 32) warp sums itself, a broadcast read."""
        scratch = cuda.shared.array(_MAX_WARPS, np.float32)
        width = 16
        while width > 0:
            value += cuda.shfl_xor_sync(0xFFFFFFFF, value, width)
            width //= 2
        tid = cuda.threadIdx.x
        if tid % 32 == 0:
            scratch[tid // 32] = value
        cuda.syncthreads()
        total = np.float32(0.0)
        for w in range(cuda.blockDim.x // 32):
            total += scratch[w]
        return total


@cuda.jit(device=True)
def _rms_norm_row(x, x_strides, residual, res_strides, weight, out, eps, fused, kind,
                  part_offsets):
    """One block normalizes one row of ``n_words = weight.size`` 8-byte words.

    Operands are flat word arrays; block ``(a, b)`` of the ``[A, B]`` grid owns the row of
    ``x`` at word ``a * x_strides[0] + b * x_strides[1]`` (2-D hidden states are a ``[T, 1]``
    grid, q/k heads of a fused QKV output a ``[tokens, heads]`` one), likewise of
    ``residual``, and row ``a * B + b`` of the contiguous ``out``. Thread
    ``t`` owns words ``t + k * blockDim`` for ``k < _WORDS_PER_THREAD``, so each load
    instruction is one coalesced sweep of 8 bytes per thread across the warp. A thread first
    loads all its words of ``x`` (and ``residual``) and of ``weight`` into registers
    (fixed-size local arrays whose loops unroll), so every load is in flight at once and the
    row is read from memory once. Only then does it store: numba cannot tell that outputs
    don't alias inputs, so a store placed between two loads would make the second wait for
    the first's round trip.

    The kernel runs short of instruction issue slots before it runs short of bandwidth (a
    Llama-3-8B row is 16 KB of traffic for 128 threads), so the bookkeeping is lean: flat
    arrays and unsigned indices (numba adds a negative-index fix-up to every signed one, and
    a stride multiply to every index of a strided array), and unconditional loads from an
    index clamped into the row, which need no branches; only the sum and the stores are
    masked to the thread's own words.

    Fused variant: ``x + residual`` is rounded to the activation dtype and stored back into
    ``residual`` (the reference's in-place add), and that rounded sum is what gets normalized.
    ``x`` may be several partial sums: ``part_offsets`` holds each one's word offset from the
    first (``(0,)`` for a plain ``x``). It is a tuple so that its length is part of the
    kernel's type: numba compiles one specialisation per count, whose loops over the partials
    unroll into straight-line loads issued with the rest. All are added before the rounding.
    Squares accumulate in fp32; a block reduction gives every thread ``1 / rms``; the output is
    ``x * inv_rms * weight``, rounded once.
    """
    n_words = np.uint64(weight.shape[0])
    a = np.uint64(cuda.blockIdx.x)
    b = np.uint64(cuda.blockIdx.y)
    x0 = a * np.uint64(x_strides[0]) + b * np.uint64(x_strides[1])
    res0 = a * np.uint64(res_strides[0]) + b * np.uint64(res_strides[1])
    out0 = (a * np.uint64(cuda.gridDim.y) + b) * n_words
    tid = np.uint64(cuda.threadIdx.x)
    step = np.uint64(cuda.blockDim.x)
    last = n_words - np.uint64(1)
    vec = per_word(kind)

    row = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    more = cuda.local.array((MAX_PARTIALS, _WORDS_PER_THREAD), np.uint64)  # partials 1..
    other = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    w = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for k in range(_WORDS_PER_THREAD):
        i = min(tid + np.uint64(k) * step, last)
        row[k] = np.uint64(x[x0 + i])
        for p in range(1, len(part_offsets)):
            more[p, k] = np.uint64(x[x0 + part_offsets[p] + i])
        if fused:
            other[k] = np.uint64(residual[res0 + i])
        w[k] = np.uint64(weight[i])

    acc = np.float32(0.0)
    for k in range(_WORDS_PER_THREAD):
        if fused:
            summed = np.uint64(0)
            for j in range(vec):
                value = unpack(row[k], j, kind) + unpack(other[k], j, kind)
                for p in range(1, len(part_offsets)):
                    value += unpack(more[p, k], j, kind)
                summed |= pack(value, j, kind)
            row[k] = summed
        squares = np.float32(0.0)
        for j in range(vec):
            v = unpack(row[k], j, kind)
            squares += v * v
        if tid + np.uint64(k) * step < n_words:
            acc += squares
    total = _block_sum(acc)
    inv_rms = np.float32(1.0) / math.sqrt(total / np.float32(n_words * vec) + eps)

    for k in range(_WORDS_PER_THREAD):
        i = tid + np.uint64(k) * step
        if i < n_words:
            if fused:
                residual[res0 + i] = row[k]
            normed = np.uint64(0)
            for j in range(vec):
                normed |= pack(unpack(row[k], j, kind) * inv_rms * unpack(w[k], j, kind), j, kind)
            out[out0 + i] = normed


# One kernel per dtype and variant: ``kind`` and ``fused`` must be compile-time constants (see
# yaie.kernels._numba). Arguments: x, residual, weight, out as flat 8-byte-word arrays, row
# strides (in words) of x and residual, eps float32, and for the fused add the word offsets
# of the partial sums in x (a tuple, one specialisation per count); the grid is the [A, B]
# grid of rows.


@cuda.jit(cache=True)
def rms_norm_f32(x, x_strides, weight, out, eps):
    _rms_norm_row(x, x_strides, x, x_strides, weight, out, eps, False, F32, (np.uint64(0),))


@cuda.jit(cache=True)
def rms_norm_bf16(x, x_strides, weight, out, eps):
    _rms_norm_row(x, x_strides, x, x_strides, weight, out, eps, False, BF16, (np.uint64(0),))


@cuda.jit(cache=True)
def rms_norm_f16(x, x_strides, weight, out, eps):
    _rms_norm_row(x, x_strides, x, x_strides, weight, out, eps, False, F16, (np.uint64(0),))


@cuda.jit(cache=True)
def fused_add_rms_norm_f32(x, x_strides, part_offsets, residual, res_strides, weight, out,
                           eps):
    _rms_norm_row(x, x_strides, residual, res_strides, weight, out, eps, True, F32,
                  part_offsets)


@cuda.jit(cache=True)
def fused_add_rms_norm_bf16(x, x_strides, part_offsets, residual, res_strides, weight, out,
                            eps):
    _rms_norm_row(x, x_strides, residual, res_strides, weight, out, eps, True, BF16,
                  part_offsets)


@cuda.jit(cache=True)
def fused_add_rms_norm_f16(x, x_strides, part_offsets, residual, res_strides, weight, out,
                           eps):
    _rms_norm_row(x, x_strides, residual, res_strides, weight, out, eps, True, F16,
                  part_offsets)


RMS_NORM_KERNELS = {
    torch.float32: rms_norm_f32,
    torch.bfloat16: rms_norm_bf16,
    torch.float16: rms_norm_f16,
}
FUSED_ADD_RMS_NORM_KERNELS = {
    torch.float32: fused_add_rms_norm_f32,
    torch.bfloat16: fused_add_rms_norm_bf16,
    torch.float16: fused_add_rms_norm_f16,
}


def _rows_3d(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a ``[A, B, H]`` view: 2-D hidden states become ``[T, 1, H]``."""
    return t.view(1, 1, -1) if t.dim() == 1 else t.unsqueeze(1) if t.dim() == 2 else t


def _rows(t: torch.Tensor) -> tuple[object, tuple[int, ...]]:
    """``t`` as (flat words, word strides of its ``[A, B]`` grid of rows): hidden states
    ``[T, H]`` are a ``[T, 1]`` grid, q/k heads ``[T, heads, D]`` a ``[T, heads]`` one with
    the fused QKV output's strides."""
    return flat_words(_rows_3d(t))


def _threads(x: torch.Tensor) -> int:
    """The fewest threads (a power of two) that hold the row in ``_WORDS_PER_THREAD`` each."""
    n_words = x.shape[-1] * x.element_size() // 8
    return pow2_threads(-(-n_words // _WORDS_PER_THREAD), hi=_MAX_THREADS)


def numba_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the numba kernel handles these operands here (else the reference runs).

    Rows must be word-aligned (``words_fit``), fit in the block's registers, and be at most 3-D
    (hidden states ``[T, H]``, or q/k heads ``[T, heads, D]`` as strided views), with a weight
    of the same dtype.
    """
    return (
        runs_here(x)
        and 1 <= x.dim() <= 3
        and x.shape[-1] * x.element_size() <= 8 * _WORDS_PER_THREAD * _MAX_THREADS
        and x.numel() > 0
        and weight.dtype == x.dtype
        and weight.shape == x.shape[-1:]
        and words_fit(x)
        and words_fit(weight)
    )


def _launch(kernel, x: torch.Tensor, *operands) -> None:
    """One block per row: the grid is ``x``'s ``[A, B]`` grid of rows (no index division)."""
    x3 = _rows_3d(x)
    kernel[(x3.shape[0], x3.shape[1]), _threads(x), stream_for(x)](*operands)


def rms_norm_numba(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The numba kernel's ``rms_norm``; ``out`` (contiguous, ``x``'s shape) may be given."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    flat, strides = _rows(x)
    _launch(RMS_NORM_KERNELS[x.dtype], x, flat, strides, words(weight), words(out.view(-1)),
            np.float32(eps))
    return out


def fused_add_rms_norm_numba(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numba kernel's ``fused_add_rms_norm``: ``residual += x`` in place (``x`` may be
    partial sums, ``is_partials``), returns the norm."""
    out = torch.empty(residual.shape, dtype=x.dtype, device=x.device) if out is None else out
    if is_partials(x, residual):  # one flat span over all [S, T, H] partials
        flat, (part_stride, row_stride) = flat_words(x)
        strides = (row_stride, row_stride)
        offsets = tuple(np.uint64(p * part_stride) for p in range(x.shape[0]))
    else:
        (flat, strides), offsets = _rows(x), (np.uint64(0),)
    res_flat, res_strides = _rows(residual)
    _launch(FUSED_ADD_RMS_NORM_KERNELS[x.dtype], residual, flat, strides, offsets, res_flat,
            res_strides, words(weight), words(out.view(-1)), np.float32(eps))
    return out


# --- dispatch -------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, the CPU kernel
    (``yaie.kernels.elementwise_cpu``) on float32 CPU tensors it supports, else the reference."""
    if x.is_cuda and numba_supports(x, weight):
        return rms_norm_numba(x, weight, eps)
    if rms_norm_cpu_supported(x, weight):
        return rms_norm_cpu(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, the CPU kernel
    (``yaie.kernels.elementwise_cpu``) on float32 CPU tensors it supports, else the reference."""
    if (
        x.is_cuda
        and numba_supports(x, weight)
        and (residual.shape == x.shape
             or is_partials(x, residual) and x.shape[0] <= MAX_PARTIALS and residual.dim() == 2)
        and residual.dtype == x.dtype
        and words_fit(residual)
    ):
        return fused_add_rms_norm_numba(x, residual, weight, eps)
    if rms_norm_cpu_supported(x, weight, residual):
        return rms_norm_cpu(x, weight, eps, residual)
    return fused_add_rms_norm_reference(x, residual, weight, eps)
