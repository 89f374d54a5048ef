"""Writing a step's new keys and values into the paged KV cache.

Each cache is ``[num_blocks, block_size, num_kv_heads, head_dim]``; flattened over its first two
dims it is a table of ``[num_kv_heads, head_dim]`` rows, one per slot
(``slot = block_id * block_size + offset``), so a write is a row scatter by slot.
"""

from __future__ import annotations

import torch


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``k, v [T, Hkv, D]`` at rows ``slot_mapping [T]`` (int64) of the caches.

    A negative slot marks a padding token (batches padded to a captured size) and is skipped.
    """
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.flatten(0, 1).index_copy_(0, slot_mapping, k)
    v_cache.flatten(0, 1).index_copy_(0, slot_mapping, v)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """The model's entry point; every device runs the torch reference for now."""
    write_kv_reference(k, v, k_cache, v_cache, slot_mapping)
