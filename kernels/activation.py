"""MLP activations: SiLU-and-mul (Llama's gated MLP, on the fused gate/up projection) and
GELU with the tanh approximation (GPT-2's ``gelu_new``).

The numba kernels read their input once and write their output once; the torch reference of
SiLU-and-mul makes two passes and a temporary.
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
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
)
from yaie.kernels.elementwise_cpu import silu_and_mul_cpu, silu_and_mul_cpu_supported


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim: ``[T, 2I] -> [T, I]``.

    The gate and up projections run as one GEMM (one weight read, one launch); this splits its
    output. The result is a fresh contiguous tensor, which the down projection wants.
    """
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def gelu_tanh_reference(x: torch.Tensor) -> torch.Tensor:
    """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x³)))``, elementwise, in a fresh tensor.

    GPT-2 was trained with this approximation of GELU (transformers calls it ``gelu_new``);
    the exact erf form differs by up to ~1e-3, enough to change greedy tokens.
    """
    return F.gelu(x, approximate="tanh")


# --- numba.cuda kernel ----------------------------------------------------------------------------

_THREADS = 128
_WORDS_PER_THREAD = 4


@cuda.jit(device=True)
def _silu_and_mul_tile(x, out, kind):
    """One block computes ``blockDim * _WORDS_PER_THREAD`` consecutive output words of one row.

    Blocks tile each row, rows one after another. Thread ``t`` owns words ``t + k * blockDim``
    of the tile: it loads all its gate words and, ``W`` words further on, all its up words
    (eight 8-byte loads in flight), then computes and stores; each warp instruction touches 32
    consecutive words, and each byte is read or written once.
    """
    n_words = out.shape[1]
    tile = cuda.blockDim.x * _WORDS_PER_THREAD
    tiles_per_row = (n_words + tile - 1) // tile
    row = cuda.blockIdx.x // tiles_per_row
    start = (cuda.blockIdx.x - row * tiles_per_row) * tile + cuda.threadIdx.x
    gate = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    up = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for k in range(_WORDS_PER_THREAD):
        col = start + k * cuda.blockDim.x
        if col < n_words:
            gate[k] = np.uint64(x[row, col])
            up[k] = np.uint64(x[row, col + n_words])
    for k in range(_WORDS_PER_THREAD):
        col = start + k * cuda.blockDim.x
        if col < n_words:
            result = np.uint64(0)
            for j in range(per_word(kind)):
                g = unpack(gate[k], j, kind)
                silu = g / (np.float32(1.0) + math.exp(-g))
                result |= pack(silu * unpack(up[k], j, kind), j, kind)
            out[row, col] = result


# One kernel per dtype (``kind`` must be a compile-time constant; see yaie.kernels._numba).
# Arguments: x [T, 2W] and out [T, W] as 8-byte words. fastmath: ``exp`` and the division use
# the hardware's approximate instructions (within 2 ulp of fp32) instead of IEEE sequences that
# cost more instructions per byte than the memory system leaves room for; the result is rounded
# to the activation dtype anyway.


@cuda.jit(cache=True, fastmath=True)
def silu_and_mul_f32(x, out):
    _silu_and_mul_tile(x, out, F32)


@cuda.jit(cache=True, fastmath=True)
def silu_and_mul_bf16(x, out):
    _silu_and_mul_tile(x, out, BF16)


@cuda.jit(cache=True, fastmath=True)
def silu_and_mul_f16(x, out):
    _silu_and_mul_tile(x, out, F16)


SILU_AND_MUL_KERNELS = {
    torch.float32: silu_and_mul_f32,
    torch.bfloat16: silu_and_mul_bf16,
    torch.float16: silu_and_mul_f16,
}


