"""LayerNorm (with bias), alone and fused with the residual add before it: GPT-2's norm.

Where RMSNorm only scales by ``1 / rms(x)``, LayerNorm first subtracts the row's mean and then
scales by ``1 / std(x)`` and adds a bias. Statistics are computed in fp32 whatever the
activation dtype, as for RMSNorm.

The numba kernel keeps RMSNorm's layout (one block per row, the row held in registers, see
``yaie.kernels.rms_norm``) and its launch shape. It needs two statistics instead of one, and
gets both from a single block reduction: each thread summarises its values as ``(count, mean,
sum of squared deviations)`` and the tree merges those triples (Chan et al.'s parallel variance
update). That avoids ``E[x²] - E[x]²``, which cancels catastrophically in fp32 on GPT-2's
residual stream, whose few huge channels put the mean far from zero relative to the spread.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from yaie.kernels._numba import (
    BF16,
    F16,
    F32,
    cuda,
    pack,
    per_word,
    stream_for,
    unpack,
    words,
    words_fit,
)
from yaie.kernels.rms_norm import _MAX_THREADS, _WORDS_PER_THREAD, _rows_3d, _threads
from yaie.kernels.rms_norm import numba_supports as _rms_norm_supports


def layer_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``(x - mean) / std * weight + bias`` over the last dim in fp32, returned in ``x``'s dtype."""
    out = F.layer_norm(x.float(), x.shape[-1:], weight.float(), bias.float(), eps)
    return out.to(x.dtype)


def fused_add_layer_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """``residual += x`` in place, then return ``layer_norm(residual)``, as ``fused_add_rms_norm``."""
    residual.add_(x)
    return layer_norm_reference(residual, weight, bias, eps)


# --- numba.cuda kernel ----------------------------------------------------------------------------


@cuda.jit(device=True)
def _block_mean_var(count, mean, m2, counts, means, m2s):
    """Merge every thread's ``(count, mean, m2)`` over the block; every thread gets the row's
    ``(mean, variance)``.

    A shared-memory tree like RMSNorm's sum: each round, the lower half of the live threads
    folds in the upper half's triple. Merging ``a`` and ``b`` moves the mean by ``delta *
    n_b / n`` and adds ``m2_b`` plus ``delta² * n_a * n_b / n`` to ``m2`` (``delta`` being the
    difference of their means). A thread that owns no values (``count`` 0) merges as a no-op.
    """
    tid = cuda.threadIdx.x
    counts[tid] = count
    means[tid] = mean
    m2s[tid] = m2
    cuda.syncthreads()
    stride = cuda.blockDim.x // 2
    while stride > 0:
        if tid < stride and counts[tid + stride] > 0:
            n_a, n_b = counts[tid], counts[tid + stride]
            n = n_a + n_b
            delta = means[tid + stride] - means[tid]
            share = n_b / n
            means[tid] += delta * share
            m2s[tid] += m2s[tid + stride] + delta * delta * n_a * share
            counts[tid] = n
        cuda.syncthreads()
        stride //= 2
    return means[0], m2s[0] / counts[0]


