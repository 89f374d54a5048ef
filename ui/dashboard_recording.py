"""A simulation's ``kv_trace.jsonl`` read back as engine snapshots, for the dashboard's replay.

``yaie.simulator.kv_recording`` writes the file (its docstring is the format): frames that are
deltas. Here they are applied in order to rebuild one replica's state, and each frame becomes the
shape ``LLMEngine.snapshot()`` has (``time``, ``kv``, ``running``, ``waiting``), its blocks
built by the core's own ``snapshot_blocks``, so a replay is drawn by the live dashboard's code
and a block is ``shared`` by the same rule. Only the state of one frame per replica is kept: the
slider mostly moves forward, one delta at a time; a jump back starts again from the first frame,
which for a recording under its size cap takes a fraction of a second.
"""

from __future__ import annotations

import csv
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from yaie.core.kv_manager import snapshot_blocks

FORMAT, VERSION = "yaie-kv-trace", 2
NODE_FIELDS = ("id", "parent", "tokens", "blocks", "hits", "locked")


class RecordingError(ValueError):
    """A path that holds no recording this version can read: one clear line for the user."""


def unpack(packed: list[int]) -> list[int]:
    """Block ids from their packed form: a negative ``-n`` after an id stands for the ``n``
    consecutive ids that follow it."""
    out: list[int] = []
    for x in packed:
        if x < 0:
            start = out[-1] + 1
            out.extend(range(start, start - x))
        else:
            out.append(x)
    return out


@dataclass(slots=True)
class Holder:
    """A request rebuilt from a recording, with what ``snapshot_blocks`` reads of a request."""

    request_id: str
    block_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int


@dataclass(slots=True)
class _State:
    """One replica's engine state as of frame ``index`` (-1: before the first)."""

    index: int = -1
    static: dict[str, list] = field(default_factory=dict)  # id → [prompt tokens, arrival]
    views: dict[str, list] = field(default_factory=dict)  # id → [status, output, computed, cached]
    tables: dict[str, list[int]] = field(default_factory=dict)
    tree: set[int] = field(default_factory=set)
    radix: dict = field(default_factory=dict)
    nodes: list[list] = field(default_factory=list)

    def apply(self, frame: dict) -> None:
        for rid in frame.get("gone", ()):
            del self.static[rid], self.views[rid]
            self.tables.pop(rid, None)
        self.static.update(frame.get("new", {}))
        self.views.update(frame.get("req", {}))
        for rid, packed in frame.get("tables", {}).items():
            self.tables[rid] = unpack(packed)
        for rid, packed in frame.get("grow", {}).items():
            self.tables.setdefault(rid, []).extend(unpack(packed))
        if "tree" in frame:
            added, removed = frame["tree"]
            self.tree.difference_update(unpack(removed))
            self.tree.update(unpack(added))
        if "radix" in frame:
            radix = dict(frame["radix"])
            changed = radix.pop("nodes")
            del self.nodes[radix["size"] :]
            for position, *node in changed:
                if position < len(self.nodes):
                    self.nodes[position] = node
                else:
                    self.nodes.append(node)
            self.radix = radix
        self.index += 1

    def snapshot(self, time: float, num_blocks: int, block_size: int) -> dict:
        holders = [
            Holder(rid, table, self.views[rid][2], self.views[rid][3])
            for rid, table in self.tables.items()
        ]
        # By the pool's invariant: one reference per block table listing it, one for the tree.
        refcounts = [0] * num_blocks
        for b in self.tree:
            refcounts[b] += 1
        for holder in holders:
            for b in holder.block_ids:
                refcounts[b] += 1
        radix = {k: v for k, v in self.radix.items() if k != "size"}
        radix["nodes"] = [
            {**dict(zip(NODE_FIELDS, node)), "locked": bool(node[5])} for node in self.nodes
        ]
        requests = [self._request_view(rid) for rid in self.views]
        return {
            "time": time,
            "kv": {
                "block_size": block_size,
                "blocks": snapshot_blocks(block_size, holders, self.tree, refcounts),
                "radix": radix,
            },
            "running": [r for r in requests if r["status"] == "running"],
            "waiting": [r for r in requests if r["status"] != "running"],
        }

    def _request_view(self, rid: str) -> dict:
        """``LLMEngine.snapshot()``'s view of a request."""
        status, output, computed, cached = self.views[rid]
        prompt, arrival = self.static[rid]
        return {
            "id": rid,
            "status": status,
            "prompt_tokens": prompt,
            "output_tokens": output,
            "computed_tokens": computed,
            "cached_tokens": cached,
            "blocks": len(self.tables.get(rid, ())),
            "arrival": arrival,
        }


class Recording:
    """A simulation's ``kv_trace.jsonl`` and, beside it, ``requests.csv`` (TTFT and TPOT)."""

    def __init__(self, path: Path, header: dict, frames: list[dict], finished: list[dict]):
        self.path = path
        self.header = header
        self.replicas = int(header["replicas"])
        self._frames = [[f for f in frames if f["replica"] == r] for r in range(self.replicas)]
        self.finished = finished  # per request: end time, ttft, tpot (seconds)
        self._states = [_State() for _ in range(self.replicas)]
        self._lock = threading.Lock()  # Gradio serves each browser session from its own thread

    @classmethod
    def load(cls, path: Path) -> Recording:
        file = path / "kv_trace.jsonl" if path.is_dir() else path
        if not file.is_file():
            raise RecordingError(
                f"{path}: no kv_trace.jsonl; record one with "
                "`yaie simulate TRACE --out DIR --record-kv`"
            )
        with file.open() as f:
            try:
                header = json.loads(f.readline())
                frames = [json.loads(line) for line in f if line.strip()]
            except json.JSONDecodeError as exc:
                raise RecordingError(f"{file}: not a KV recording ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise RecordingError(f"{file}: not a KV recording (no {FORMAT} header)")
        if header.get("version") != VERSION:
            raise RecordingError(
                f"{file}: a version {header.get('version')} recording; this yaie reads version "
                f"{VERSION}: record it again with `yaie simulate --record-kv`"
            )
        if not frames:
            raise RecordingError(f"{file}: a KV recording without frames")
        return cls(file, header, frames, _finished_requests(file.parent / "requests.csv"))

    @property
    def num_blocks(self) -> int:
        return int(self.header["num_blocks"])

    @property
    def block_size(self) -> int:
        return int(self.header["block_size"])

    def frames_of(self, replica: int) -> list[dict]:
        """The replica's frames as recorded: deltas, with exact counts and ``batch``."""
        return self._frames[replica]

    def snapshot(self, index: int, replica: int = 0) -> dict:
        """The replica's engine state at frame ``index``, shaped as ``LLMEngine.snapshot()``."""
        frames = self._frames[replica]
        with self._lock:
            state = self._states[replica]
            if state.index > index:
                state = self._states[replica] = _State()
            while state.index < index:
                state.apply(frames[state.index + 1])
            return state.snapshot(frames[index]["t"], self.num_blocks, self.block_size)


def _finished_requests(path: Path) -> list[dict]:
    """TTFT/TPOT per request from the simulation report, keyed by when the request ended."""
    if not path.is_file():
        return []
    out = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("e2e_s"):
                continue
            out.append(
                {
                    "end": float(row["arrival_s"]) + float(row["e2e_s"]),
                    "ttft": float(row["ttft_s"]) if row.get("ttft_s") else None,
                    "tpot": float(row["tpot_s"]) if row.get("tpot_s") else None,
                }
            )
    return out
