"""Rotary position embedding (RoPE), including Llama-3 frequency scaling.

The cache is one table per model, indexed by position (see ``build_cos_sin_cache``); a step looks
rows up by position, so a ragged batch (prefill chunks and decodes mixed) needs no special
casing.

Two layouts pair the channels that rotate together: NeoX / Hugging Face Llama ("rotate halves":
channel ``i`` with ``i + D/2``) and GPT-J (interleaved: ``2i`` with ``2i + 1``).

The numba kernel rotates q and k in one launch, one block per token, reading and writing each
value once; the torch reference gathers the table and makes six passes with temporaries.
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
    elements,
    integers,
    load_element,
    pack,
    per_word,
    pow2_threads,
    runs_here,
    stream_for,
    unpack,
    words,
    words_fit,
)
from yaie.kernels.elementwise_cpu import apply_rotary_cpu, rotary_cpu_supported

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def _inv_freq(head_dim: int, base: float, rope_scaling: dict | None) -> torch.Tensor:
    """Per-pair rotation frequencies, computed in fp32 exactly as Hugging Face does.

    Matching HF's fp32 arithmetic keeps our angles bit-identical to the reference models.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / rope_scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(
        f"unsupported rope_type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: slow down low frequencies by ``factor``, keep high ones, blend between.

    Wavelengths longer than the original context divided by ``low_freq_factor`` were never seen
    whole in pre-training, so they are stretched; those shorter than the original context divided
    by ``high_freq_factor`` carry local order and stay; the band between is interpolated.
    """
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_cos_sin_cache(
    head_dim: int,
    max_pos: int,
    base: float,
    rope_scaling: dict | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``[max_pos, 2, head_dim]`` table: per position, ``cos`` and signed ``sin`` at full width.

    Row ``p`` is ``[[cos a, cos a], [-sin a, sin a]]`` for the ``head_dim / 2`` angles
    ``a = p * f``, laid out for NeoX (rotate-halves) pairing; GPT-J pairing reads the same row
    through a strided view. Storing both halves pre-expanded and pre-signed costs 2x the memory
    of a plain cos/sin table but turns a rotation into ``x * cos + partner(x) * sin``: three
    tensor ops instead of five, which matters at one op per layer per step.

    ``rope_scaling`` is a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict (``rope_type``
    or legacy ``type`` key) or ``None``; an unknown type raises ``ValueError``. Built in fp32 and
    cast to ``dtype`` at the end, as HF casts cos/sin to the activation dtype.
    """
    inv_freq = _inv_freq(head_dim, base, rope_scaling)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    table = torch.stack((torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)), dim=1)
    return table.to(dtype)


def _rotate_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    """``x [T, H, D] = x * cos + partner(x) * sin`` in place, ``partner`` swapping each pair.

    NeoX pairs channel ``i`` with ``i + D/2``, so the partner is ``x`` with its halves swapped
    and ``cos``/``sin`` (``[T, 1, D]``) apply as stored. GPT-J pairs ``2i`` with ``2i + 1``:
    both ``x`` and the tables are viewed as ``[.., D/2, 2]`` (the tables transposed from
    halves to pairs) and the partner swaps within each pair.
    """
    half = x.shape[-1] // 2
    if is_neox:
        partner = x.roll(half, dims=-1)
    else:
        x = x.unflatten(-1, (half, 2))
        partner = x.flip(-1)
        cos = cos.unflatten(-1, (2, half)).transpose(-1, -2)
        sin = sin.unflatten(-1, (2, half)).transpose(-1, -2)
    x.mul_(cos).addcmul_(partner, sin)


def apply_rotary_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """Rotate ``q [T, Hq, D]`` and ``k [T, Hkv, D]`` in place by the angles of ``positions [T]``.

    ``q`` and ``k`` may be strided views (e.g. slices of a fused QKV projection) as long as
    their last dim is contiguous.
    """
    cos, sin = cos_sin_cache.index_select(0, positions).unsqueeze(-2).unbind(1)
    _rotate_(q, cos, sin, is_neox)
    _rotate_(k, cos, sin, is_neox)


# --- numba.cuda kernel ----------------------------------------------------------------------------

_MAX_HALF = 256
"""Largest ``head_dim / 2`` the kernel stages in shared memory (head_dim up to 512)."""


