"""BlockPool reference counting and the RadixCache's match / insert / split / evict rules."""

import pytest

from yaie.core.block_pool import BlockPool, NoFreeBlocksError
from yaie.core.radix_cache import RadixCache

BS = 4


def test_pool_allocates_frees_and_counts_references():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2] and pool.num_free == 1
    pool.incref(a[:1])
    pool.decref(a)
    assert pool.num_free == 3 and pool.ref_counts[a[0]] == 1
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(4)
    pool.decref(a[:1])
    assert pool.num_free == 4
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.decref(a[:1])
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(0)


def _cache(num_blocks=16):
    pool = BlockPool(num_blocks)
    return pool, RadixCache(pool, BS)


def _insert(cache, pool, tokens, now=0.0):
    blocks = pool.allocate(len(tokens) // BS)
    node, held = cache.insert(cache.root, tokens, blocks, now)
    pool.decref(blocks)  # the "request" ends; only the tree's references remain
    return blocks, node, held


def test_match_is_block_granular_and_splits_edges():
    pool, cache = _cache()
    seq = list(range(12))
    blocks, _, held = _insert(cache, pool, seq)
    assert held == blocks and all(pool.ref_counts[b] == 1 for b in blocks)
    # 10 tokens match 2 whole blocks; the 3-block edge is split after 2
    got, node = cache.match_prefix(list(range(10)), now=1.0)
    assert got == blocks[:2] and len(node.tokens) == 8
    assert len(cache.root.children) == 1 and len(node.children) == 1
    # a diverging second block shares only the first
    got, _ = cache.match_prefix([0, 1, 2, 3, 9, 9, 9, 9], now=2.0)
    assert got == blocks[:1]
    assert cache.match_prefix([5, 5, 5, 5], 3.0)[0] == []


def test_insert_keeps_existing_blocks_and_reports_them():
    pool, cache = _cache()
    first, _, _ = _insert(cache, pool, list(range(8)))
    dup = pool.allocate(3)
    node, held = cache.insert(cache.root, list(range(8)) + [7, 7, 7, 7], dup, 1.0)
    assert held[:2] == first and held[2] == dup[2]
    assert pool.ref_counts[dup[0]] == 1  # duplicate not adopted by the tree
    assert cache.num_cached_blocks == 3


def test_lru_eviction_respects_locks_and_trims_tails():
    pool, cache = _cache(8)
    a, _, _ = _insert(cache, pool, [1] * 8, now=1.0)  # older
    b, _, _ = _insert(cache, pool, [2] * 12, now=2.0)
    _, node_a = cache.match_prefix([1] * 8, now=3.0)  # a becomes most recent
    cache.lock(node_a)
    assert cache.evict(1) == 1  # tail block of b goes first, a is locked anyway
    assert pool.ref_counts[b[2]] == 0 and pool.ref_counts[b[0]] == 1
    assert cache.evict(10) == 2  # only b's remaining blocks are evictable
    assert all(pool.ref_counts[x] == 1 for x in a)
    cache.unlock(node_a)
    assert cache.evict(10) == 2 and pool.num_free == 8 and cache.num_cached_blocks == 0


def test_eviction_order_is_least_recently_used():
    pool, cache = _cache(8)
    old, _, _ = _insert(cache, pool, [1] * 4, now=1.0)
    new, _, _ = _insert(cache, pool, [2] * 4, now=2.0)
    cache.match_prefix([1] * 4, now=3.0)  # touch the old one
    cache.evict(1)
    assert pool.ref_counts[new[0]] == 0 and pool.ref_counts[old[0]] == 1


def test_unlock_more_than_lock_is_an_error():
    _, cache = _cache()
    pool = cache.pool
    _, node, _ = _insert(cache, pool, [3] * 4)
    with pytest.raises(RuntimeError, match="unlocked more often"):
        cache.unlock(node)
