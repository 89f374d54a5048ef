"""RMSNorm, alone and fused with the residual add that precedes it in every decoder layer.

Statistics are computed in fp32 whatever the activation dtype: a bf16 sum of squares over a few
thousand channels loses enough precision to shift logits visibly.

The numba kernel gives each row to one block, whose threads hold the row in registers between
the sum of squares and the normalization: device memory sees each input byte once and each
output byte once, where the torch reference runs five kernels with fp32 temporaries.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from yaie.kernels._numba import (
    BF16,
    F16,
    F32,
    cuda,
    pack,
    per_word,
    pow2_threads,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
)

_MAX_THREADS = 1024
_WORDS_PER_THREAD = 4
"""Register-resident words per thread: rows up to 4 * 1024 words (16K bf16, 8K fp32 values)."""


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
    here, so the stream is updated without allocating a new tensor per layer.
    """
    residual.add_(x)
    return rms_norm_reference(residual, weight, eps)


# --- numba.cuda kernel ----------------------------------------------------------------------------


@cuda.jit(device=True)
def _block_sum(value, scratch):
    """Sum ``value`` over the block (a power-of-two size); every thread gets the total.

    A shared-memory tree: each round, the lower half of the live threads adds the upper half's
    partials, ``log2(blockDim)`` rounds in all. Warp shuffles would save the last five barriers,
    but numba's CUDA simulator, which CI runs these kernels in, has none; one reduction per row
    costs a few hundred cycles against the microseconds the row's bytes take.
    """
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


@cuda.jit(device=True)
def _rms_norm_row(x, residual, weight, out, eps, fused, kind):
    """One block normalizes one row ``x[a, b, :]`` (rows of ``[A, B, words]`` views).

    Block ``r`` owns row ``(r // B, r % B)``; thread ``t`` owns words ``t + k * blockDim`` for
    ``k < _WORDS_PER_THREAD``, so each load instruction is one coalesced sweep of 8 bytes per
    thread across the warp. A thread first loads all its words of ``x`` (and ``residual``) and
    of ``weight`` into registers (fixed-size local arrays whose loops unroll), so every load is
    in flight at once and the row is read from memory once. Only then does it store: numba
    cannot tell that outputs don't alias inputs, so a store placed between two loads would
    make the second wait for the first's round trip.

    Fused variant: ``x + residual`` is rounded to the activation dtype and stored back into
    ``residual`` (the reference's in-place add), and that rounded sum is what gets normalized.
    Squares accumulate in fp32; a block reduction gives every thread ``1 / rms``; the output is
    ``x * inv_rms * weight``, rounded once.
    """
    rows_b = x.shape[1]
    a = cuda.blockIdx.x // rows_b
    b = cuda.blockIdx.x - a * rows_b
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    n_words = x.shape[2]
    vec = per_word(kind)

    row = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    other = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    w = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for k in range(_WORDS_PER_THREAD):
        i = tid + k * step
        if i < n_words:
            row[k] = np.uint64(x[a, b, i])
            if fused:
                other[k] = np.uint64(residual[a, b, i])
            w[k] = np.uint64(weight[i])

    acc = np.float32(0.0)
    for k in range(_WORDS_PER_THREAD):
        i = tid + k * step
        if i < n_words:
            if fused:
                summed = np.uint64(0)
                for j in range(vec):
                    summed |= pack(unpack(row[k], j, kind) + unpack(other[k], j, kind), j, kind)
                residual[a, b, i] = summed
                row[k] = summed
            for j in range(vec):
                v = unpack(row[k], j, kind)
                acc += v * v
    scratch = cuda.shared.array(_MAX_THREADS, np.float32)
    total = _block_sum(acc, scratch)
    inv_rms = np.float32(1.0) / math.sqrt(total / np.float32(n_words * vec) + eps)

    for k in range(_WORDS_PER_THREAD):
        i = tid + k * step
        if i < n_words:
            normed = np.uint64(0)
            for j in range(vec):
                normed |= pack(unpack(row[k], j, kind) * inv_rms * unpack(w[k], j, kind), j, kind)
            out[a, b, i] = normed


# One kernel per dtype and variant: ``kind`` and ``fused`` must be compile-time constants
# (see yaie.kernels._numba). Arguments are 8-byte-word views: x, residual, out [A, B, W];
# weight [W]; eps float32.


@cuda.jit(cache=True)
def rms_norm_f32(x, weight, out, eps):
    _rms_norm_row(x, x, weight, out, eps, False, F32)


@cuda.jit(cache=True)
def rms_norm_bf16(x, weight, out, eps):
    _rms_norm_row(x, x, weight, out, eps, False, BF16)


@cuda.jit(cache=True)
def rms_norm_f16(x, weight, out, eps):
    _rms_norm_row(x, x, weight, out, eps, False, F16)


@cuda.jit(cache=True)
def fused_add_rms_norm_f32(x, residual, weight, out, eps):
    _rms_norm_row(x, residual, weight, out, eps, True, F32)


@cuda.jit(cache=True)
def fused_add_rms_norm_bf16(x, residual, weight, out, eps):
    _rms_norm_row(x, residual, weight, out, eps, True, BF16)


@cuda.jit(cache=True)
def fused_add_rms_norm_f16(x, residual, weight, out, eps):
    _rms_norm_row(x, residual, weight, out, eps, True, F16)


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


def rms_norm_numba(
    x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The numba kernel's ``rms_norm``; ``out`` (contiguous, ``x``'s shape) may be given."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    x3 = _rows_3d(x)
    RMS_NORM_KERNELS[x.dtype][x3.shape[0] * x3.shape[1], _threads(x), stream_for(x)](
        words(x3), words(weight), words(_rows_3d(out)), np.float32(eps)
    )
    return out


def fused_add_rms_norm_numba(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numba kernel's ``fused_add_rms_norm``: ``residual += x`` in place, returns the norm."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    x3 = _rows_3d(x)
    FUSED_ADD_RMS_NORM_KERNELS[x.dtype][x3.shape[0] * x3.shape[1], _threads(x), stream_for(x)](
        words(x3),
        words(_rows_3d(residual)),
        words(weight),
        words(_rows_3d(out)),
        np.float32(eps),
    )
    return out


# --- dispatch -------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if x.is_cuda and numba_supports(x, weight):
        return rms_norm_numba(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if (
        x.is_cuda
        and numba_supports(x, weight)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and words_fit(residual)
    ):
        return fused_add_rms_norm_numba(x, residual, weight, eps)
    return fused_add_rms_norm_reference(x, residual, weight, eps)
