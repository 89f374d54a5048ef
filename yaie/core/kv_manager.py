"""Which blocks hold which request's K/V: the block pool plus the radix prefix cache.

The scheduler asks three questions of it — "what prefix of this prompt is cached?",
"can this request grow by n tokens?", "this request is done (or preempted), release it" — and
after each step tells it how far each request has computed, so full blocks enter the radix tree
at once and requests arriving meanwhile already share them.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from yaie.core.block_pool import BlockPool
from yaie.core.radix_cache import RadixCache, RadixNode
from yaie.core.request import Request


@dataclass(slots=True)
class _CacheState:
    """What the radix tree knows of one live request: the node it locks (its cached prefix
    ends there) and how many of its leading blocks that prefix covers."""

    node: RadixNode
    num_blocks: int


@dataclass(slots=True)
class KVUsage:
    num_blocks: int
    free: int
    used: int  # referenced by at least one request
    cached: int  # held by the radix tree (some of them also used)
    evictable: int  # cached and used by no request


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.radix = RadixCache(self.pool, block_size)
        self.enable_prefix_caching = enable_prefix_caching
        self._state: dict[str, _CacheState] = {}

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ lifecycle

    def admit(self, req: Request, now: float) -> None:
        """Start (or restart after preemption) ``req`` from its longest cached prefix.

        At least one token is always left to compute: its logits give the next token.
        """
        assert not req.block_ids, "admitting a request that still holds blocks"
        if self.enable_prefix_caching:
            tokens = req.token_slice(0, req.num_tokens - 1)
            blocks, node = self.radix.match_prefix(tokens, now)
            self.pool.incref(blocks)
            self.radix.lock(node)
        else:
            blocks, node = [], self.radix.root
        req.block_ids = blocks
        req.num_computed_tokens = len(blocks) * self.block_size
        self._state[req.request_id] = _CacheState(node, len(blocks))

    def allocate(self, req: Request, num_new_tokens: int) -> bool:
        """Make ``req``'s block table cover ``num_new_tokens`` more tokens, evicting cached
        blocks if the free list runs short. False (and nothing changed) if it cannot."""
        need = self.blocks_for(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        if need <= 0:
            return True
        pool = self.pool
        if pool.num_free < need:
            self.radix.evict(need - pool.num_free)
            if pool.num_free < need:
                return False
        req.block_ids.extend(pool.allocate(need))
        return True

    def cache_computed(self, req: Request, now: float) -> None:
        """Insert ``req``'s newly completed full blocks into the radix tree.

        Where the tree already holds the same tokens (another request computed them at the
        same time), the request switches to the tree's blocks and frees its duplicates, so a
        prefix is never held twice.
        """
        if not self.enable_prefix_caching:
            return
        state = self._state[req.request_id]
        full = req.num_computed_tokens // self.block_size
        if full <= state.num_blocks:
            return
        bs = self.block_size
        start = state.num_blocks
        tokens = req.token_slice(start * bs, full * bs)
        own = req.block_ids[start:full]
        node, held = self.radix.insert(state.node, tokens, own, now)
        if held != own:
            dup = [b for b, h in zip(own, held) if b != h]
            self.pool.incref([h for b, h in zip(own, held) if b != h])
            self.pool.decref(dup)
            req.block_ids[start:full] = held
        self.radix.move_lock(state.node, node)  # node is below state.node: it extends that path
        state.node = node
        state.num_blocks = full

    def release(self, req: Request) -> None:
        """Drop ``req``'s references (finish, abort or preemption). Its full blocks stay in
        the radix tree for whoever needs the prefix next."""
        state = self._state.pop(req.request_id, None)
        if state is not None and self.enable_prefix_caching:
            self.radix.unlock(state.node)
        self.pool.decref(req.block_ids)
        req.block_ids = []
        req.num_computed_tokens = 0  # no K/V of it is held any more

    # ------------------------------------------------------------ views

    def usage(self) -> KVUsage:
        pool = self.pool
        cached = self.radix.num_cached_blocks
        evictable = self.radix.num_evictable_blocks if cached else 0
        used = pool.num_used - evictable
        return KVUsage(pool.num_blocks, pool.num_free, used, cached, evictable)

    def snapshot(self, requests: list[Request]) -> dict:
        """Per block: ``state`` (see ``holder_states``), ``refcount``, ``owners`` (request ids),
        ``tokens`` (the slots holding computed K/V; a tree block is full) and ``reused`` (an
        owner took it from the prefix cache instead of computing it); and the radix summary.
        Cost O(blocks): for dashboards and tests, not for the step loop."""
        blocks = snapshot_blocks(
            self.block_size, requests, self.radix.cached_block_ids(), self.pool.ref_counts
        )
        return {"block_size": self.block_size, "blocks": blocks, "radix": self.radix.summary()}

    def check_invariants(self, requests: list[Request]) -> None:
        """Every reference is accounted for: a block's refcount equals the request tables that
        list it plus one if the tree holds it; free blocks are exactly those with refcount 0.
        Raises AssertionError on the first breach (tests call this after every step)."""
        expected = [0] * self.pool.num_blocks
        for req in requests:
            for b in req.block_ids:
                expected[b] += 1
        for node in self.radix._iter_nodes():
            for b in node.blocks:
                expected[b] += 1
        assert expected == self.pool.ref_counts, "block refcounts disagree with their holders"
        free = self.pool._free
        assert len(set(free)) == len(free), "a block is on the free list twice"
        assert set(free) == {b for b, r in enumerate(expected) if r == 0}, "free list is wrong"
        for req in requests:
            assert len(set(req.block_ids)) == len(req.block_ids), "a request owns a block twice"


# ------------------------------------------------------------ block states


class BlockHolder(Protocol):
    """What a block's state depends on in a request: a ``Request``, or one rebuilt from a
    recording (the dashboard's replay)."""

    request_id: str
    block_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int


def holder_states(holders: Iterable[BlockHolder], block_size: int) -> dict[int, str]:
    """``owned`` or ``shared`` for every block a request holds: the one definition of the two,
    used by the engine snapshot, the dashboard and the simulator's recordings.

    A block is *shared* when more than one request holds it, or when its one holder took it
    from the prefix cache (the first ``num_cached_tokens // block_size`` blocks of its table)
    instead of computing it: K/V computed once, read by a request that did not compute it.
    Otherwise it is *owned*. The radix tree's own reference does not count: every full block
    enters the tree as soon as it fills, so counting it would call nearly every block of a lone
    request shared. The tree shows in ``refcount`` (holders plus one if the tree keeps it) and,
    once no request holds the block, in the state ``cached``."""
    states: dict[int, str] = {}
    for holder in holders:
        hit = holder.num_cached_tokens // block_size
        for i, b in enumerate(holder.block_ids):
            states[b] = "shared" if i < hit or b in states else "owned"
    return states


def snapshot_blocks(
    block_size: int,
    holders: Sequence[BlockHolder],
    tree_blocks: Collection[int],
    refcounts: Sequence[int],
) -> list[dict]:
    """One entry per block (``KVCacheManager.snapshot``'s ``blocks``): ``free`` (refcount 0),
    ``cached`` (held by the radix tree only), else ``owned``/``shared`` by ``holder_states``."""
    owners: dict[int, list[str]] = {}
    filled: dict[int, int] = {}
    reused: set[int] = set()
    for holder in holders:
        hit = holder.num_cached_tokens // block_size  # blocks matched in the tree on admission
        for i, b in enumerate(holder.block_ids):
            owners.setdefault(b, []).append(holder.request_id)
            here = min(block_size, max(0, holder.num_computed_tokens - i * block_size))
            filled[b] = max(filled.get(b, 0), here)
            if i < hit:
                reused.add(b)
    held = holder_states(holders, block_size)
    blocks = []
    for b, refs in enumerate(refcounts):
        state = held.get(b) or ("cached" if refs else "free")
        tokens = 0 if state == "free" else block_size if b in tree_blocks else filled.get(b, 0)
        blocks.append(
            {
                "id": b,
                "state": state,
                "refcount": refs,
                "owners": owners.get(b, []),
                "tokens": tokens,
                "reused": b in reused,
            }
        )
    return blocks