@cuda.jit(device=True)
def _rotate_word(x, t, h, w, cos, sin, is_neox, kind):
    """Rotate the pairs that word ``w`` of head ``x[t, h]`` starts, in place.

    NeoX: word ``w`` of the first half holds channels ``i = w * vec + j``; their partners
    ``i + D/2`` sit in word ``w + W/2``, so the thread loads both words (two independent
    loads in flight) and writes both. GPT-J: a word holds ``vec / 2`` whole pairs.
    Per pair, ``(x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)`` in fp32, rounded once.
    """
    vec = per_word(kind)
    if is_neox:
        half_words = x.shape[2] // 2
        first = np.uint64(x[t, h, w])
        second = np.uint64(x[t, h, w + half_words])
        out_first = np.uint64(0)
        out_second = np.uint64(0)
        for j in range(vec):
            i = w * vec + j
            x0 = unpack(first, j, kind)
            x1 = unpack(second, j, kind)
            out_first |= pack(x0 * cos[i] - x1 * sin[i], j, kind)
            out_second |= pack(x1 * cos[i] + x0 * sin[i], j, kind)
        x[t, h, w] = out_first
        x[t, h, w + half_words] = out_second
    else:
        word = np.uint64(x[t, h, w])
        out = np.uint64(0)
        for m in range(vec // 2):
            i = w * (vec // 2) + m
            x0 = unpack(word, 2 * m, kind)
            x1 = unpack(word, 2 * m + 1, kind)
            out |= pack(x0 * cos[i] - x1 * sin[i], 2 * m, kind)
            out |= pack(x1 * cos[i] + x0 * sin[i], 2 * m + 1, kind)
        x[t, h, w] = out


@cuda.jit(device=True)
def _rotary_token(positions, q, k, cos_sin, is_neox, kind):
    """One block rotates every q and k head of token ``blockIdx.x``.

    The token's table row (``cos`` and the positive ``sin``, ``D/2`` values each) is staged in
    shared memory as fp32 once, then reused by all heads. The work items are (head, word) pairs
    over q's heads then k's, handed out to threads round-robin, so a warp covers consecutive
    words of a head: coalesced 8-byte accesses, each value read and written once.
    """
    t = cuda.blockIdx.x
    tid = cuda.threadIdx.x
    step = cuda.blockDim.x
    half = cos_sin.shape[2] // 2
    pos = positions[t]
    cos = cuda.shared.array(_MAX_HALF, np.float32)
    sin = cuda.shared.array(_MAX_HALF, np.float32)
    i = tid
    while i < half:
        cos[i] = load_element(cos_sin[pos, 0, i], kind)
        sin[i] = load_element(cos_sin[pos, 1, half + i], kind)
        i += step
    cuda.syncthreads()

    per_head = q.shape[2] // 2 if is_neox else q.shape[2]
    q_items = q.shape[1] * per_head
    items = q_items + k.shape[1] * per_head
    item = tid
    while item < items:
        if item < q_items:
            h = item // per_head
            _rotate_word(q, t, h, item - h * per_head, cos, sin, is_neox, kind)
        else:
            h = (item - q_items) // per_head
            _rotate_word(k, t, h, item - q_items - h * per_head, cos, sin, is_neox, kind)
        item += step


# One kernel per dtype (``kind`` must be a compile-time constant; see yaie.kernels._numba).
# Arguments: positions [T] (int), q [T, Hq, W] and k [T, Hkv, W] as 8-byte words, the table
# [max_pos, 2, D] as per-value bits, is_neox.


@cuda.jit(cache=True)
def rotary_f32(positions, q, k, cos_sin, is_neox):
    _rotary_token(positions, q, k, cos_sin, is_neox, F32)


@cuda.jit(cache=True)
def rotary_bf16(positions, q, k, cos_sin, is_neox):
    _rotary_token(positions, q, k, cos_sin, is_neox, BF16)


@cuda.jit(cache=True)
def rotary_f16(positions, q, k, cos_sin, is_neox):
    _rotary_token(positions, q, k, cos_sin, is_neox, F16)


ROTARY_KERNELS = {torch.float32: rotary_f32, torch.bfloat16: rotary_bf16, torch.float16: rotary_f16}


def numba_supports(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor
) -> bool:
    """Whether the numba kernel handles these operands here (else the reference runs).

    q and k: ``[T, heads, D]`` word-aligned views (slices of a fused QKV output qualify) with
    each half-head a whole number of words; the table contiguous in the same dtype.
    """
    head_dim = q.shape[-1]
    return (
        runs_here(q)
        and q.dim() == 3
        and k.dim() == 3
        and q.shape[0] == k.shape[0] == positions.shape[0] > 0
        and k.shape[-1] == head_dim
        and k.dtype == q.dtype == cos_sin_cache.dtype
        and cos_sin_cache.is_contiguous()
        and cos_sin_cache.shape[1:] == (2, head_dim)
        and head_dim <= 2 * _MAX_HALF
        and (head_dim // 2) * q.element_size() % 8 == 0
        and words_fit(q)
        and words_fit(k)
        and positions.dim() == 1
        and not positions.is_floating_point()
    )


def apply_rotary_numba(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """The numba kernel's ``apply_rotary``: rotates ``q`` and ``k`` in place."""
    words_per_head = q.shape[-1] * q.element_size() // 8
    items = (q.shape[1] + k.shape[1]) * (words_per_head // 2 if is_neox else words_per_head)
    threads = pow2_threads(items, hi=128)
    ROTARY_KERNELS[q.dtype][q.shape[0], threads, stream_for(q)](
        integers(positions), words(q), words(k), elements(cos_sin_cache), is_neox
    )


# --- dispatch -------------------------------------------------------------------------------------


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    is_neox: bool = True,
) -> None:
    """The model's entry point: the numba kernel on CUDA tensors it supports, the CPU kernel
    (``yaie.kernels.elementwise_cpu``) on float32 CPU tensors it supports, else the reference."""
    if q.is_cuda and numba_supports(positions, q, k, cos_sin_cache):
        apply_rotary_numba(positions, q, k, cos_sin_cache, is_neox)
    elif rotary_cpu_supported(positions, q, k, cos_sin_cache):
        apply_rotary_cpu(positions, q, k, cos_sin_cache, is_neox)
    else:
        apply_rotary_reference(positions, q, k, cos_sin_cache, is_neox)
