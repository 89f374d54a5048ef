"""Request traces: the project's JSONL format, readers for public traces, synthetic generators,
and the deterministic token ids that let the radix cache see a trace's prefix sharing.

A trace only says *when* requests arrive and *how long* they are; which tokens they share is
given as prefix structure (Mooncake ``hash_ids``, or named prefix groups). ``PromptSynth``
turns that structure into token ids: equal ids give equal tokens, different ids give tokens that
never collide, so the simulated engine's radix cache hits exactly where real prompts would.
The format is documented in ``traces/README.md``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger(__name__)

MOONCAKE_BLOCK = 512  # tokens per hash id in the Mooncake traces
FORMATS = ("jsonl", "azure", "mooncake")


@dataclass(slots=True)
class TraceRequest:
    """One request of a trace.

    ``hash_ids``: one id per ``hash_block`` prompt tokens (the last block may be partial); equal
    ids mean an equal reusable prefix block, as in the Mooncake traces. ``prefix_groups``: named
    segments ``(group id, tokens)`` that make up the start of the prompt in order (a shared system
    prompt, then a conversation's earlier turns); the rest of the prompt is this request's own.
    ``reply_group``: the output is that segment's tokens, so a later turn that re-sends the reply
    as history finds it in the cache. ``prompt`` is optional text for replaying on a real model.
    """

    arrival: float  # seconds from the start of the trace
    input_len: int
    output_len: int
    hash_ids: list[int] | None = None
    prefix_groups: list[tuple[str, int]] | None = None
    reply_group: str | None = None
    prompt: str | None = None
    request_id: str | None = None

    def to_json(self) -> dict:
        rec: dict = {
            "arrival": round(self.arrival, 6),
            "input_len": self.input_len,
            "output_len": self.output_len,
        }
        if self.request_id is not None:
            rec["id"] = self.request_id
        if self.hash_ids is not None:
            rec["hash_ids"] = self.hash_ids
        if self.prefix_groups is not None:
            rec["prefix_groups"] = [[g, n] for g, n in self.prefix_groups]
        if self.reply_group is not None:
            rec["reply_group"] = self.reply_group
        if self.prompt is not None:
            rec["prompt"] = self.prompt
        return rec


@dataclass(slots=True)
class Trace:
    """Requests sorted by arrival, plus what loading did to them (the report prints ``notes``)."""

    requests: list[TraceRequest]
    source: str
    hash_block: int = MOONCAKE_BLOCK
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def span(self) -> float:
        return self.requests[-1].arrival - self.requests[0].arrival if self.requests else 0.0


@dataclass(slots=True)
class LoadOptions:
    """How to cut and reshape a trace while loading it.

    ``window=(start, end)`` keeps arrivals in ``[start, end)`` seconds and re-bases them to 0;
    ``rate_scale`` > 1 compresses time (2 = twice the request rate); ``input_scale`` multiplies
    prompt lengths and the hash block with them, so prefix sharing keeps its shape at a size a
    small model can hold; ``max_input_len`` / ``max_output_len`` clip lengths; ``limit`` keeps the
    first n requests after the window.
    """

    window: tuple[float, float] | None = None
    rate_scale: float = 1.0
    input_scale: float = 1.0
    max_input_len: int | None = None
    max_output_len: int | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.rate_scale <= 0:
            raise ValueError(f"rate scale must be > 0, got {self.rate_scale}")
        if self.input_scale <= 0:
            raise ValueError(f"input scale must be > 0, got {self.input_scale}")
        for name in ("max_input_len", "max_output_len", "limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {value}")
        if self.window is not None and not self.window[0] < self.window[1]:
            raise ValueError(f"the time window must have start < end, got {self.window}")


# ---------------------------------------------------------------------------- readers


def detect_format(path: Path) -> str:
    """``azure`` for a CSV; for JSONL, ``mooncake`` if the first record has Mooncake's keys."""
    if path.suffix.lower() == ".csv":
        return "azure"
    with path.open() as f:
        for line in f:
            if line.strip():
                try:
                    first = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}: the first line is not JSON ({exc.msg})") from None
                return "mooncake" if isinstance(first, dict) and "timestamp" in first else "jsonl"
    raise ValueError(f"{path} is empty")


