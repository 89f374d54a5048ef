"""Paged attention over a ragged batch that mixes prefill chunks and single-token decodes.

Every request's new queries attend causally to its whole context: the prefix already in the
cache (radix-tree hits, earlier chunks) plus its own new tokens, which ``write_kv`` stored before
this op runs. Query ``i`` of a request whose context ends at ``seq_len`` with ``n`` new tokens sits
at position ``seq_len - n + i`` and sees keys ``0 ..= seq_len - n + i``: causal with an offset.

On CUDA tensors the decodes run in the numba kernel of ``yaie.kernels.decode_attention``
(GQA, split-KV), which reads the block tables directly; prefill chunks run in whichever of
torch's flash attention and the numba kernel of ``yaie.kernels.prefill_attention`` is faster
(``PREFILL_BACKEND``). On fp32 CPU tensors the decodes run in the numba CPU kernel of
``yaie.kernels.decode_attention_cpu``, which also reads the block tables directly. Everything
else (prefill chunks on CPU, other dtypes) takes the torch path, which is also the reference
every kernel is tested against.

The torch path runs in two parts whose plans are built once per step (``AttentionMetadata`` in
``yaie.model.attention``) and shared by all layers:

- each prefill chunk gathers its context rows by slot and runs ``scaled_dot_product_attention``
  (``is_causal`` when there is no cached prefix, else an explicit offset-causal mask);
- a context whose slots are consecutive (its blocks were allocated in order) is read as a view
  of the cache instead of gathered;
- decodes run as batched attention: their contexts are gathered, padded to the longest, into
  ``[B, Lmax, Hkv, D]`` with a length mask, so a decode step costs a fixed handful of ops per
  layer whatever the batch size. Decodes of very different lengths go in separate groups so
  that short contexts are not padded (gathered and attended) to the longest one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from yaie.kernels.decode_attention import (
    DecodeRope,
    decode_supported,
    paged_decode_attention,
    rope_supported,
)
from yaie.kernels.decode_attention_cpu import cpu_decode_supported, paged_decode_attention_cpu
from yaie.kernels.prefill_attention import paged_prefill_attention, prefill_supported
from yaie.kernels.rotary_kv import QKNorm, rotary_write_kv

PREFILL_BACKEND: Literal["torch", "numba"] = "torch"
"""Who runs prefill chunks on the GPU: torch, whose attention runs on the tensor cores. Measured
on an H100 (``python -m yaie.bench.attention_kernels``, bf16, 32/8 heads of 128): a 4,096-token
prompt took 17.8 ms in the numba kernel (7.7 TFLOP/s, fp32 on the CUDA cores) against 0.28 ms
on the torch path (gather + SDPA, 491 TFLOP/s); 512 tokens over a 3,584-token cached prefix,
5.2 ms against 0.14 ms."""


DECODE_ROPE_IN_KERNEL = True
"""Whether decode-only CUDA steps do rotary and the K/V store inside the decode kernel
(``rotary_paged_attention``); off, they run ``rotary_write_kv`` first, as mixed steps do.
Measured on an H100 (``python scripts/decode_latency.py --rope-ab``): Qwen3-0.6B batch 1
1.41 ms/step on, 1.46 off; Llama-3.1-8B batch 1 6.41 on, 6.51 off (guide.md, chapter 16)."""

_PREFILL_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA backends for prefill on CUDA: not cuDNN, which builds a plan for every new sequence
length. Measured on an H100 (``scripts/profile_gpu_step.py --vary``, Qwen3-0.6B shape, 16
prompts of 256-512 tokens, each length new): the prefill step took 1,176 ms with cuDNN allowed
(1.03 s of it host time) and 162 ms with these backends; the 256-request throughput workload went
from 6,180 to 12,734 output tok/s."""


@dataclass(slots=True)
class PrefillSegment:
    """One request's prefill chunk: flat query rows ``start:end`` over context ``slots``
    (cache rows: an index tensor, or a ``slice`` when they are consecutive).

    ``mask`` is ``[end - start, len(slots)]`` bool (True = attend) when a cached prefix shifts
    the diagonal, ``None`` when the chunk is the whole context so plain causal attention applies.
    """

    start: int
    end: int
    slots: torch.Tensor | slice
    mask: torch.Tensor | None


@dataclass(slots=True)
class DecodeGroup:
    """Single-token queries of similar context lengths, attended as one padded batch.

    ``rows`` selects the decode tokens in the flat batch (a ``slice`` when they are contiguous,
    else an index tensor); ``slots`` is ``[B * max_len]``: request ``b``'s context slots, padded
    to ``max_len`` with in-range slots whose stale (finite) contents ``mask [B, 1, 1, max_len]``
    hides (a ``slice`` for a lone request with consecutive slots). ``mask`` is ``None`` when all
    contexts have the same length.
    """

    rows: slice | torch.Tensor
    num_seqs: int
    max_len: int
    slots: torch.Tensor | slice
    mask: torch.Tensor | None


class PagedAttentionMetadata(Protocol):
    """What ``paged_attention`` reads from a step's metadata (see ``AttentionMetadata``)."""

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_seq_len: int
    decode_ids: torch.Tensor
    prefill_ids: torch.Tensor
    max_query_len: int
    prefills: list[PrefillSegment]
    decodes: list[DecodeGroup]


def _context(rows: torch.Tensor, slots: torch.Tensor | slice) -> torch.Tensor:
    """Cache rows ``slots`` of ``rows [num_slots, Hkv, D]``: a view when they are a range."""
    return rows[slots] if isinstance(slots, slice) else rows.index_select(0, slots)


