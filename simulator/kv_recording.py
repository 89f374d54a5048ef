"""``kv_trace.jsonl``: the engine's state over a simulation, for ``yaie dashboard --replay``.

The dashboard replays a recording through the same views as a live server, so a frame must
rebuild what ``LLMEngine.snapshot()`` holds: every block's owners, refcount and tokens, the radix
tree's nodes, the running and waiting requests. Written whole at every sample, that is a copy of
every block table and of the tree's block set: tens of kilobytes a sample for a busy engine, a
gigabyte for a few-thousand-request trace. So the file holds what *changed*, and a byte cap:

- Line 1 is a header: ``format``, ``version``, ``num_blocks``, ``block_size``, ``replicas``,
  ``max_bytes``, ``radix_nodes``.
- Then one frame per recorded sample and replica, a delta against that replica's previous frame
  (the first one against an empty engine). Always there: ``t`` (simulated seconds), ``sample``
  (the sampler's count, with gaps where samples were skipped), ``replica``, ``step``,
  ``running``/``waiting`` (queue lengths), ``free``/``cached``/``owned``/``shared`` (exact block
  counts, by ``yaie.core.kv_manager.holder_states``) and ``batch`` (since the previous frame:
  steps, largest batch, prefill tokens, decode tokens, preemptions). When something changed:
  ``new`` (request id → ``[prompt tokens, arrival]``, once), ``req`` (id → ``[status, output
  tokens, computed tokens, cached tokens]``, when one changed), ``tables`` (id → its whole block
  table, when it was rewritten) or ``grow`` (id → blocks appended to it), ``gone`` (finished
  request ids), ``tree`` (``[added, removed]``: block ids the radix tree took or let go) and
  ``radix`` (its summary: ``cached_blocks``, ``hit_rate``, ``truncated``, ``size`` (nodes) and
  ``nodes``, those that changed as ``[position, id, parent, tokens, blocks, hits, locked]``).
- Block id lists are packed: a run of consecutive ascending ids is its first id and the run's
  length minus one, negated (``[7, 8, 9, 10, 3]`` → ``[7, -3, 3]``). Fresh allocations and
  sorted tree changes are mostly runs.

Refcounts are not stored: by the pool's invariant (``KVCacheManager.check_invariants``) a block's
refcount is the number of block tables listing it, plus one if the tree holds it.

The cap: a delta is as large as the work done since the previous frame, so a heavy trace makes
heavy frames. A sample's frames are written only while the bytes written so far are within the
cap's share of the requests done (finished or refused), ``max_bytes * (done + 1) / (total + 1)``:
frames thin out evenly over a heavy run instead of stopping when the cap is reached, and the
file ends at most one sample's frames past the cap. Skipping a sample loses nothing but its
moment: the next frame's delta covers what changed meanwhile.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from yaie.core.engine import LLMEngine
from yaie.core.kv_manager import holder_states

FORMAT = "yaie-kv-trace"
VERSION = 2
RADIX_NODES = 200  # as many tree nodes as the live snapshot shows
DEFAULT_MAX_BYTES = 8_000_000  # `yaie simulate --record-kv-mb`'s default


def pack(ids: Iterable[int]) -> list[int]:
    """Block ids with runs of consecutive ascending ids shortened (see the module docstring)."""
    out: list[int] = []
    run = 0
    prev = -2
    for b in ids:
        if b == prev + 1:
            run += 1
        else:
            if run:
                out.append(-run)
            out.append(b)
            run = 0
        prev = b
    if run:
        out.append(-run)
    return out


class ReplicaRecorder:
    """One replica's side of the recording: what its previous frame said, to write deltas."""

    def __init__(self, index: int, engine: LLMEngine) -> None:
        self.index = index
        self.engine = engine
        self._views: dict[str, list] = {}
        self._tables: dict[str, list[int]] = {}
        self._tree: set[int] = set()
        self._radix: dict = {}  # the summary's scalars
        self._nodes: list[list] = []
        self._steps_seen = 0
        self._batch = [0, 0, 0, 0, 0]  # steps, largest batch, prefill, decode, preemptions

    def take_steps(self) -> None:
        """Fold the steps since the previous sample into the next frame's ``batch``. Called
        at every sample, written or not: the engine keeps only its most recent steps."""
        engine = self.engine
        new = min(engine.num_steps - self._steps_seen, len(engine.steps))
        self._steps_seen = engine.num_steps
        batch = self._batch
        for s in itertools.islice(reversed(engine.steps), new):
            batch[0] += 1
            batch[1] = max(batch[1], s.num_requests)
            batch[2] += s.num_prefill_tokens
            batch[3] += s.num_decode_tokens
            batch[4] += s.num_preemptions

    def frame(self, now: float, sample: int) -> dict:
        """The replica's state now, as a delta against its previous frame."""
        engine = self.engine
        kv = engine.kv
        live = engine.requests
        states = holder_states(live.values(), kv.block_size)
        held = Counter(states.values())
        free = kv.pool.num_free
        frame: dict = {
            "t": round(now, 6),
            "sample": sample,
            "replica": self.index,
            "step": engine.num_steps,
            "running": engine.num_running,
            "waiting": engine.num_waiting,
            "free": free,
            "cached": kv.num_blocks - free - len(states),
            "owned": held["owned"],
            "shared": held["shared"],
            "batch": self._batch,
        }
        self._batch = [0, 0, 0, 0, 0]
        self._requests(frame)
        self._tree_and_radix(frame)
        return {k: v for k, v in frame.items() if v != {}}

    def _requests(self, frame: dict) -> None:
        live = self.engine.requests
        views, tables = self._views, self._tables
        frame["new"], frame["req"] = new, req = {}, {}
        frame["tables"], frame["grow"] = whole, grow = {}, {}
        gone = [rid for rid in views if rid not in live]
        for rid in gone:
            del views[rid]
            tables.pop(rid, None)
        if gone:
            frame["gone"] = gone
        for rid, r in live.items():
            if rid not in views:
                new[rid] = [r.num_prompt_tokens, round(r.arrival_time, 3)]
            view = [
                r.status.value,
                len(r.output_token_ids),
                r.num_computed_tokens,
                r.num_cached_tokens,
            ]
            if views.get(rid) != view:
                views[rid] = req[rid] = view
            old, table = tables.get(rid, []), r.block_ids
            if table == old:
                continue
            if len(table) > len(old) and table[: len(old)] == old:
                grow[rid] = pack(table[len(old) :])
            else:
                whole[rid] = pack(table)
            tables[rid] = list(table)

    def _tree_and_radix(self, frame: dict) -> None:
        radix = self.engine.kv.radix
        tree = radix.cached_block_ids()
        added, removed = tree - self._tree, self._tree - tree
        if added or removed:
            frame["tree"] = [pack(sorted(added)), pack(sorted(removed))]
            self._tree = tree
        summary = radix.summary(RADIX_NODES)
        nodes = [
            [n["id"], n["parent"], n["tokens"], n["blocks"], n["hits"], int(n["locked"])]
            for n in summary["nodes"]
        ]
        scalars = {k: summary[k] for k in ("cached_blocks", "hit_rate", "truncated")}
        scalars["size"] = len(nodes)
        old = self._nodes
        changed = [[i, *n] for i, n in enumerate(nodes) if i >= len(old) or old[i] != n]
        if changed or scalars != self._radix:
            frame["radix"] = {**scalars, "nodes": changed}
            self._radix, self._nodes = scalars, nodes


