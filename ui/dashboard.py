"""The KV-cache dashboard: watch paged attention and prefix sharing happen.

Two sources feed the same views through the same code (``render``), both as the engine's
snapshot (``LLMEngine.snapshot()``). Live, a running server's ``GET /engine/state`` (the snapshot
plus model and counters) is polled about once a second; each browser session keeps its own short
history for the over-time charts. Replayed, a simulation's ``kv_trace.jsonl`` (``yaie simulate
--out DIR --record-kv``) is rebuilt frame by frame into snapshots (``dashboard_recording.py``)
and scrubbed with a slider or played. A block's state (free, cached, owned, shared) is the
snapshot's, defined once in ``yaie.core.kv_manager.holder_states``.

All the work happens on the Python side: the block map is one SVG whose cells carry a
``data-state`` and a ``<title>`` (the hover), the radix tree and the request table are plain
HTML, the charts are small data frames. The browser only draws, so the page stays responsive
however large the pool. One SVG element per block would not: a pool of 100,000 blocks becomes at
most ``MAX_CELLS`` cells, each standing for a run of neighbouring blocks and coloured by the
state most of them are in, and the caption says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import zlib
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from html import escape
from itertools import pairwise
from typing import Any
from urllib.parse import unquote

import gradio as gr
import httpx
import orjson
import pandas as pd

from yaie.ui.dashboard_recording import Recording

logger = logging.getLogger(__name__)

MAX_CELLS = 4096  # a 64 x 64 grid; beyond this a cell stands for several blocks
# Big squares for a small pool, 64 x 64 small ones at most.
GRIDS = ((512, 32, 24), (MAX_CELLS, 64, 14))  # (up to this many cells, columns, pitch)
HISTORY = 600  # live points kept per browser session: ten minutes at one poll a second
RECENT_STEPS = 200  # steps shown in the batch charts
STATES = ("free", "cached", "owned", "shared")  # also the tie-break order when aggregating
FREE_COLOUR = "#e5e7eb"
CACHED_COLOUR = "#94a3b8"

Scope = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]
]


class DashboardError(ValueError):
    """Something the user can fix (a wrong URL or API key)."""


def request_colour(request_id: str) -> str:
    """One hue per request, the same on every poll. Violets are kept for shared blocks."""
    hue = zlib.crc32(request_id.encode()) % 300
    return f"hsl({hue + 60 if hue >= 240 else hue},70%,50%)"


def shared_colour(refcount: int) -> str:
    """Violet, darker the more holders (requests and the tree) a block has."""
    light = 66 - 10 * (max(2, refcount) - 2)
    return f"hsl(270,60%,{max(light, 22)}%)"


# ------------------------------------------------------------------------------ block map


@dataclass(slots=True)
class Cell:
    """One square of the map: a block, or a run of neighbouring blocks in an aggregated map."""

    first: int  # first block id
    count: int  # how many blocks it stands for
    state: str  # the state most of them are in
    owners: list[str]  # requests holding them, those with most blocks first
    refcount: int  # highest reference count among them
    tokens: int  # K/V slots filled in them
    mix: dict[str, int]  # blocks per state, for a cell of several blocks

    @property
    def colour(self) -> str:
        if self.state == "owned":
            return request_colour(self.owners[0])
        if self.state == "shared":
            return shared_colour(self.refcount)
        return CACHED_COLOUR if self.state == "cached" else FREE_COLOUR

    def title(self, block_size: int) -> str:
        if self.count == 1:
            in_tree = self.refcount > max(len(self.owners), 1)
            how = ", in the radix tree" if in_tree else ""
            if self.state == "shared" and len(self.owners) == 1:
                how = ", reused from the prefix cache"
            lines = [f"block {self.first}: {self.state}{how}"]
        else:
            mix = ", ".join(f"{n} {s}" for s, n in self.mix.items()) or f"mostly {self.state}"
            lines = [f"blocks {self.first}-{self.first + self.count - 1}: {mix}"]
        if self.owners:
            more = f" and {len(self.owners) - 5} more" if len(self.owners) > 5 else ""
            lines.append("owners: " + ", ".join(self.owners[:5]) + more)
        lines.append(
            f"refcount {self.refcount}" if self.count == 1 else f"max refcount {self.refcount}"
        )
        lines.append(f"{self.tokens}/{self.count * block_size} tokens")
        return "\n".join(lines)


@dataclass(slots=True)
class BlockMap:
    num_blocks: int
    block_size: int
    counts: dict[str, int]  # exact blocks per state over the whole pool
    cells: list[Cell]

    @classmethod
    def from_snapshot(cls, kv: dict) -> BlockMap:
        """From the engine snapshot's ``kv`` (one entry per block), live or replayed."""
        blocks = kv["blocks"]
        states = [b["state"] for b in blocks]
        counts = Counter(states)
        n = len(blocks)
        ncells = min(n, MAX_CELLS)
        if ncells == n:
            cells = [
                Cell(b["id"], 1, state, list(b["owners"]), b["refcount"], b.get("tokens"), {})
                for b, state in zip(blocks, states)
            ]
        else:
            bounds = [i * n // ncells for i in range(ncells + 1)]
            cells = [_merge(blocks[a:b], states[a:b]) for a, b in pairwise(bounds)]
        return cls(n, kv["block_size"], {s: counts[s] for s in STATES}, cells)

    def to_html(self) -> str:
        cells = self.cells
        columns, pitch = next((c, p) for n, c, p in GRIDS if len(cells) <= n)
        cols = max(1, min(columns, len(cells)))
        rows = math.ceil(len(cells) / cols)
        side = pitch - 2
        rects = "".join(
            f'<rect x="{i % cols * pitch}" y="{i // cols * pitch}" width="{side}" height="{side}" '
            f'fill="{c.colour}" data-state="{c.state}"><title>{escape(c.title(self.block_size))}'
            "</title></rect>"
            for i, c in enumerate(cells)
        )
        counts = self.counts
        attrs = " ".join(f'data-{s}="{counts[s]}"' for s in STATES)
        caption = f"{self.num_blocks:,} blocks of {self.block_size} tokens: " + " · ".join(
            f'<span class="kv-count">{counts[s]:,} {s}</span>'
            for s in ("owned", "shared", "cached", "free")
        )
        note = ""
        if len(cells) < self.num_blocks:
            sizes = sorted({c.count for c in cells})
            each = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
            note = (
                f'<p class="kv-note" data-aggregated="1">More blocks than fit on screen: each of the '
                f"{len(cells):,} cells stands for {each} neighbouring blocks and takes the colour "
                "most of them have; hover a cell for its mix.</p>"
            )
        return (
            f'<div class="kv-map" data-blocks="{self.num_blocks}" data-block-size="{self.block_size}" '
            f'data-cells="{len(cells)}" {attrs}>'
            f'<p class="kv-caption">{caption}</p>{note}'
            f'<svg viewBox="0 0 {cols * pitch} {rows * pitch}" width="{cols * pitch}" '
            f'style="max-width:100%;height:auto">{rects}</svg>{_legend()}</div>'
        )


def _merge(chunk: list[dict], states: list[str]) -> Cell:
    mix = Counter(states)
    state = max(STATES, key=mix.__getitem__)
    first = chunk[0]["id"]
    if mix["free"] == len(chunk):  # most of a large pool, most of the time: skip the rest
        return Cell(first, len(chunk), "free", [], 0, 0, {"free": len(chunk)})
    owners = Counter(o for b in chunk if b["owners"] for o in b["owners"])
    tokens = sum(b["tokens"] for b in chunk)
    refcount = max(b["refcount"] for b in chunk)
    ranked = [o for o, _ in owners.most_common()]
    return Cell(
        first, len(chunk), state, ranked, refcount, tokens, {s: mix[s] for s in STATES if mix[s]}
    )


def _swatch(colour: str) -> str:
    return f'<span class="kv-swatch" style="background:{colour}"></span>'


def _legend() -> str:
    hues = "".join(_swatch(request_colour(r)) for r in "abc")
    owned = f"{hues} owned by the running request that computed it (a hue per request)"
    return (
        f'<p class="kv-legend">{_swatch(FREE_COLOUR)} free {owned} '
        f"{_swatch(CACHED_COLOUR)} cached in the radix tree, no request holds it "
        f"{_swatch(shared_colour(2))}{_swatch(shared_colour(3))}{_swatch(shared_colour(5))} "
        "shared: reused from the prefix cache or held by several requests (darker = more "
        "holders)</p>"
    )


# ------------------------------------------------------------------------------ other views


@dataclass(slots=True)
class Point:
    """Pool and queue sizes at one instant, for the over-time charts."""

    time: float
    in_use: int  # held by a running request (owned or shared)
    cached: int  # held only by the radix tree
    free: int
    running: int
    waiting: int

    @classmethod
    def of(cls, time: float, counts: dict[str, int], running: int, waiting: int) -> Point:
        in_use = counts["owned"] + counts["shared"]
        return cls(time, in_use, counts["cached"], counts["free"], running, waiting)


def radix_html(radix: dict) -> str:
    nodes = radix["nodes"]
    children: dict[int | None, list[dict]] = defaultdict(list)
    for node in nodes:
        children[node["parent"]].append(node)

    def item(node: dict) -> str:
        # A request's blocks enter the tree as they fill, often one node each: a run of only
        # children is shown as one line.
        chain = [node]
        while node["parent"] is not None and len(kids := children.get(chain[-1]["id"], [])) == 1:
            chain.append(kids[0])
        locked = sum(n["locked"] for n in chain)
        if node["parent"] is None:
            label = "root"
        elif len(chain) == 1:
            label = f"{node['tokens']} tokens · {node['blocks']} blocks · {node['hits']} hits"
        else:
            hits = sorted({n["hits"] for n in chain})
            label = (
                f"{len(chain)} nodes in a row: {sum(n['tokens'] for n in chain)} tokens · "
                f"{sum(n['blocks'] for n in chain)} blocks · {hits[0]}"
                + (f"-{hits[-1]}" if len(hits) > 1 else "")
                + " hits"
            )
        lock = ""
        if locked:
            lock = (
                ' <span class="kv-lock">locked</span>'
                if len(chain) == 1
                else f' <span class="kv-lock">{locked} locked</span>'
            )
        kids = children.get(chain[-1]["id"], [])
        sub = f"<ul>{''.join(item(k) for k in kids)}</ul>" if kids else ""
        return f'<li data-locked="{locked}">{label}{lock}{sub}</li>'

    more = " (the first ones only)" if radix.get("truncated") else ""
    head = (
        f"<p>{radix['cached_blocks']:,} cached blocks in {max(len(nodes) - 1, 0)} nodes{more} · "
        f"prefix hit rate {radix['hit_rate']:.0%}. A locked node is in use by a running request "
        "and cannot be evicted.</p>"
    )
    roots = children.get(None, [])
    return f'<div class="kv-radix">{head}<ul>{"".join(item(r) for r in roots)}</ul></div>'


def requests_html(running: list[dict], waiting: list[dict]) -> str:
    """The running and waiting requests, each with its hue from the block map."""
    cols = ("prompt_tokens", "cached_tokens", "computed_tokens", "output_tokens", "blocks")
    head = "".join(f"<th>{c.removesuffix('_tokens')}</th>" for c in ("request", "status", *cols))
    rows = "".join(
        f'<tr data-status="{escape(r["status"])}"><td>{_swatch(request_colour(r["id"]))}'
        f"{escape(r['id'])}</td><td>{escape(r['status'])}</td>"
        + "".join(f"<td>{r.get(c, '')}</td>" for c in cols)
        + "</tr>"
        for r in [*running, *waiting]
    )
    return (
        f'<div class="kv-requests"><p>{len(running)} running · {len(waiting)} waiting. Tokens: '
        "prompt, cached (found in the prefix cache), computed (K/V written), output.</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></div>"
    )


def _usage_frame(points: list[Point]) -> pd.DataFrame:
    t0 = points[0].time if points else 0.0
    rows = [
        (p.time - t0, name, value)
        for p in points
        for name, value in (("in use", p.in_use), ("cached only", p.cached), ("free", p.free))
    ]
    return pd.DataFrame(rows, columns=["time", "state", "blocks"])


def _queue_frame(points: list[Point]) -> pd.DataFrame:
    t0 = points[0].time if points else 0.0
    rows = [
        (p.time - t0, q, n)
        for p in points
        for q, n in (("running", p.running), ("waiting", p.waiting))
    ]
    return pd.DataFrame(rows, columns=["time", "queue", "requests"])


def _batch_frames(
    batches: list[tuple[float, int, int, int, int]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(x, requests, prefill tokens, decode tokens, preemptions)`` → token and size charts."""
    tokens = [
        (x, kind, n)
        for x, _, pre, dec, _ in batches
        for kind, n in (("prefill", pre), ("decode", dec))
    ]
    sizes = [
        (x, s, n)
        for x, req, _, _, pre in batches
        for s, n in (("requests", req), ("preemptions", pre))
    ]
    return (
        pd.DataFrame(tokens, columns=["x", "kind", "tokens"]),
        pd.DataFrame(sizes, columns=["x", "series", "count"]),
    )


def _histogram(seconds: list[float], bins: int = 20) -> pd.DataFrame:
    """Requests per bin of a round width (1, 2 or 5 x 10^k ms), labelled by lower edge. The
    labels are padded to one width so that the chart's alphabetical order is numeric order:
    Gradio's bar chart keeps the ``sort`` list of its first draw, so that cannot do it."""
    ms = [1000 * s for s in seconds]
    if not ms:
        return pd.DataFrame({"ms": ["none yet"], "requests": [0]})
    lo, hi = min(ms), max(ms)
    raw = max(hi - lo, hi / 10, 1e-3) / bins  # one value alone gets bins a tenth of it wide
    scale = 10 ** math.floor(math.log10(raw))
    width = next(m * scale for m in (1, 2, 5, 10) if m * scale >= raw)
    digits = max(0, -math.floor(math.log10(width)))
    start = math.floor(lo / width)
    counts = Counter(math.floor(v / width) - start for v in ms)
    labels = [f"{(start + i) * width:.{digits}f}" for i in range(max(counts) + 1)]
    size = max(map(len, labels))
    return pd.DataFrame(
        {"ms": [x.rjust(size) for x in labels], "requests": [counts[i] for i in range(len(labels))]}
    )


def _latencies(finished: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    ttft = [m["ttft"] for m in finished if m.get("ttft") is not None]
    tpot = [m["tpot"] for m in finished if m.get("tpot") is not None]
    return _histogram(ttft), _histogram(tpot)


def _status_html(items: list[tuple[str, str]], error: str | None = None) -> str:
    cells = "".join(
        f'<span class="kv-stat"><b>{escape(v)}</b> {escape(k)}</span>' for k, v in items
    )
    err = f'<p class="kv-error" data-error="1">{escape(error)}</p>' if error else ""
    return f'<div class="kv-status">{cells}{err}</div>'


# ------------------------------------------------------------------------------ live source


def http_state(url: str, api_key: str | None = None, timeout: float = 5.0) -> Callable[[], dict]:
    """A function that fetches ``URL/engine/state`` (the server's engine snapshot)."""
    endpoint = url.rstrip("/") + "/engine/state"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    client = httpx.Client(timeout=timeout, headers=headers)

    def fetch() -> dict:
        try:
            response = client.get(endpoint)
        except httpx.HTTPError as exc:
            raise DashboardError(f"cannot reach {endpoint}: {exc}") from None
        if response.status_code == 401:
            raise DashboardError(
                f"{endpoint} wants an API key: start the dashboard with --api-key KEY"
            )
        if response.status_code != 200:
            raise DashboardError(f"{endpoint} answered HTTP {response.status_code}")
        return orjson.loads(response.content)  # a 100,000-block pool is ~7 MB of JSON

    return fetch


def live_views(state: dict, blocks: BlockMap, points: list[Point]) -> list:
    """The dashboard's outputs for one polled engine state (``points`` already holds its point)."""
    stats = state.get("stats", {})
    steps = state.get("steps", [])[-RECENT_STEPS:]
    batches = [
        (s["step"], s["requests"], s["prefill_tokens"], s["decode_tokens"], s["preemptions"])
        for s in steps
    ]
    items = [
        ("model", str(state.get("model", "?"))),
        ("steps", f"{stats.get('num_steps', len(steps)):,}"),
        ("running", str(len(state["running"]))),
        ("waiting", str(len(state["waiting"]))),
        ("prefix hit rate", f"{state['kv']['radix']['hit_rate']:.0%}"),
        ("preemptions", str(state.get("num_preemptions", 0))),
    ]
    return render(items, state, blocks, points, batches, state.get("finished", []))


def render(
    items: list[tuple[str, str]],
    state: dict,
    blocks: BlockMap,
    points: list[Point],
    batches: list[tuple[float, int, int, int, int]],
    finished: list[dict],
) -> list:
    """The dashboard's outputs, in ``_charts`` order, for one engine snapshot ``state`` (its
    block map ``blocks`` already built): the one drawing code of the live and replayed views.
    ``batches`` holds ``(x, requests, prefill tokens, decode tokens, preemptions)``."""
    return [
        _status_html(items),
        blocks.to_html(),
        _usage_frame(points),
        _queue_frame(points),
        *_batch_frames(batches),
        *_latencies(finished),
        radix_html(state["kv"]["radix"]),
        requests_html(state["running"], state["waiting"]),
    ]


# ------------------------------------------------------------------------------ replay source


def replay_views(recording: Recording, index: int, replica: int = 0) -> list:
    """The dashboard's outputs at frame ``index`` of a recording: its snapshot, rebuilt, drawn
    as a live one; the charts run up to it."""
    frames = recording.frames_of(replica)
    index = max(0, min(index, len(frames) - 1))
    frame = frames[index]
    past = frames[: index + 1]
    state = recording.snapshot(index, replica)
    blocks = BlockMap.from_snapshot(state["kv"])
    points = [Point.of(f["t"], f, f["running"], f["waiting"]) for f in past]
    done = [m for m in recording.finished if m["end"] <= frame["t"]]
    items = [
        ("time", f"{frame['t']:.2f} s"),
        ("sample", f"{index}/{len(frames) - 1}"),  # as the slider counts
        ("steps", f"{frame['step']:,}"),
        ("running", str(frame["running"])),
        ("waiting", str(frame["waiting"])),
        ("finished", str(len(done))),
        ("prefix hit rate", f"{state['kv']['radix']['hit_rate']:.0%}"),
        ("preemptions", str(sum(f["batch"][4] for f in past))),
    ]
    batches = [_mean_step(f) for f in past[-RECENT_STEPS:] if f["batch"][0]]
    return render(items, state, blocks, points, batches, done)


def _mean_step(frame: dict) -> tuple[float, int, int, int, int]:
    """A frame's ``batch`` (the steps since the previous frame) as one step: the largest batch,
    the mean prefill and decode tokens per step, the preemptions. Means, not sums, so that a
    recording thinned by its size cap draws the same bars as a full one."""
    steps, largest, prefill, decode, preemptions = frame["batch"]
    return frame["t"], largest, round(prefill / steps), round(decode / steps), preemptions


# ------------------------------------------------------------------------------ the app

CSS = """
.kv-map svg rect:hover { stroke: #111; stroke-width: 2px; }
.kv-caption, .kv-note, .kv-legend { margin: 4px 0; font-size: 0.9em; }
.kv-note { color: #92400e; }
.kv-swatch { display: inline-block; width: 11px; height: 11px; margin: 0 2px; vertical-align: middle;
  border-radius: 2px; }
.kv-status { display: flex; flex-wrap: wrap; gap: 18px; font-size: 0.95em; }
.kv-error { color: #b91c1c; width: 100%; margin: 0; }
.kv-radix ul { list-style: none; padding-left: 16px; margin: 0; border-left: 1px solid #d1d5db; }
.kv-radix { max-height: 420px; overflow: auto; }
.kv-radix li, .kv-radix p { font-size: 13px; margin: 1px 0; }
.kv-lock { color: #b45309; font-weight: 600; }
.kv-requests { max-height: 420px; overflow: auto; font-size: 0.88em; }
.kv-requests td, .kv-requests th { padding: 2px 8px; text-align: right; }
.kv-requests td:first-child, .kv-requests th:first-child { text-align: left; }
"""

INTRO = (
    "Every square is one KV block (a page of the cache). A running request **owns** the blocks it "
    "computes; each block, once full, also enters the **radix tree**, which keeps it after the "
    "request ends (**cached**). A later request with the same prefix takes those blocks instead of "
    "computing them again: while it runs they are **shared**."
)


def _charts(x_title: str) -> list:
    """The output components after the block map, in ``render``'s order."""
    with gr.Row():
        usage = gr.LinePlot(
            x="time", y="blocks", color="state", title="KV blocks over time", x_title="time (s)"
        )
        queues = gr.LinePlot(
            x="time", y="requests", color="queue", title="Queue lengths", x_title="time (s)"
        )
    with gr.Row():
        tokens = gr.BarPlot(
            x="x", y="tokens", color="kind", title="Batch composition (tokens)", x_title=x_title
        )
        sizes = gr.LinePlot(
            x="x", y="count", color="series", title="Batch size and preemptions", x_title=x_title
        )
    with gr.Row():
        ttft, tpot = (
            gr.BarPlot(
                x="ms",
                y="requests",
                title=f"{name} histogram",
                x_title=f"{what} (ms)",
                y_lim=[0, None],
            )
            for name, what in (("TTFT", "time to first token"), ("TPOT", "time per output token"))
        )
    with gr.Row():
        with gr.Column():
            gr.Markdown("#### Radix tree")
            radix = gr.HTML(elem_id="kv-radix", js_on_load=None)
        with gr.Column():
            gr.Markdown("#### Requests")
            table = gr.HTML(elem_id="kv-requests", js_on_load=None)
    return [usage, queues, tokens, sizes, ttft, tpot, radix, table]


def live_dashboard(fetch: Callable[[], dict], interval: float = 1.0, source: str = "") -> gr.Blocks:
    """The dashboard polling ``fetch`` (a server's engine state) every ``interval`` seconds."""
    with gr.Blocks(title="YAIE dashboard", analytics_enabled=False) as blocks:
        gr.Markdown(f"## YAIE KV cache, live{f' from {source}' if source else ''}\n{INTRO}")
        status = gr.HTML(elem_id="kv-status", js_on_load=None)
        block_map = gr.HTML(elem_id="kv-block-map", js_on_load=None)
        outputs = [status, block_map, *_charts("step")]
        history = gr.State([])
        timer = gr.Timer(interval)

        def poll(points: list[Point]) -> list:
            try:
                state = fetch()
            except DashboardError as exc:
                logger.warning("%s", exc)
                return [_status_html([], str(exc)), *[gr.skip()] * (len(outputs) - 1), points]
            kv_map = BlockMap.from_snapshot(state["kv"])
            point = Point.of(
                state["time"], kv_map.counts, len(state["running"]), len(state["waiting"])
            )
            points = [*points, point][-HISTORY:]
            return [*live_views(state, kv_map, points), points]

        timer.tick(poll, history, [*outputs, history], show_progress="hidden")
        blocks.load(poll, history, [*outputs, history], show_progress="hidden")
    return blocks


def replay_dashboard(recording: Recording, interval: float = 0.5) -> gr.Blocks:
    """The dashboard over a recording: a slider over its samples, play/pause."""
    frames = recording.frames_of(0)
    last = len(frames) - 1
    with gr.Blocks(title="YAIE dashboard (replay)", analytics_enabled=False) as blocks:
        thinned = ""
        if frames[-1]["sample"] > last:
            thinned = (
                f" of the run's {frames[-1]['sample'] + 1} (the recording's size cap skipped "
                "the others)"
            )
        gr.Markdown(
            f"## YAIE KV cache, replayed from `{recording.path}`\n"
            f"{recording.num_blocks:,} blocks of {recording.block_size} tokens, "
            f"{recording.replicas} replica(s), {len(frames)} samples{thinned}. Batch charts: "
            f"per step, averaged between samples. {INTRO}"
        )
        with gr.Row():
            slider = gr.Slider(
                0, last, value=0, step=1, label="sample (time)", elem_id="kv-slider", scale=4
            )
            play = gr.Button("Play", elem_id="kv-play", scale=1)
            if recording.replicas > 1:
                replica = gr.Dropdown(
                    list(range(recording.replicas)), value=0, label="replica", scale=1
                )
            else:
                replica = gr.State(0)
        status = gr.HTML(elem_id="kv-status", js_on_load=None)
        block_map = gr.HTML(elem_id="kv-block-map", js_on_load=None)
        outputs = [status, block_map, *_charts("time (s)")]
        playing = gr.State(False)
        timer = gr.Timer(interval, active=False)

        def toggle(on: bool, index: int) -> tuple:
            on = not on
            restart = on and index >= last
            return (
                on,
                gr.Timer(active=on),
                gr.Button("Pause" if on else "Play"),
                0 if restart else index,
            )

        def advance(index: int) -> tuple:
            nxt = min(int(index) + 1, last)
            more = nxt < last
            return nxt, more, gr.Timer(active=more), gr.Button("Pause" if more else "Play")

        def show(index: float, replica: float) -> list:
            return replay_views(recording, int(index), int(replica))

        play.click(toggle, [playing, slider], [playing, timer, play, slider])
        timer.tick(advance, slider, [slider, playing, timer, play], show_progress="hidden")
        slider.change(show, [slider, replica], outputs, show_progress="hidden")
        if recording.replicas > 1:
            replica.change(show, [slider, replica], outputs)
        blocks.load(show, [slider, replica], outputs)
    return blocks


class _Asgi:
    """Gradio's app as a plain ASGI callable that starts itself and knows where it is mounted.

    Gradio's queue (which timers and every event go through) starts in its app's lifespan. A
    host that mounts us (``yaie serve --dashboard``) does not forward lifespan events to mounted
    apps, so we enter that lifespan ourselves on the first request. Gradio also builds its URLs
    from ``root_path``, which Litestar's mounts leave empty while stripping the prefix from the
    path: we set both from the raw path, and send ``/dashboard`` to ``/dashboard/`` so that
    relative asset URLs resolve under the prefix.
    """

    def __init__(self, app: Any, prefix: str = "") -> None:
        self.app = app
        self.prefix = prefix.rstrip("/")
        self._stack = contextlib.AsyncExitStack()
        self._started = False
        self._lock = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            await self._stack.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.prefix:
            if scope["type"] == "http" and scope.get("raw_path") == self.prefix.encode():
                query = scope.get("query_string", b"").decode("latin-1")
                location = self.prefix + "/" + (f"?{query}" if query else "")
                await send(
                    {
                        "type": "http.response.start",
                        "status": 307,
                        "headers": [(b"location", location.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": b""})
                return
            # Litestar strips the prefix and adds a trailing slash; the raw path is what was asked.
            raw = scope.get("raw_path")
            path = unquote(raw.decode("latin-1")) if raw else scope["path"]
            if not path.startswith(self.prefix + "/"):
                path = self.prefix + path
            scope = {**scope, "path": path, "root_path": self.prefix}
        if not self._started:
            async with self._lock:
                if not self._started:
                    await self._stack.enter_async_context(
                        self.app.router.lifespan_context(self.app)
                    )
                    self._started = True
        await self.app(scope, receive, send)


def asgi_app(blocks: gr.Blocks, prefix: str = "") -> ASGIApp:
    """Serve ``blocks`` as an ASGI app: at the root of a server, or mounted at ``prefix``."""
    from fastapi import FastAPI

    host = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    gr.mount_gradio_app(host, blocks, path="", css=CSS, ssr_mode=False, footer_links=[])
    return _Asgi(host, prefix)


def mount_dashboard(
    engine_state: Callable[[], dict], prefix: str = "/dashboard", interval: float = 1.0
) -> ASGIApp:
    """The live dashboard as an app to mount at ``prefix`` on a server
    (``build_app(mounts={prefix: ...})``). ``engine_state`` returns what ``GET /engine/state``
    serves; it is called from a worker thread about every ``interval`` seconds per open page."""
    return asgi_app(live_dashboard(engine_state, interval), prefix)


def server_dashboard(host: str, port: int, api_key: str | None = None) -> ASGIApp:
    """For ``yaie serve --dashboard``: mounted at ``/dashboard``, reading the server's own
    ``/engine/state`` over loopback, so the page shows exactly what the endpoint serves."""
    local = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    url = f"http://[{local}]:{port}" if ":" in local else f"http://{local}:{port}"
    return mount_dashboard(http_state(url, api_key))
