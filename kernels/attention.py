"""Paged attention over a ragged batch that mixes prefill chunks and single-token decodes.

Every request's new queries attend causally to its whole context: the prefix already in the
cache (radix-tree hits, earlier chunks) plus its own new tokens, which ``write_kv`` stored before
this op runs. Query ``i`` of a request whose context ends at ``seq_len`` with ``n`` new tokens sits
at position ``seq_len - n + i`` and sees keys ``0 ..= seq_len - n + i``: causal with an offset.

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
from typing import Protocol

import torch
import torch.nn.functional as F


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
    """What ``paged_attention`` reads from a step's metadata."""

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


def _decode(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    group: DecodeGroup,
    scale: float,
) -> torch.Tensor:
    """``[B, Hq, D]`` output of one decode group."""
    shape = (group.num_seqs, group.max_len, *k_rows.shape[1:])
    k = _context(k_rows, group.slots).view(shape).transpose(1, 2)
    v = _context(v_rows, group.slots).view(shape).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q[group.rows].unsqueeze(2), k, v, attn_mask=group.mask, scale=scale, enable_gqa=True
    )
    return out.squeeze(2)


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
    for seg in prefills:
        out[seg.start : seg.end] = _prefill(q, k_rows, v_rows, seg, scale)
    for group in decodes:
        out[group.rows] = _decode(q, k_rows, v_rows, group, scale)
    return out


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """The model's entry point; every device runs the torch reference for now."""
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)
