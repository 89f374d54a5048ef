"""Which blocks hold which request's K/V: the block pool plus the radix prefix cache.

The scheduler asks three questions of it — "what prefix of this prompt is cached?",
"can this request grow by n tokens?", "this request is done (or preempted), release it" — and
after each step tells it how far each request has computed, so full blocks enter the radix tree
at once and requests arriving meanwhile already share them.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        """Per block: ``free``, ``cached`` (tree only), ``owned`` (by request ids) or ``shared``
        (several owners, or an owner plus the tree), with refcounts, ``tokens`` (the slots
        holding computed K/V; a tree block is full) and ``reused`` (an owner took it from the
        prefix cache instead of computing it). Cost O(blocks): for dashboards and tests, not for
        the step loop."""
        bs = self.block_size
        owners: dict[int, list[str]] = {}
        filled: dict[int, int] = {}
        reused: set[int] = set()
        for req in requests:
            hit = req.num_cached_tokens // bs  # blocks matched in the tree on admission
            for i, b in enumerate(req.block_ids):
                owners.setdefault(b, []).append(req.request_id)
                here = min(bs, max(0, req.num_computed_tokens - i * bs))
                filled[b] = max(filled.get(b, 0), here)
                if i < hit:
                    reused.add(b)
        cached = self.radix.cached_block_ids()
        refs = self.pool.ref_counts
        blocks = []
        for b in range(self.pool.num_blocks):
            who = owners.get(b, [])
            if refs[b] == 0:
                state = "free"
            elif not who:
                state = "cached"
            elif len(who) > 1 or b in cached:
                state = "shared"
            else:
                state = "owned"
            tokens = 0 if state == "free" else bs if b in cached else filled.get(b, 0)
            blocks.append(
                {
                    "id": b,
                    "state": state,
                    "refcount": refs[b],
                    "owners": who,
                    "tokens": tokens,
                    "reused": b in reused,
                }
            )
        return {"block_size": bs, "blocks": blocks, "radix": self.radix.summary()}

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
