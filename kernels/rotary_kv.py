"""Everything between the QKV projection and attention, in one kernel: Qwen3's per-head q/k
RMSNorm (when the model has it), rotary embedding of q and k, and storing k and v in the paged
KV cache.

Unfused, these are four launches per layer (q norm, k norm, rotary, K/V write), each reading
what the previous one wrote. At batch 1 a launch costs more than its work: the GPU spends ~2 µs
per kernel on a few KB, and a Qwen3-0.6B decode step had 112 such launches. Fused, each q, k and
v value is read once from the QKV projection's output and written once: q back in place, k and v
into the cache (``k`` itself is not written back: attention reads keys from the cache).

The torch reference is the unfused ops' references one after the other: ``rms_norm`` per head,
``apply_rotary`` (NeoX pairing, the Llama family's), ``write_kv``. On float32 CPU tensors a
numba CPU kernel does the same in one pass (``yaie.kernels.elementwise_cpu``). Where neither
applies (other CPU dtypes, unsupported shapes), ``rotary_write_kv`` runs the unfused ops' own
dispatch functions in the same order, so each still takes its numba kernel where it has one. The
kernels round the normalised values to the activation dtype before rotating them, as the
unfused ops do when they store between the two, so both compute the same function.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from yaie.kernels._numba import (
    BF16,
    F16,
    F32,
    SIMULATOR,
    cuda,
    flat_words,
    integers,
    pack,
    per_word,
    rounded,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
    xor_shuffle,
)
from yaie.kernels.elementwise_cpu import rotary_write_kv_cpu, rotary_write_kv_cpu_supported
from yaie.kernels.kv_cache import write_kv, write_kv_reference
from yaie.kernels.rms_norm import rms_norm, rms_norm_reference
from yaie.kernels.rotary import apply_rotary, apply_rotary_reference

QKNorm = tuple[torch.Tensor, torch.Tensor, float]
"""Qwen3's q/k norms: ``(q weight [D], k weight [D], eps)``."""