def _prefill(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    seg: PrefillSegment,
    scale: float,
) -> torch.Tensor:
    """``[n, Hq, D]`` output of one prefill chunk.

    Inputs are made 4-D (batch of one): torch's fused CPU attention kernel only takes 4-D and
    otherwise falls back to materialising the full score matrix.
    """
    k = _context(k_rows, seg.slots).transpose(0, 1).unsqueeze(0)
    v = _context(v_rows, seg.slots).transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(
        q[seg.start : seg.end].transpose(0, 1).unsqueeze(0),
        k,
        v,
        attn_mask=seg.mask,
        is_causal=seg.mask is None,
        scale=scale,
        enable_gqa=True,
    )
    return out[0].transpose(0, 1)


def _prefill_into(
    out: torch.Tensor,
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    prefills: list[PrefillSegment],
    scale: float,
) -> None:
    """Write every prefill chunk's attention into its rows of ``out``."""
    for seg in prefills:
        out[seg.start : seg.end] = _prefill(q, k_rows, v_rows, seg, scale)


def _decode(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    group: DecodeGroup,
    scale: float,
) -> torch.Tensor:
    """``[B, Hq, D]`` output of one decode group.

    A decode has no causal mask, so the ``Hq / Hkv`` query heads that share a KV head are
    passed as that head's queries (``[B, Hkv, group, D]``) instead of as ``Hq`` heads with
    ``enable_gqa``: each KV row is read once per KV head, not once per query head. Measured on
    SmolLM2-135M shapes (9 / 3 heads, one thread): 16 decodes over 160 keys, 473 against 505 us.
    """
    num_seqs, num_kv_heads = group.num_seqs, k_rows.shape[1]
    shape = (num_seqs, group.max_len, *k_rows.shape[1:])
    k = _context(k_rows, group.slots).view(shape).transpose(1, 2)
    v = _context(v_rows, group.slots).view(shape).transpose(1, 2)
    # reshape, not view: on CUDA, SDPA's output (and q after some norms) may not be contiguous.
    queries = q[group.rows].reshape(num_seqs, num_kv_heads, -1, q.shape[-1])
    out = F.scaled_dot_product_attention(queries, k, v, attn_mask=group.mask, scale=scale)
    return out.reshape(num_seqs, -1, q.shape[-1])


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of ``q [T, Hq, D]`` over the caches ``[num_blocks, block_size, Hkv, D]``.

    Returns ``[T, Hq, D]``; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
    """
    k_rows, v_rows = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    prefills, decodes = meta.prefills, meta.decodes
    # A step of one kind and one group (the common case) returns its output without a copy.
    if not decodes and len(prefills) == 1 and prefills[0].end - prefills[0].start == len(q):
        return _prefill(q, k_rows, v_rows, prefills[0], scale)
    if not prefills and len(decodes) == 1 and decodes[0].num_seqs == len(q):
        return _decode(q, k_rows, v_rows, decodes[0], scale)
    out = torch.empty_like(q)
    _prefill_into(out, q, k_rows, v_rows, prefills, scale)
    for group in decodes:
        out[group.rows] = _decode(q, k_rows, v_rows, group, scale)
    return out


def paged_attention_kernels(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Decodes in a numba kernel (``decode_attention`` on CUDA, ``decode_attention_cpu`` on the
    CPU), then prefill chunks: per ``PREFILL_BACKEND`` on CUDA, torch's SDPA on the CPU."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    decode_args = (q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens,
                   meta.query_start_loc, meta.decode_ids)
    if q.is_cuda:
        paged_decode_attention(*decode_args, meta.max_seq_len, scale)
    else:
        paged_decode_attention_cpu(*decode_args, scale)
    if not meta.prefills:
        return out
    if q.is_cuda and PREFILL_BACKEND == "numba" and prefill_supported(q, k_cache, v_cache):
        paged_prefill_attention(
            q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            meta.prefill_ids, meta.max_query_len, scale,
        )
    else:  # the backend list only matters on CUDA; the CPU has flash and math anyway
        with sdpa_kernel(_PREFILL_SDPA_BACKENDS):
            _prefill_into(out, q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), meta.prefills, scale)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The model's entry point: ``paged_attention_kernels`` on CUDA tensors the numba decode
    kernel supports and for steps with decodes on fp32 CPU tensors, else the torch reference."""
    if (q.is_cuda and decode_supported(q, k_cache, v_cache)) or (
        meta.decodes and cpu_decode_supported(q, k_cache, v_cache)
    ):
        return paged_attention_kernels(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def rotary_paged_attention(
    positions: torch.Tensor,
    qkv: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
    qk_norm: QKNorm | None = None,
) -> torch.Tensor:
    """``rotary_write_kv`` then ``paged_attention``, from the QKV projection's output
    ``qkv [T, Hq + 2 Hkv, D]``: the Llama family's attention after its projection.

    A step of decodes only, on CUDA, runs both in the decode kernel (``DecodeRope``): each
    block rotates its own query heads, and the block whose partition ends the context
    normalises, rotates and stores its KV head's new key and value before reading the cache.
    One launch a layer fewer, where at batch 1 a launch costs more than its work.
    """
    if qkv.is_cuda and not meta.prefills and DECODE_ROPE_IN_KERNEL:
        q = qkv[:, :num_heads]
        rope = DecodeRope(qkv[:, num_heads:], positions, cos_sin_cache, meta.slot_mapping, qk_norm)
        if rope_supported(q, k_cache, v_cache, rope):
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            paged_decode_attention(
                q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens,
                meta.query_start_loc, meta.decode_ids, meta.max_seq_len, scale, rope=rope,
            )
            return out
    q = rotary_write_kv(positions, qkv, num_heads, num_kv_heads, cos_sin_cache, k_cache,
                        v_cache, meta.slot_mapping, qk_norm)
    return paged_attention(q, k_cache, v_cache, meta, scale)
