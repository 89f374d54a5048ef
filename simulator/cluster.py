"""Routers for a cluster of replicas: which engine serves the next request.

Each replica is a whole engine with its own KV cache, so where a request goes decides both load
balance and whether its prefix is found cached. Three classic policies:

- ``rr``: round-robin; balanced by count, blind to sizes and to caches;
- ``least``: the replica owing the fewest tokens (``Replica.load``: prompts of unfinished
  requests plus output tokens still to generate);
- ``prefix``: the replica whose radix tree already holds the longest prefix of the prompt (as
  SGLang's cache-aware router does), unless that would overload it; ties and misses go to the
  least-loaded replica.

``Simulation`` (driver.py) builds the replicas; ``make_router`` builds a router by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from yaie.core.radix_cache import RadixCache

if TYPE_CHECKING:  # the driver imports simpy; the CLI reads ROUTERS without it
    from yaie.simulator.driver import Replica

ROUTERS = ("rr", "least", "prefix")


class RoundRobinRouter:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: list[Replica], prompt: list[int]) -> Replica:
        replica = replicas[self._next % len(replicas)]
        self._next += 1
        return replica


class LeastLoadRouter:
    """Fewest outstanding tokens; ties (idle replicas, mostly) go round-robin, or a lightly
    loaded cluster would send everything to its first replica."""

    def __init__(self) -> None:
        self._next = 0

    def choose(self, replicas: list[Replica], prompt: list[int]) -> Replica:
        self._next += 1
        return least_loaded(replicas, self._next)


def least_loaded(replicas: list[Replica], rotate: int) -> Replica:
    """The replica with the smallest ``load``; among equals, the first from index ``rotate``."""
    n = len(replicas)
    return min((replicas[(rotate + i) % n] for i in range(n)), key=lambda r: r.load)


@dataclass(slots=True)
class PrefixAwareRouter:
    """Longest cached prefix wins, within a load bound.

    A popular prefix would otherwise pull every request onto the one replica that cached it;
    so the best-matching replica is used only while its load is at most ``balance`` times the
    least-loaded replica's plus ``slack`` tokens. Matching reads the trees without touching them
    (no LRU update, no edge split): routing must not change what the engines cache.
    """

    balance: float = 2.0
    slack: int = 8192
    _next: int = 0

    def choose(self, replicas: list[Replica], prompt: list[int]) -> Replica:
        self._next += 1
        least = least_loaded(replicas, self._next)
        best, best_len = least, 0
        for replica in replicas:
            n = cached_prefix_len(replica.engine.kv.radix, prompt)
            if n > best_len or (n == best_len and n > 0 and replica.load < best.load):
                best, best_len = replica, n
        if best_len == 0 or best.load > self.balance * least.load + self.slack:
            return least
        return best


def cached_prefix_len(radix: RadixCache, tokens: list[int]) -> int:
    """Tokens of ``tokens`` that ``radix`` holds, in whole blocks (read-only ``match_prefix``)."""
    bs = radix.block_size
    node, pos, n = radix.root, 0, len(tokens)
    while pos + bs <= n:
        child = node.children.get(tuple(tokens[pos : pos + bs]))
        if child is None:
            break
        edge, limit = child.tokens, min(len(child.blocks), (n - pos) // bs)
        k = limit  # usually the whole edge matches: one comparison
        if edge[bs : limit * bs] != tokens[pos + bs : pos + limit * bs]:
            k = 1  # the first block is the child's key: it matches; a later one does not
            while edge[k * bs : (k + 1) * bs] == tokens[pos + k * bs : pos + (k + 1) * bs]:
                k += 1
        pos += k * bs
        if k < len(child.blocks):
            break
        node = child
    return pos


def make_router(name: str) -> RoundRobinRouter | LeastLoadRouter | PrefixAwareRouter:
    routers = {"rr": RoundRobinRouter, "least": LeastLoadRouter, "prefix": PrefixAwareRouter}
    try:
        return routers[name]()
    except KeyError:
        raise ValueError(f"unknown router {name!r}; choose one of {', '.join(ROUTERS)}") from None