def numba_supports(x: torch.Tensor) -> bool:
    """Whether the numba kernel handles ``x`` here: each half a whole number of words."""
    return (
        runs_here(x)
        and x.dim() >= 1
        and x.numel() > 0
        and (x.shape[-1] // 2) * x.element_size() % 8 == 0
        and x.shape[-1] % 2 == 0
        and words_fit(x)
    )


def silu_and_mul_numba(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The numba kernel's ``silu_and_mul``; ``out`` (contiguous ``[..., I]``) may be given."""
    size = x.shape[-1] // 2
    if out is None:
        out = torch.empty((*x.shape[:-1], size), dtype=x.dtype, device=x.device)
    rows = x.reshape(-1, x.shape[-1])
    out_words = words(out.view(-1, size))
    blocks = rows.shape[0] * -(-out_words.shape[1] // (_THREADS * _WORDS_PER_THREAD))
    SILU_AND_MUL_KERNELS[x.dtype][blocks, _THREADS, stream_for(x)](words(rows), out_words)
    return out


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@cuda.jit(device=True)
def _gelu_tanh_tile(x, out, kind):
    """One block computes ``blockDim * _WORDS_PER_THREAD`` consecutive words of the flat input.

    Thread ``t`` owns words ``t + k * blockDim`` of the block's tile: all its loads are issued
    before any store, and each warp instruction touches 32 consecutive words.
    """
    n_words = x.shape[0]
    start = cuda.blockIdx.x * cuda.blockDim.x * _WORDS_PER_THREAD + cuda.threadIdx.x
    values = cuda.local.array(_WORDS_PER_THREAD, np.uint64)
    for k in range(_WORDS_PER_THREAD):
        i = start + k * cuda.blockDim.x
        if i < n_words:
            values[k] = np.uint64(x[i])
    for k in range(_WORDS_PER_THREAD):
        i = start + k * cuda.blockDim.x
        if i < n_words:
            result = np.uint64(0)
            for j in range(per_word(kind)):
                v = unpack(values[k], j, kind)
                inner = np.float32(_SQRT_2_OVER_PI) * (v + np.float32(0.044715) * v * v * v)
                result |= pack(np.float32(0.5) * v * (np.float32(1.0) + math.tanh(inner)), j, kind)
            out[i] = result


# Arguments: x and out as flat [W] 8-byte words. fastmath as for SiLU-and-mul (``tanh`` within a
# few ulp of fp32).


@cuda.jit(cache=True, fastmath=True)
def gelu_tanh_f32(x, out):
    _gelu_tanh_tile(x, out, F32)


@cuda.jit(cache=True, fastmath=True)
def gelu_tanh_bf16(x, out):
    _gelu_tanh_tile(x, out, BF16)


@cuda.jit(cache=True, fastmath=True)
def gelu_tanh_f16(x, out):
    _gelu_tanh_tile(x, out, F16)


GELU_TANH_KERNELS = {
    torch.float32: gelu_tanh_f32,
    torch.bfloat16: gelu_tanh_bf16,
    torch.float16: gelu_tanh_f16,
}


def gelu_numba_supports(x: torch.Tensor) -> bool:
    """Whether the GELU kernel handles ``x`` here: contiguous, a whole number of aligned words."""
    return runs_here(x) and x.numel() > 0 and x.is_contiguous() and words_fit(x.view(-1))


def gelu_tanh_numba(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The numba kernel's ``gelu_tanh``; ``out`` (contiguous, ``x``'s shape) may be given."""
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device) if out is None else out
    x_words = words(x.view(-1))
    blocks = -(-x_words.shape[0] // (_THREADS * _WORDS_PER_THREAD))
    GELU_TANH_KERNELS[x.dtype][blocks, _THREADS, stream_for(x)](x_words, words(out.view(-1)))
    return out


# --- dispatch -------------------------------------------------------------------------------------


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, the CPU kernel
    (``yaie.kernels.elementwise_cpu``) on float32 CPU tensors it supports, else the reference."""
    if x.is_cuda and numba_supports(x):
        return silu_and_mul_numba(x)
    if silu_and_mul_cpu_supported(x):
        return silu_and_mul_cpu(x)
    return silu_and_mul_reference(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if x.is_cuda and gelu_numba_supports(x):
        return gelu_tanh_numba(x)
    return gelu_tanh_reference(x)
