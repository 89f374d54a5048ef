"""SiLU-and-mul: the gated MLP's activation on the fused gate/up projection.

The numba kernel reads the gate and up halves once and writes the product once; the torch
reference makes two passes and a temporary.
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


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``x = [gate | up]`` along the last dim: ``[T, 2I] -> [T, I]``.

    The gate and up projections run as one GEMM (one weight read, one launch); this splits its
    output. The result is a fresh contiguous tensor, which the down projection wants.
    """
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


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


# --- dispatch -------------------------------------------------------------------------------------


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The model's entry point: the numba kernel on CUDA tensors it supports, else the reference."""
    if x.is_cuda and numba_supports(x):
        return silu_and_mul_numba(x)
    return silu_and_mul_reference(x)