def load_trace(path: str | Path, fmt: str = "auto", options: LoadOptions | None = None) -> Trace:
    """Read a trace file in any supported format and apply ``options``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    readers = {"jsonl": read_jsonl, "azure": read_azure, "mooncake": read_mooncake}
    if fmt not in readers:
        raise ValueError(f"unknown trace format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    trace = readers[fmt](path)
    return apply_options(trace, options or LoadOptions())


def read_jsonl(path: Path) -> Trace:
    """The project's own format (``traces/README.md``)."""
    requests = []
    hash_block = MOONCAKE_BLOCK
    for lineno, rec in _json_lines(path):
        if "hash_block" in rec and "arrival" not in rec:  # header line
            hash_block = _positive_int(rec["hash_block"], path, lineno, "hash_block")
            continue
        try:
            groups = rec.get("prefix_groups")
            requests.append(
                TraceRequest(
                    arrival=float(rec["arrival"]),
                    input_len=_positive_int(rec["input_len"], path, lineno, "input_len"),
                    output_len=_positive_int(rec["output_len"], path, lineno, "output_len"),
                    hash_ids=[int(h) for h in rec["hash_ids"]] if "hash_ids" in rec else None,
                    prefix_groups=[(str(g), int(n)) for g, n in groups] if groups else None,
                    reply_group=rec.get("reply_group"),
                    prompt=rec.get("prompt"),
                    request_id=str(rec["id"]) if "id" in rec else None,
                )
            )
        except KeyError as exc:
            raise ValueError(f"{path}:{lineno}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: bad record ({exc})") from None
    return _sorted(Trace(requests, str(path), hash_block))


def read_mooncake(path: Path) -> Trace:
    """Mooncake FAST'25 JSONL: ``timestamp`` in ms, lengths in tokens, 512-token ``hash_ids``."""
    requests = []
    for lineno, rec in _json_lines(path):
        try:
            requests.append(
                TraceRequest(
                    arrival=float(rec["timestamp"]) / 1000.0,
                    input_len=_positive_int(rec["input_length"], path, lineno, "input_length"),
                    output_len=max(1, int(rec["output_length"])),
                    hash_ids=[int(h) for h in rec.get("hash_ids", ())] or None,
                )
            )
        except KeyError as exc:
            raise ValueError(f"{path}:{lineno}: missing field {exc.args[0]!r}") from None
    return _sorted(Trace(requests, str(path), MOONCAKE_BLOCK))


def read_azure(path: Path) -> Trace:
    """Azure LLM inference CSV (2023): ``TIMESTAMP`` wall clock, ``ContextTokens``,
    ``GeneratedTokens``. Times become seconds from the first request; no prefix structure."""
    requests = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        needed = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise ValueError(f"{path}: not an Azure trace CSV (need columns {sorted(needed)})")
        t0 = None
        for lineno, row in enumerate(reader, start=2):
            try:
                t = _parse_wall_clock(row["TIMESTAMP"])
                t0 = t if t0 is None else t0
                requests.append(
                    TraceRequest(
                        arrival=t - t0,
                        input_len=_positive_int(
                            int(row["ContextTokens"]), path, lineno, "ContextTokens"
                        ),
                        output_len=max(1, int(row["GeneratedTokens"])),
                    )
                )
            except ValueError as exc:
                raise ValueError(f"{path}:{lineno}: bad row ({exc})") from None
    trace = _sorted(Trace(requests, str(path)))
    if trace.requests and trace.requests[0].arrival < 0:  # file not in time order
        first = trace.requests[0].arrival
        for r in trace.requests:
            r.arrival -= first
    return trace


def _parse_wall_clock(text: str) -> float:
    """'2023-11-16 18:15:46.6805900' → POSIX seconds. Seven fractional digits (.NET ticks) are
    more than ``fromisoformat`` takes on older Pythons, so the fraction is parsed by hand."""
    base, _, frac = text.strip().partition(".")
    seconds = datetime.fromisoformat(base).replace(tzinfo=timezone.utc).timestamp()  # no DST jumps
    return seconds + (float("0." + frac) if frac else 0.0)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            yield lineno, rec