@cuda.jit(device=True)
def _layer_norm_row(x, residual, weight, bias, out, eps, fused, kind):
    """One block normalizes one row ``x[a, b, :]`` (rows of ``[A, B, words]`` views).

    Loads as in ``rms_norm._rms_norm_row``: all of a thread's words of ``x`` (and ``residual``),
    ``weight`` and ``bias`` are in flight before anything is stored. The fused variant stores the
    rounded ``x + residual`` into ``residual`` and normalizes that. Each thread then takes the
    mean and squared deviations of its own values (a second pass over registers, not memory),
    the block merges them, and the output is ``(x - mean) * inv_std * weight + bias``, rounded once.
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
    bb = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for k in range(_WORDS_PER_THREAD):
        i = tid + k * step
        if i < n_words:
            row[k] = np.uint64(x[a, b, i])
            if fused:
                other[k] = np.uint64(residual[a, b, i])
            w[k] = np.uint64(weight[i])
            bb[k] = np.uint64(bias[i])

    count = np.float32(0.0)
    total = np.float32(0.0)
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
                total += unpack(row[k], j, kind)
            count += np.float32(vec)
    own_mean = total / count if count > 0 else np.float32(0.0)
    m2 = np.float32(0.0)
    for k in range(_WORDS_PER_THREAD):
        if tid + k * step < n_words:
            for j in range(vec):
                d = unpack(row[k], j, kind) - own_mean
                m2 += d * d

    counts = cuda.shared.array(_MAX_THREADS, np.float32)
    means = cuda.shared.array(_MAX_THREADS, np.float32)
    m2s = cuda.shared.array(_MAX_THREADS, np.float32)
    mean, var = _block_mean_var(count, own_mean, m2, counts, means, m2s)
    inv_std = np.float32(1.0) / math.sqrt(var + eps)

    for k in range(_WORDS_PER_THREAD):
        i = tid + k * step
        if i < n_words:
            normed = np.uint64(0)
            for j in range(vec):
                v = (unpack(row[k], j, kind) - mean) * inv_std
                normed |= pack(v * unpack(w[k], j, kind) + unpack(bb[k], j, kind), j, kind)
            out[a, b, i] = normed


# One kernel per dtype and variant (``kind`` and ``fused`` are compile-time constants). Arguments
# are 8-byte-word views: x, residual, out [A, B, W]; weight, bias [W]; eps float32.


@cuda.jit(cache=True)
def layer_norm_f32(x, weight, bias, out, eps):
    _layer_norm_row(x, x, weight, bias, out, eps, False, F32)


@cuda.jit(cache=True)
def layer_norm_bf16(x, weight, bias, out, eps):
    _layer_norm_row(x, x, weight, bias, out, eps, False, BF16)


@cuda.jit(cache=True)
def layer_norm_f16(x, weight, bias, out, eps):
    _layer_norm_row(x, x, weight, bias, out, eps, False, F16)


@cuda.jit(cache=True)
def fused_add_layer_norm_f32(x, residual, weight, bias, out, eps):
    _layer_norm_row(x, residual, weight, bias, out, eps, True, F32)


@cuda.jit(cache=True)
def fused_add_layer_norm_bf16(x, residual, weight, bias, out, eps):
    _layer_norm_row(x, residual, weight, bias, out, eps, True, BF16)


@cuda.jit(cache=True)
def fused_add_layer_norm_f16(x, residual, weight, bias, out, eps):
    _layer_norm_row(x, residual, weight, bias, out, eps, True, F16)


LAYER_NORM_KERNELS = {
    torch.float32: layer_norm_f32,
    torch.bfloat16: layer_norm_bf16,
    torch.float16: layer_norm_f16,
}
FUSED_ADD_LAYER_NORM_KERNELS = {
    torch.float32: fused_add_layer_norm_f32,
    torch.bfloat16: fused_add_layer_norm_bf16,
    torch.float16: fused_add_layer_norm_f16,
}


def numba_supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    """RMSNorm's conditions (``rms_norm.numba_supports``), and a bias shaped like the weight."""
    return (
        _rms_norm_supports(x, weight)
        and bias.dtype == x.dtype
        and bias.shape == weight.shape
        and words_fit(bias)
    )


def layer_norm_numba(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numba kernel's ``layer_norm``; ``out`` (contiguous, ``x``'s shape) may be given."""
    return _launch(LAYER_NORM_KERNELS, x, [weight, bias], eps, out)


def fused_add_layer_norm_numba(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The numba kernel's ``fused_add_layer_norm``: ``residual += x`` in place, returns the norm."""
    return _launch(FUSED_ADD_LAYER_NORM_KERNELS, x, [_rows_3d(residual), weight, bias], eps, out)


def _launch(
    kernels: dict, x: torch.Tensor, operands: list[torch.Tensor], eps: float,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """One block per row of ``x``: the kernel takes ``x, *operands, out, eps`` as word views."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    x3 = _rows_3d(x)
    kernels[x.dtype][x3.shape[0] * x3.shape[1], _threads(x), stream_for(x)](
        words(x3), *(words(t) for t in operands), words(_rows_3d(out)), np.float32(eps)
    )
    return out


# --- dispatch -------------------------------------------------------------------------------------


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if x.is_cuda and numba_supports(x, weight, bias):
        return layer_norm_numba(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def fused_add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if (
        x.is_cuda
        and numba_supports(x, weight, bias)
        and residual.shape == x.shape
        and residual.dtype == x.dtype
        and words_fit(residual)
    ):
        return fused_add_layer_norm_numba(x, residual, weight, bias, eps)
    return fused_add_layer_norm_reference(x, residual, weight, bias, eps)
