"""A fixed pool of KV-cache blocks with reference counts.

Every block is referenced by the request block tables that use it and, once its tokens are full
and inserted into the radix tree, by the tree itself. A block returns to the free list exactly
when its last reference goes away, so sharing a prefix is just taking one more reference.
"""

from __future__ import annotations


class NoFreeBlocksError(RuntimeError):
    """Raised when more blocks are asked for than are free (callers check ``num_free`` first)."""


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        # A stack: pop() hands out block 0 first, and a freed block is reused first (warm).
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with one reference (the caller's)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        taken = self._free[len(self._free) - n :]
        del self._free[len(self._free) - n :]
        taken.reverse()  # ascending: a fresh request's blocks are often consecutive (no gather)
        refs = self.ref_counts
        for b in taken:
            refs[b] = 1
        return taken

    def incref(self, block_ids: list[int]) -> None:
        refs = self.ref_counts
        for b in block_ids:
            if refs[b] <= 0:
                raise RuntimeError(f"block {b} is free: cannot take a reference to it")
            refs[b] += 1

    def decref(self, block_ids: list[int]) -> None:
        """Drop one reference from each block; blocks left with none go back to the free list."""
        refs = self.ref_counts
        free = self._free
        for b in block_ids:
            r = refs[b] - 1
            if r < 0:
                raise RuntimeError(f"block {b} freed twice")
            refs[b] = r
            if r == 0:
                free.append(b)