class KVRecorder:
    """Writes ``kv_trace.jsonl`` for a simulation, at most about ``max_bytes`` of it."""

    def __init__(
        self,
        path: Path,
        engines: list[LLMEngine],
        num_requests: int,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self.replicas = [ReplicaRecorder(i, e) for i, e in enumerate(engines)]
        self.num_requests = num_requests
        self.max_bytes = max_bytes
        self.samples = 0
        self.written = 0
        self._file = path.open("w")
        kv = engines[0].kv
        self._write(
            {
                "format": FORMAT,
                "version": VERSION,
                "num_blocks": kv.num_blocks,
                "block_size": kv.block_size,
                "replicas": len(engines),
                "max_bytes": max_bytes,
                "radix_nodes": RADIX_NODES,
            }
        )

    def sample(self, now: float, done: int) -> None:
        """One sample: each replica's frame, unless the cap's share for ``done`` requests
        (finished or refused) is spent already."""
        for replica in self.replicas:
            replica.take_steps()
        index = self.samples
        self.samples += 1
        if self.written > self.max_bytes * (done + 1) / (self.num_requests + 1):
            return
        for replica in self.replicas:
            self._write(replica.frame(now, index))

    def close(self) -> None:
        self._file.close()

    def _write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        self._file.write(line)
        self.written += len(line)
