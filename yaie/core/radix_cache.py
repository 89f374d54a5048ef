"""A radix tree over token ids at block granularity (SGLang's RadixAttention).

Each edge is a run of *full* blocks: ``tokens`` (a multiple of ``block_size``) and the KV blocks
that hold them. A path from the root spells a token prefix whose K/V is already computed, so a
new request can start after the longest path matching its prompt. Nodes on a path in use by a
running request are *locked* (``lock_ref > 0``); unlocked leaves are evicted least recently used
first when the pool runs dry. The tree holds one pool reference per block it stores.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

from yaie.core.block_pool import BlockPool


class RadixNode:
    __slots__ = ("blocks", "children", "hits", "last_access", "lock_ref", "parent", "tokens")

    def __init__(self, parent: RadixNode | None, tokens: list[int], blocks: list[int]) -> None:
        self.parent = parent
        # Children keyed by the token tuple of their first block: siblings never share a first
        # block, otherwise they would have been one edge.
        self.children: dict[tuple[int, ...], RadixNode] = {}
        self.tokens = tokens
        self.blocks = blocks
        self.lock_ref = 0
        self.last_access = 0.0
        self.hits = 0

    @property
    def is_leaf(self) -> bool:
        return not self.children

    def __lt__(self, other: RadixNode) -> bool:  # heap tie-break only
        return id(self) < id(other)


@dataclass(slots=True)
class RadixStats:
    """Prefix-hit statistics: the fraction of looked-up tokens that were found cached."""

    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class RadixCache:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.root = RadixNode(None, [], [])
        self.root.lock_ref = 1  # never evicted
        self.num_cached_blocks = 0
        self.stats = RadixStats()
        # Lazy min-heap of (last_access, seq, node) for unlocked leaves; stale entries are
        # skipped on pop, so updates are O(log n) pushes instead of a rebuild per eviction.
        self._heap: list[tuple[float, int, RadixNode]] = []
        self._seq = itertools.count()
        # Nodes that may have become evictable (or were accessed) since the last eviction, in
        # the order they were touched. They reach the heap only when an eviction needs it: by
        # then most are locked (a request locks the node it has just matched or inserted), so
        # those never cost a push. Bounded by the number of nodes: only evict removes nodes.
        self._touched: dict[RadixNode, None] = {}
        self._num_nodes = 0

    # ----------------------------------------------------------------- lookups

    def match_prefix(self, tokens: list[int], now: float) -> tuple[list[int], RadixNode]:
        """Longest cached prefix of ``tokens`` in whole blocks: its block ids and its last node.

        A match ending inside an edge splits the edge, so the returned node ends exactly where
        the match does and can be locked on its own.
        """
        bs = self.block_size
        node, pos, blocks = self.root, 0, []
        while pos + bs <= len(tokens):
            child = node.children.get(tuple(tokens[pos : pos + bs]))
            if child is None:
                break
            n = self._common_blocks(child, tokens, pos)
            if n < len(child.blocks):
                child = self._split(child, n)
            child.last_access = now
            child.hits += 1
            blocks.extend(child.blocks)
            pos += n * bs
            node = child
        self._touch(node)
        return blocks, node

    def insert(
        self, node: RadixNode, tokens: list[int], blocks: list[int], now: float
    ) -> tuple[RadixNode, list[int]]:
        """Insert ``tokens`` (whole blocks, held in ``blocks``) below ``node``.

        ``node`` must end where ``tokens`` start (a caller inserts after the node it locks).
        Returns the node where the inserted run ends and the block ids the tree holds for the
        run: where the tree already had those tokens its own blocks win, and the caller should
        use them instead of its duplicates (the tree took a reference only to blocks it adopted).
        """
        bs = self.block_size
        pos, held = 0, []
        while pos < len(tokens):
            key = tuple(tokens[pos : pos + bs])
            child = node.children.get(key)
            if child is None:
                leaf = RadixNode(node, tokens[pos:], blocks[pos // bs :])
                leaf.last_access = now
                self.pool.incref(leaf.blocks)
                self.num_cached_blocks += len(leaf.blocks)
                node.children[key] = leaf
                self._num_nodes += 1
                held.extend(leaf.blocks)
                self._touch(leaf)
                return leaf, held
            n = self._common_blocks(child, tokens, pos)
            if n < len(child.blocks):
                child = self._split(child, n)
            child.last_access = now
            held.extend(child.blocks)
            pos += n * bs
            node = child
        self._touch(node)
        return node, held

    # ----------------------------------------------------------------- locking

    def lock(self, node: RadixNode) -> None:
        while node is not None:
            node.lock_ref += 1
            node = node.parent

    def move_lock(self, old: RadixNode, new: RadixNode) -> None:
        """``lock(new)`` then ``unlock(old)`` for ``new`` strictly below ``old``: only the nodes
        from ``new`` up to ``old`` change, so a request growing its cached path one block at a
        time pays for the new nodes, not for the whole path to the root every time. ``old``
        keeps a child, so it is no eviction candidate and needs no touch."""
        while new is not old:
            new.lock_ref += 1
            new = new.parent

    def unlock(self, node: RadixNode) -> None:
        start = node
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref < 0:
                raise RuntimeError("radix node unlocked more often than locked")
            node = node.parent
        self._touch(start)

    # ----------------------------------------------------------------- eviction

    @property
    def num_evictable_blocks(self) -> int:
        """Blocks held only by the tree (refcount 1): what eviction could give back."""
        refs = self.pool.ref_counts
        return sum(1 for node in self._iter_nodes() for b in node.blocks if refs[b] == 1)

    def evict(self, num_blocks: int) -> int:
        """Free at least ``num_blocks`` blocks from unlocked leaves, LRU first (tail blocks of a
        leaf go first, so a long cached prompt loses only what is needed). Returns blocks freed."""
        self._push_touched()
        freed = 0
        heap, pop = self._heap, heapq.heappop
        while freed < num_blocks and heap:
            stamp, _, node = pop(heap)
            # _evictable, inlined: most popped entries are stale and this runs per allocation
            if node.lock_ref or node.children or node.parent is None or stamp != node.last_access:
                continue
            # Evict from this leaf, then on up its chain while each parent left a leaf is the
            # least recently used candidate anyway (strictly older than the heap's top, so it
            # would be popped next): a request's blocks cached one node per step go without a
            # heap push and pop each.
            while True:
                blocks = node.blocks
                take = min(num_blocks - freed, len(blocks))
                self.pool.decref(blocks[len(blocks) - take :])
                self.num_cached_blocks -= take
                freed += take
                if take < len(blocks):
                    del blocks[len(blocks) - take :]
                    del node.tokens[len(node.tokens) - take * self.block_size :]
                    self._push(node)
                    break
                parent = node.parent
                del parent.children[tuple(node.tokens[: self.block_size])]
                node.parent = None  # marks it gone for stale heap entries
                self._num_nodes -= 1
                if (
                    freed < num_blocks
                    and self._evictable(parent)
                    and (not heap or parent.last_access < heap[0][0])
                ):
                    node = parent
                    continue
                self._push(parent)
                break
        return freed

    def reset(self) -> None:
        """Drop every unlocked cached block (e.g. after weights change)."""
        self.evict(self.num_cached_blocks)

    # ----------------------------------------------------------------- views

    def _iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def cached_block_ids(self) -> set[int]:
        return {b for node in self._iter_nodes() for b in node.blocks}

    def summary(self, max_nodes: int = 200) -> dict:
        """A JSON-able view of the tree for dashboards: nodes with token counts, hits, locks."""
        nodes = []
        order = {id(self.root): 0}
        stack = [self.root]
        while stack and len(nodes) < max_nodes:
            node = stack.pop()
            nodes.append(
                {
                    "id": order[id(node)],
                    "parent": order.get(id(node.parent)) if node.parent else None,
                    "tokens": len(node.tokens),
                    "blocks": len(node.blocks),
                    "hits": node.hits,
                    "locked": node.lock_ref > 0 and node is not self.root,
                }
            )
            for child in node.children.values():
                order[id(child)] = len(order)
                stack.append(child)
        return {
            "cached_blocks": self.num_cached_blocks,
            "hit_rate": self.stats.hit_rate,
            "nodes": nodes,
            "truncated": bool(stack),
        }

    # ----------------------------------------------------------------- internals

    def _common_blocks(self, child: RadixNode, tokens: list[int], pos: int) -> int:
        """How many whole blocks of ``child``'s edge equal ``tokens[pos:]`` (at least one: the
        first block is the child's key)."""
        bs = self.block_size
        edge = child.tokens
        limit = min(len(child.blocks), (len(tokens) - pos) // bs)
        if edge[bs : limit * bs] == tokens[pos + bs : pos + limit * bs]:
            return limit  # the usual case, one comparison in C: the whole edge matches
        n = 1
        while n < limit and edge[n * bs : (n + 1) * bs] == tokens[pos + n * bs : pos + (n + 1) * bs]:
            n += 1
        return n

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut ``child``'s edge after ``n`` blocks; the new upper node takes over its place."""
        bs = self.block_size
        parent = child.parent
        upper = RadixNode(parent, child.tokens[: n * bs], child.blocks[:n])
        upper.lock_ref = child.lock_ref  # every lock through child passes through upper
        upper.last_access = child.last_access
        upper.hits = child.hits
        parent.children[tuple(child.tokens[:bs])] = upper
        child.tokens = child.tokens[n * bs :]
        child.blocks = child.blocks[n:]
        child.parent = upper
        upper.children[tuple(child.tokens[:bs])] = child
        self._num_nodes += 1
        return upper

    def _evictable(self, node: RadixNode) -> bool:
        return node.lock_ref == 0 and not node.children and node.parent is not None

    def _touch(self, node: RadixNode) -> None:
        """``node`` may have become an eviction candidate, or was accessed: tell the heap at
        the next eviction (see ``_touched``)."""
        self._touched[node] = None

    def _push_touched(self) -> None:
        for node in self._touched:
            self._push(node)
        self._touched.clear()

    def _push(self, node: RadixNode) -> None:
        if self._evictable(node):
            heapq.heappush(self._heap, (node.last_access, next(self._seq), node))
            if len(self._heap) > 4 * self._num_nodes + 1024:
                self._compact_heap()

    def _compact_heap(self) -> None:
        """Drop stale entries so the heap stays proportional to the tree, not to its history."""
        self._heap = [(n.last_access, next(self._seq), n) for n in self._iter_nodes() if self._evictable(n)]
        heapq.heapify(self._heap)