def _positive_int(value: object, path: Path, lineno: int, name: str) -> int:
    n = int(value)  # type: ignore[arg-type]
    if n < 1:
        raise ValueError(f"{path}:{lineno}: {name} must be >= 1, got {n}")
    return n


def _sorted(trace: Trace) -> Trace:
    trace.requests.sort(key=lambda r: r.arrival)  # stable: equal times keep file order
    return trace


# ---------------------------------------------------------------------------- reshaping


def apply_options(trace: Trace, opts: LoadOptions) -> Trace:
    """Window, rescale and clip (the requests are changed in place); every change that alters
    the workload goes into ``notes``, which the report prints."""
    reqs = trace.requests
    notes = list(trace.notes)
    if opts.window is not None:
        start, end = opts.window
        reqs = [r for r in reqs if start <= r.arrival < end]
        for r in reqs:
            r.arrival -= start
        notes.append(f"time window [{start:g}, {end:g}) s: {len(reqs)} of {len(trace)} requests")
    if opts.limit is not None and len(reqs) > opts.limit:
        notes.append(f"first {opts.limit} of {len(reqs)} requests")
        reqs = reqs[: opts.limit]
    if opts.rate_scale != 1.0:
        for r in reqs:
            r.arrival /= opts.rate_scale
        notes.append(f"arrival rate x{opts.rate_scale:g} (times divided by {opts.rate_scale:g})")
    hash_block = trace.hash_block
    if opts.input_scale != 1.0:
        hash_block = max(1, round(trace.hash_block * opts.input_scale))
        for r in reqs:
            r.input_len = max(1, round(r.input_len * opts.input_scale))
            if r.prefix_groups:
                r.prefix_groups = [
                    (g, max(1, round(n * opts.input_scale))) for g, n in r.prefix_groups
                ]
        notes.append(
            f"input lengths x{opts.input_scale:g} "
            f"(hash block {trace.hash_block} -> {hash_block} tokens)"
        )
    if opts.max_input_len is not None:
        clipped, removed = _clip_lengths(reqs, "input_len", opts.max_input_len)
        if clipped:
            notes.append(
                f"{clipped} of {len(reqs)} prompts clipped to {opts.max_input_len} tokens "
                f"({removed:,} tokens cut, "
                f"{removed / max(1, sum(r.input_len for r in reqs) + removed):.1%})"
            )
    if opts.max_output_len is not None:
        clipped, removed = _clip_lengths(reqs, "output_len", opts.max_output_len)
        if clipped:
            notes.append(
                f"{clipped} of {len(reqs)} outputs clipped to {opts.max_output_len} tokens "
                f"({removed:,} tokens cut)"
            )
    for r in reqs:  # prefix structure never reaches past the (possibly clipped) prompt
        if r.hash_ids is not None:
            r.hash_ids = r.hash_ids[: -(-r.input_len // hash_block)]
        if r.prefix_groups:
            r.prefix_groups = _clip_groups(r.prefix_groups, r.input_len)
    return Trace(reqs, trace.source, hash_block, notes)


def _clip_lengths(reqs: list[TraceRequest], attr: str, limit: int) -> tuple[int, int]:
    """Cut each request's ``attr`` (``input_len`` or ``output_len``) down to ``limit`` tokens,
    in place; return how many requests were cut and how many tokens that removed, for the note
    that tells the report how far the clipped trace is from the original."""
    clipped = removed = 0
    for r in reqs:
        n = getattr(r, attr)
        if n > limit:
            clipped += 1
            removed += n - limit
            setattr(r, attr, limit)
    return clipped, removed


def _clip_groups(groups: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    out, used = [], 0
    for g, n in groups:
        if used >= limit:
            break
        out.append((g, min(n, limit - used)))
        used += out[-1][1]
    return out


def write_jsonl(
    trace: Trace | Iterable[TraceRequest], path: str | Path, hash_block: int | None = None
) -> None:
    """Write the project's JSONL; a header line records a non-default hash block size."""
    if isinstance(trace, Trace):
        hash_block = trace.hash_block if hash_block is None else hash_block
        requests: Iterable[TraceRequest] = trace.requests
    else:
        requests = trace
    with Path(path).open("w") as f:
        if hash_block is not None and hash_block != MOONCAKE_BLOCK:
            f.write(json.dumps({"hash_block": hash_block}) + "\n")
        for r in requests:
            f.write(json.dumps(r.to_json(), separators=(",", ":")) + "\n")


# ---------------------------------------------------------------------------- token ids


class PromptSynth:
    """Deterministic token ids for a trace's prompts (and replies).

    Every named piece of text — a hash block, a prefix group, one request's own tail — maps to
    a fixed pseudo-random token stream drawn from SHAKE-128 of its name, so the same name gives
    the same tokens in any run, process or machine (Python's ``hash`` of a string would not).
    A shorter piece of the same name is a prefix of a longer one, so Mooncake's partial last
    blocks agree with the full ones. Ids are 14-bit, below every real vocabulary, so the same
    prompts can later be fed to a real model.
    """

    __slots__ = ("hash_block", "_namespace")

    _MAX_CHUNK = 1 << 16  # tokens per SHAKE call; longer pieces are drawn in chunks
    _MASK = int.from_bytes(b"\xff\x3f" * _MAX_CHUNK, "little")

    def __init__(self, hash_block: int = MOONCAKE_BLOCK, namespace: str = "yaie") -> None:
        if hash_block < 1:
            raise ValueError(f"hash block must be >= 1 token, got {hash_block}")
        self.hash_block = hash_block
        self._namespace = namespace

    def piece(self, name: str, length: int) -> list[int]:
        """The first ``length`` tokens of the stream named ``name``."""
        out: list[int] = []
        chunk = 0
        while len(out) < length:
            n = min(length - len(out), self._MAX_CHUNK)
            key = f"{self._namespace}/{name}/{chunk}".encode()
            raw = hashlib.shake_128(key).digest(2 * n)
            masked = (int.from_bytes(raw, "little") & self._MASK).to_bytes(2 * n, "little")
            out.extend(memoryview(masked).cast("H").tolist())
            chunk += 1
        return out

    def prompt(self, req: TraceRequest, index: int) -> list[int]:
        """Prompt tokens for the ``index``-th request of its trace."""
        tokens: list[int] = []
        if req.hash_ids:
            bs = self.hash_block
            for h in req.hash_ids:
                tokens += self.piece(f"h{h}", min(bs, req.input_len - len(tokens)))
        elif req.prefix_groups:
            for g, n in req.prefix_groups:
                tokens += self.piece(f"g{g}", min(n, req.input_len - len(tokens)))
        if len(tokens) < req.input_len:
            tokens += self.piece(f"r{index}", req.input_len - len(tokens))
        return tokens

    def reply(self, req: TraceRequest) -> list[int] | None:
        """The output tokens a request should produce, when its reply is a named segment."""
        return self.piece(f"g{req.reply_group}", req.output_len) if req.reply_group else None


# ---------------------------------------------------------------------------- generators


@dataclass(slots=True)
class LengthDist:
    """Token lengths: lognormal around ``mean`` with log-space spread ``sigma`` (0 = constant),
    or drawn from ``empirical`` values; always clipped to ``[low, high]``."""

    mean: float = 256.0
    sigma: float = 0.8
    low: int = 1
    high: int = 8192
    empirical: list[int] | None = None

    def __post_init__(self) -> None:
        if self.empirical is None and self.mean < 1:
            raise ValueError(f"mean length must be >= 1, got {self.mean}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if not 1 <= self.low <= self.high:
            raise ValueError(f"need 1 <= low <= high, got {self.low}, {self.high}")
        if self.empirical is not None and not self.empirical:
            raise ValueError("an empirical length distribution needs at least one value")

    def sample(self, rng: random.Random) -> int:
        if self.empirical is not None:
            n = rng.choice(self.empirical)
        else:
            # E[lognormal(mu, sigma)] = exp(mu + sigma²/2): choose mu so the mean is `mean`.
            mu = math.log(self.mean) - self.sigma**2 / 2
            n = round(rng.lognormvariate(mu, self.sigma)) if self.sigma else round(self.mean)
        return min(self.high, max(self.low, n))


@dataclass(slots=True)
class Arrivals:
    """Inter-arrival times at ``rate`` requests/s: Poisson (``cv == 1``) or Gamma with
    coefficient of variation ``cv`` (> 1 is bursty: the same mean rate in clumps)."""

    rate: float = 10.0
    cv: float = 1.0

    def __post_init__(self) -> None:
        if self.rate <= 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if self.cv <= 0:
            raise ValueError(f"cv must be > 0, got {self.cv}")

    def gap(self, rng: random.Random) -> float:
        if self.cv == 1.0:
            return rng.expovariate(self.rate)
        shape = 1.0 / self.cv**2
        return rng.gammavariate(shape, 1.0 / (shape * self.rate))


def generate(
    num_requests: int,
    arrivals: Arrivals,
    input_len: LengthDist,
    output_len: LengthDist,
    seed: int = 0,
    num_prefix_groups: int = 0,
    prefix_len: int = 0,
) -> Trace:
    """Independent requests; with ``num_prefix_groups`` > 0 each starts with one of that many
    shared system prompts of ``prefix_len`` tokens (chosen uniformly) before its own input."""
    if num_requests < 1:
        raise ValueError(f"number of requests must be >= 1, got {num_requests}")
    if num_prefix_groups and prefix_len < 1:
        raise ValueError("shared prefix groups need a prefix length >= 1")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for i in range(num_requests):
        t += arrivals.gap(rng)
        n_in = input_len.sample(rng)
        groups = None
        if num_prefix_groups:
            groups = [(f"sys{rng.randrange(num_prefix_groups)}", prefix_len)]
            n_in += prefix_len
        out.append(
            TraceRequest(t, n_in, output_len.sample(rng), prefix_groups=groups, request_id=str(i))
        )
    kind = "Poisson" if arrivals.cv == 1.0 else f"Gamma (cv={arrivals.cv:g})"
    note = (
        f"generated: {num_requests} requests, {kind} arrivals at {arrivals.rate:g}/s, seed {seed}"
    )
    return Trace(out, "generated", notes=[note])


def generate_conversations(
    num_conversations: int,
    arrivals: Arrivals,
    turns: float,
    user_len: LengthDist,
    reply_len: LengthDist,
    think_time: float = 20.0,
    system_len: int = 0,
    num_system_prompts: int = 1,
    max_context: int = 8192,
    seed: int = 0,
) -> Trace:
    """Multi-turn chats: conversations start at ``arrivals``; each has a geometric number of
    turns (mean ``turns``) spaced by exponential think times (mean ``think_time`` s). Turn k's
    prompt re-sends the whole history — system prompt, every earlier user message and reply —
    then the new message, as a chat API does, so each turn can reuse the previous turn's KV.
    A conversation ends early when its next prompt would not fit in ``max_context`` tokens."""
    if num_conversations < 1:
        raise ValueError(f"number of conversations must be >= 1, got {num_conversations}")
    if turns < 1:
        raise ValueError(f"mean turns per conversation must be >= 1, got {turns}")
    if think_time < 0:
        raise ValueError(f"think time must be >= 0 s, got {think_time}")
    rng = random.Random(seed)
    t = 0.0
    out = []
    for c in range(num_conversations):
        t += arrivals.gap(rng)
        history: list[tuple[str, int]] = []
        if system_len:
            history.append((f"sys{rng.randrange(num_system_prompts)}", system_len))
        arrival = t
        turn = 0
        while True:
            msg = (f"c{c}u{turn}", user_len.sample(rng))
            reply = (f"c{c}a{turn}", reply_len.sample(rng))
            prompt = history + [msg]
            n_in = sum(n for _, n in prompt)
            if n_in + reply[1] > max_context:
                break
            out.append(
                TraceRequest(
                    arrival,
                    n_in,
                    reply[1],
                    prefix_groups=prompt,
                    reply_group=reply[0],
                    request_id=f"c{c}t{turn}",
                )
            )
            history = prompt + [reply]
            turn += 1
            if rng.random() < 1 / turns:  # geometric number of turns, mean `turns`
                break
            arrival += rng.expovariate(1 / think_time) if think_time else 0.0
    out.sort(key=lambda r: r.arrival)
    note = (
        f"generated: {num_conversations} conversations ({len(out)} turns), "
        f"{arrivals.rate:g} conversations/s, seed {seed}"
    )
    return Trace(out, "generated", notes=[note])
