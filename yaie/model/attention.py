"""Per-step attention metadata and the attention layer that reads and writes the paged KV cache.

``AttentionMetadata`` turns the scheduler's plain lists into tensors once per step; every layer
reuses them. Besides what the GPU kernels want (slot mapping, query offsets, context lengths, a
padded block table, which requests decode and which prefill) it holds the torch path's plans:
each prefill chunk's context slots and offset-causal mask, and for the decodes, grouped by
context length, padded gathers of their contexts with length masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from yaie.kernels import (
    DecodeGroup,
    PrefillSegment,
    paged_attention,
    rotary_paged_attention,
    write_kv,
)
from yaie.kernels.rotary_kv import QKNorm

# A new decode group must save at least this many padded positions (see _group_by_length).
_MIN_SPLIT_SAVING = 512


@dataclass(slots=True)
class AttentionMetadata:
    """Tensors describing one ragged step, shared by all layers.

    Request ``i`` owns query rows ``query_start_loc[i]:query_start_loc[i + 1]`` and, after this
    step, a context of ``seq_lens[i]`` tokens in blocks ``block_tables[i, :]`` (padded with 0).
    ``slot_mapping[t]`` is where token ``t``'s K/V goes (negative: padding, not written).
    ``decode_ids`` / ``prefill_ids`` (int32) list the requests with one / several new tokens;
    ``max_query_len`` is the most new tokens of any request.
    """

    slot_mapping: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    max_seq_len: int
    decode_ids: torch.Tensor
    prefill_ids: torch.Tensor
    max_query_len: int
    prefills: list[PrefillSegment]
    decodes: list[DecodeGroup]

    @classmethod
    def build(
        cls,
        query_start_loc: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        slot_mapping: list[int],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """Build from a ``ScheduledBatch``'s lists (see ``yaie.core.batch``)."""
        num_seqs = len(seq_lens)
        max_seq_len = max(seq_lens, default=0)
        max_blocks = -(-max_seq_len // block_size)
        padded = [table[:max_blocks] + [0] * (max_blocks - len(table)) for table in block_tables]
        tables = torch.tensor(padded, dtype=torch.int64).view(num_seqs, max_blocks)
        query_lens = [query_start_loc[i + 1] - query_start_loc[i] for i in range(num_seqs)]

        prefills = []
        for i, n in enumerate(query_lens):
            if n > 1:
                start, seq_len = query_start_loc[i], seq_lens[i]
                slots = _one_context(block_tables[i], tables[i], seq_len, block_size, device)
                mask = None if n == seq_len else _offset_causal_mask(n, seq_len)
                prefills.append(PrefillSegment(start, start + n, slots, _to(mask, device)))

        decode_ids = [i for i, n in enumerate(query_lens) if n == 1]
        decodes = [
            _decode_group(ids, query_start_loc, seq_lens, block_tables, tables, block_size, device)
            for ids in _group_by_length(decode_ids, seq_lens)
        ]

        return cls(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(query_start_loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=tables.to(device=device, dtype=torch.int32),
            block_size=block_size,
            max_seq_len=max_seq_len,
            decode_ids=torch.tensor(decode_ids, dtype=torch.int32, device=device),
            prefill_ids=torch.tensor(
                [i for i, n in enumerate(query_lens) if n > 1], dtype=torch.int32, device=device
            ),
            max_query_len=max(query_lens, default=0),
            prefills=prefills,
            decodes=decodes,
        )


def _to(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def _context_slots(tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """``[R, length]`` slots of positions ``0..length-1`` for each row of ``tables``."""
    pos = torch.arange(length)
    return tables[:, pos // block_size] * block_size + pos % block_size


def _one_context(
    table: list[int], row: torch.Tensor, length: int, block_size: int, device: torch.device | str
) -> torch.Tensor | slice:
    """One request's context slots: a ``slice`` when its blocks are consecutive (the kernel
    then reads a view of the cache instead of gathering), else an index tensor."""
    first, num_blocks = table[0], -(-length // block_size)
    if table[:num_blocks] == list(range(first, first + num_blocks)):
        return slice(first * block_size, first * block_size + length)
    return _context_slots(row[None], length, block_size)[0].to(device)


def _offset_causal_mask(num_new: int, seq_len: int) -> torch.Tensor:
    """``[num_new, seq_len]``: new query ``i`` (position ``seq_len - num_new + i``) sees keys
    at positions up to its own."""
    keys = torch.arange(seq_len)
    queries = torch.arange(seq_len - num_new, seq_len)
    return keys[None, :] <= queries[:, None]


def _group_by_length(ids: list[int], seq_lens: list[int]) -> list[list[int]]:
    """Split decodes so that no group pads many short contexts up to a long one.

    Going from the longest context down, a request starts a new group when that saves the
    padding from it and every shorter request to the current group's longest context, and the
    saving is both over ``_MIN_SPLIT_SAVING`` positions and over a quarter of what the group
    would gather. Each group costs a few fixed ops per layer, so a batch of similar lengths
    stays one group. Measured on SmolLM2-135M (CPU time of a whole step on one thread, 16
    decodes): 15 contexts of 64 tokens beside one of 1,500 took 95-103 ms split against
    351-360 ms as one group; contexts spread evenly over 32..992 (three groups) 190-197 ms
    against 269-273 ms. A threshold of 128 or 2,048 instead of 512 changed neither, nor 32
    decodes of random lengths in 20..700, beyond the noise.
    """
    if not ids:
        return []
    by_len = sorted(ids, key=lambda i: seq_lens[i], reverse=True)
    groups = [[by_len[0]]]
    for placed, i in enumerate(by_len[1:], start=1):
        group_max, remaining = seq_lens[groups[-1][0]], len(by_len) - placed
        saved = (group_max - seq_lens[i]) * remaining
        if saved > _MIN_SPLIT_SAVING and 4 * saved > (len(groups[-1]) + remaining) * group_max:
            groups.append([])
        groups[-1].append(i)
    return [sorted(group) for group in groups]


def _decode_group(
    decode_ids: list[int],
    query_start_loc: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    tables: torch.Tensor,
    block_size: int,
    device: torch.device | str,
) -> DecodeGroup:
    rows_list = [query_start_loc[i] for i in decode_ids]
    first = rows_list[0]
    if rows_list == list(range(first, first + len(rows_list))):
        rows: slice | torch.Tensor = slice(first, first + len(rows_list))
    else:
        rows = torch.tensor(rows_list, dtype=torch.int64, device=device)
    lens = [seq_lens[i] for i in decode_ids]
    max_len = max(lens)
    if len(decode_ids) == 1:
        i = decode_ids[0]
        slots = _one_context(block_tables[i], tables[i], max_len, block_size, device)
        return DecodeGroup(rows, 1, max_len, slots, None)
    slots = _context_slots(tables[decode_ids], max_len, block_size).flatten().to(device)
    mask = None
    if min(lens) != max_len:
        mask = torch.arange(max_len)[None, :] < torch.tensor(lens)[:, None]
        mask = mask.view(len(lens), 1, 1, max_len).to(device)
    return DecodeGroup(rows, len(lens), max_len, slots, mask)


class Attention(nn.Module):
    """Stores this step's K/V in its layer's paged cache, then attends over each context.

    ``k_cache``/``v_cache`` are bound by the model (``LlamaForCausalLM.allocate_kv_cache``);
    they are plain attributes, not buffers, so they stay out of ``state_dict``.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """``q [T, Hq, D]``, ``k, v [T, Hkv, D]`` -> ``[T, Hq, D]``."""
        write_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta)

    def rotary_attend(
        self, positions: torch.Tensor, qkv: torch.Tensor, cos_sin_cache: torch.Tensor,
        meta: AttentionMetadata, qk_norm: QKNorm | None,
    ) -> torch.Tensor:
        """Attention from the QKV projection's output ``qkv [T, Hq + 2 Hkv, D]``: q/k norms
        (``qk_norm``), rotary and the K/V store first (``yaie.kernels.rotary_paged_attention``,
        one kernel for decode-only CUDA steps)."""
        return rotary_paged_attention(positions, qkv, self.num_heads, self.num_kv_heads,
                                      cos_sin_cache, self.k_cache, self.v_cache, meta,
                                      self.scale, qk_norm)

    def attend(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Attention of ``q [T, Hq, D]`` over a cache that already holds this step's K/V."""
        return paged_attention(q, self.k_cache, self.v_cache, meta, self.scale)