def _unfused(
    ops: tuple[Callable, Callable, Callable],
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """The fused op as its steps, each by ``ops = (rms_norm, apply_rotary, write_kv)``."""
    norm, rotate, write = ops
    q, k, v = qkv.split((num_heads, num_kv_heads, num_kv_heads), dim=1)
    if qk_norm is not None:
        q_weight, k_weight, eps = qk_norm
        q, k = norm(q, q_weight, eps), norm(k, k_weight, eps)
    rotate(positions, q, k, cos_sin_cache)
    write(k, v, k_cache, v_cache, slot_mapping)
    return q


def rotary_write_kv_reference(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """Rotated (and, with ``qk_norm``, first normalised) queries ``[T, Hq, D]``, after storing
    the keys, treated alike, and the values at ``slot_mapping`` of the caches.

    ``qkv [T, Hq + 2 Hkv, D]`` is the QKV projection's output, heads in that order.
    """
    return _unfused(
        (rms_norm_reference, apply_rotary_reference, write_kv_reference), positions, qkv,
        num_heads, num_kv_heads, cos_sin_cache, k_cache, v_cache, slot_mapping, qk_norm,
    )


# --- numba.cuda kernel ----------------------------------------------------------------------------

_THREADS = 256
_ROUNDS = 4
"""A block has at most ``_THREADS`` threads and walks a token's heads in at most ``_ROUNDS``
rounds (up to 1,024 head-group lanes: 64 bf16 heads of 128). Small blocks keep many tokens
in flight per multiprocessor when a prefill brings thousands: one 768-thread block per token
ran a 4,096-token Llama-3-8B step at a third of the copy bandwidth (97.5 µs, H100)."""
_OPTIONS = {} if SIMULATOR else {"launch_bounds": _THREADS}


@cuda.jit(device=True)
def _rotary_kv_token(positions, qkv, qkv_strides, cos_sin, q_weight, k_weight, k_cache, v_cache,
                     slot_mapping, num_heads, num_kv_heads, eps, norm, kind):
    """Block ``t`` processes token ``t``: every head of its QKV row.

    A head row of ``W`` words has halves of ``H = W / 2`` words, and NeoX rotation pairs
    channel ``i`` with ``i + D/2``: word ``l`` of the first half with word ``l`` of the second.
    So a *head group* of ``H`` lanes owns one head, lane ``l`` holding words ``l`` and
    ``H + l``: each pair rotates in one lane's registers, and a warp loads whole rows with
    coalesced 8-byte accesses. The token's cos/sin words and the norm weights are loaded once
    per lane and serve every head. Groups walk the heads (q, then k, then v) in rounds; a
    thread loads the words of all its rounds before it computes or stores any, so every load
    of the block is in flight at once. Every lane runs every round, so the shuffles of the
    sum of squares (over the group's lanes) always find their whole warp. ``qkv``: flat
    words, token ``t``'s head ``h`` at word ``t * qkv_strides[0] + h * qkv_strides[1]``;
    caches ``[slots, Hkv * W]`` words; ``cos_sin [max_pos, 2, W]`` words; a negative slot
    (padding) stores no K/V.
    """
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    half = cos_sin.shape[2] // 2
    lanes = half
    group = tid // lanes
    lane = tid % lanes
    groups = cuda.blockDim.x // lanes
    vec = per_word(kind)
    head_dim = 2 * half * vec
    heads = num_heads + 2 * num_kv_heads
    pos = positions[t]
    slot = slot_mapping[t]
    row = t * qkv_strides[0]

    cos_word = np.uint64(cos_sin[pos, 0, lane])
    sin_word = np.uint64(cos_sin[pos, 1, half + lane])
    qw0 = np.uint64(q_weight[lane])
    qw1 = np.uint64(q_weight[half + lane])
    kw0 = np.uint64(k_weight[lane])
    kw1 = np.uint64(k_weight[half + lane])
    first = cuda.local.array(_ROUNDS, np.uint64)
    second = cuda.local.array(_ROUNDS, np.uint64)
    for r in range(_ROUNDS):
        at = row + min(r * groups + group, heads - 1) * qkv_strides[1] + lane
        first[r] = np.uint64(qkv[at])
        second[r] = np.uint64(qkv[at + half])

    for r in range(_ROUNDS):
        h = r * groups + group
        if r * groups < heads:  # the same for the whole block
            x0 = first[r]
            x1 = second[r]
            inv_rms = np.float32(1.0)
            if norm:
                squares = np.float32(0.0)
                for e in range(vec):
                    a = unpack(x0, e, kind)
                    b = unpack(x1, e, kind)
                    squares += a * a + b * b
                width = lanes // 2
                while width > 0:
                    squares += xor_shuffle(squares, width)
                    width //= 2
                inv_rms = np.float32(1.0) / math.sqrt(squares / np.float32(head_dim) + eps)
            at = row + h * qkv_strides[1] + lane
            if h < num_heads + num_kv_heads:
                w0 = qw0 if h < num_heads else kw0
                w1 = qw1 if h < num_heads else kw1
                out0 = np.uint64(0)
                out1 = np.uint64(0)
                for e in range(vec):
                    a = unpack(x0, e, kind)
                    b = unpack(x1, e, kind)
                    if norm:
                        a = rounded(a * inv_rms * unpack(w0, e, kind), kind)
                        b = rounded(b * inv_rms * unpack(w1, e, kind), kind)
                    c = unpack(cos_word, e, kind)
                    s = unpack(sin_word, e, kind)
                    out0 |= pack(a * c - b * s, e, kind)
                    out1 |= pack(b * c + a * s, e, kind)
                if h < num_heads:
                    qkv[at] = out0
                    qkv[at + half] = out1
                elif slot >= 0:
                    col = (h - num_heads) * 2 * half + lane
                    k_cache[slot, col] = out0
                    k_cache[slot, col + half] = out1
            elif h < heads and slot >= 0:
                col = (h - num_heads - num_kv_heads) * 2 * half + lane
                v_cache[slot, col] = x0
                v_cache[slot, col + half] = x1


# One kernel per dtype and variant: ``kind`` and ``norm`` must be compile-time constants
# (see yaie.kernels._numba). Arguments: positions [T], qkv flat words and its (token, head)
# word strides, cos_sin [max_pos, 2, W] words, q/k norm weights [W] words (any words when
# ``norm`` is off), caches [slots, Hkv * W] words, slot_mapping [T], head counts, eps.


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def rotary_kv_f32(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq, hkv,
                  eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, False, F32)


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def rotary_kv_bf16(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq, hkv,
                   eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, False, BF16)


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def rotary_kv_f16(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq, hkv,
                  eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, False, F16)


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def qk_norm_rotary_kv_f32(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots,
                          hq, hkv, eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, True, F32)


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def qk_norm_rotary_kv_bf16(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots,
                           hq, hkv, eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, True, BF16)


@cuda.jit(cache=True, fastmath=True, **_OPTIONS)
def qk_norm_rotary_kv_f16(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots,
                          hq, hkv, eps):
    _rotary_kv_token(positions, qkv, strides, cos_sin, q_w, k_w, k_cache, v_cache, slots, hq,
                     hkv, eps, True, F16)


ROTARY_KV_KERNELS = {
    (torch.float32, False): rotary_kv_f32,
    (torch.bfloat16, False): rotary_kv_bf16,
    (torch.float16, False): rotary_kv_f16,
    (torch.float32, True): qk_norm_rotary_kv_f32,
    (torch.bfloat16, True): qk_norm_rotary_kv_bf16,
    (torch.float16, True): qk_norm_rotary_kv_f16,
}


def numba_supports(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: QKNorm | None,
) -> bool:
    """Whether the numba kernel handles these operands here (else the reference runs).

    A half head must be a power-of-two number of words up to a warp (head dims 32 to 256 in
    bf16/fp16, 16 to 128 in fp32), so that a head group tiles warps exactly, and the heads fit
    the block's rounds.
    """
    if qkv.dim() != 3 or qkv.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    head_dim = qkv.shape[-1]
    half = head_dim * qkv.element_size() // 16
    return (
        runs_here(qkv)
        and qkv.shape[0] > 0
        and qkv.shape[1] == num_heads + 2 * num_kv_heads
        and head_dim * qkv.element_size() % 16 == 0
        and 1 <= half <= 32
        and 32 % half == 0
        and qkv.shape[1] * half <= _THREADS * _ROUNDS
        and words_fit(qkv)
        and k_cache.dtype == v_cache.dtype == qkv.dtype
        and k_cache.shape == v_cache.shape
        and k_cache.shape[2:] == (num_kv_heads, head_dim)
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and rope_operands_fit(positions, slot_mapping, cos_sin_cache, qk_norm, qkv.dtype,
                              qkv.shape[0], head_dim)
    )


def rope_operands_fit(
    positions: torch.Tensor,
    slot_mapping: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    qk_norm: QKNorm | None,
    dtype: torch.dtype,
    tokens: int,
    head_dim: int,
) -> bool:
    """Whether the operands beside the QKV output and the caches suit a numba kernel that
    rotates (this module's, and the decode kernel's ``DecodeRope``): integer ``positions`` and
    ``slot_mapping`` of ``tokens``, a contiguous ``[max_pos, 2, head_dim]`` table and
    contiguous q/k norm weights of ``head_dim``, all in ``dtype``."""
    weights = () if qk_norm is None else qk_norm[:2]
    return (
        positions.shape == slot_mapping.shape == (tokens,)
        and not positions.is_floating_point()
        and not slot_mapping.is_floating_point()
        and cos_sin_cache.dtype == dtype
        and cos_sin_cache.is_contiguous()
        and cos_sin_cache.shape[1:] == (2, head_dim)
        and all(w.dtype == dtype and w.shape == (head_dim,) and w.is_contiguous()
                for w in weights)
    )


def rotary_write_kv_numba(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """The numba kernel's ``rotary_write_kv``: q is rotated in place, a view of ``qkv``."""
    flat, strides = flat_words(qkv)
    half = qkv.shape[-1] * qkv.element_size() // 16
    threads = min(_THREADS, -(-qkv.shape[1] * half // 32) * 32)
    if qk_norm is None:
        q_weight = k_weight = cos_sin_cache[0, 0]  # read, unused
        eps = 0.0
    else:
        q_weight, k_weight, eps = qk_norm
    rows = k_cache.shape[2] * k_cache.shape[3]
    ROTARY_KV_KERNELS[qkv.dtype, qk_norm is not None][qkv.shape[0], threads, stream_for(qkv)](
        integers(positions), flat, strides, words(cos_sin_cache), words(q_weight),
        words(k_weight), words(k_cache.view(-1, rows)), words(v_cache.view(-1, rows)),
        integers(slot_mapping), np.int32(num_heads), np.int32(num_kv_heads), np.float32(eps),
    )
    return qkv[:, :num_heads]


# --- dispatch -------------------------------------------------------------------------------------


def rotary_write_kv(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """The model's entry point: the fused numba kernel on CUDA tensors it supports, its CPU
    twin (``yaie.kernels.elementwise_cpu``) on float32 CPU tensors it supports, else the
    unfused ops through their own dispatch functions.

    Returns the queries ready for attention; keys and values are in the cache.
    """
    args = (positions, qkv, num_heads, num_kv_heads, cos_sin_cache, k_cache, v_cache,
            slot_mapping, qk_norm)
    if qkv.is_cuda and numba_supports(*args):
        return rotary_write_kv_numba(*args)
    if rotary_write_kv_cpu_supported(*args):
        return rotary_write_kv_cpu(*args)
    return _unfused((rms_norm, apply_rotary, write_kv), *args)
