"""``yaie bench serve``: drive a running ``yaie serve`` over HTTP and print what clients saw.

Every request streams (``stream_options.include_usage``), so the client measures its own time to
first token, the gaps between streamed chunks (ITL; one token per chunk except where the
detokenizer holds text back, so TPOT is the mean gap) and end-to-end latency; these are folded
into ``RequestMetrics`` and summarised by ``yaie.core.metrics.summarize``, the code that also
measures the engine and the simulator. Requests are sent by a fixed number of concurrent
clients, at a Poisson request rate, or at the arrival times of a trace (its prompts become token
ids through the simulator's ``PromptSynth``, so its prefix sharing reaches the radix cache).

``--load-test`` is the server's acceptance run: 64 clients send 500 streaming requests (chat and
completions mixed), then it checks that every request completed with well-formed output, that
no response was a 5xx, that the KV pool went back to idle (no block held by a request) and that
the server's resident memory is within 10% of its level after the warm-up. It prints a PASS/FAIL
table and exits non-zero on a FAIL. The warm-up is one pass of the same load (other prompts)
plus a prefill of every free KV block, because a fresh CPU server grows for reasons that are
not leaks: the OS maps the KV cache's pages on first touch, and the CPU path tells glibc to keep
freed memory for reuse (``yaie.kernels.cpu.keep_freed_memory``), so the heap grows with every
new batch shape until the shapes repeat. Measured on a 2-core CPU box with a warm-up of only 64
requests: +15.1% over a fresh server's first 500 requests, +1.6% over the next 500.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from yaie.core.metrics import RequestMetrics, summarize

WORDS = [
    "the",
    "engine",
    "schedules",
    "requests",
    "in",
    "batches",
    "while",
    "the",
    "cache",
    "keeps",
    "blocks",
    "of",
    "keys",
    "and",
    "values",
    "for",
    "every",
    "token",
    "so",
    "that",
    "a",
    "later",
    "prompt",
    "with",
    "the",
    "same",
    "prefix",
    "skips",
    "work",
]
RSS_TOLERANCE = 0.10


@dataclass(slots=True)
class BenchRequest:
    kind: str  # "chat" or "completion"
    body: dict  # the OpenAI body without model and stream fields
    max_tokens: int
    arrival: float | None = None  # seconds after the start; None: as soon as a client is free


@dataclass(slots=True)
class Outcome:
    status: int  # HTTP status; 0 when the connection failed
    well_formed: bool
    error: str | None = None
    metrics: RequestMetrics | None = None


@dataclass(slots=True)
class RunResult:
    outcomes: list[Outcome]
    duration: float
    summary: dict = field(default_factory=dict)

    @property
    def num_5xx(self) -> int:
        return sum(o.status >= 500 for o in self.outcomes)

    @property
    def num_ok(self) -> int:
        return sum(o.well_formed for o in self.outcomes)


# ---------------------------------------------------------------------------- workloads


def synthetic(
    num: int, input_len: int, output_len: int, mix: str, rate: float | None, seed: int
) -> list[BenchRequest]:
    """Random prompts of ``input_len`` words (chat) or token ids (completions) on average, each
    asking for exactly its own number of tokens (EOS ignored), ``output_len`` on average.

    Lengths are drawn uniformly from half to one and a half times the mean, so requests finish
    at different steps and a closed loop does not move in lockstep waves."""
    rng = random.Random(seed)
    kinds = {"chat": ["chat"], "completions": ["completion"], "both": ["chat", "completion"]}[mix]

    def around(mean: int) -> int:
        return rng.randint(max(1, mean // 2), max(1, mean + mean // 2))

    arrival = 0.0
    requests = []
    for i in range(num):
        kind = kinds[i % len(kinds)]
        length, max_tokens = around(input_len), around(output_len)
        if kind == "chat":
            text = " ".join(rng.choice(WORDS) for _ in range(length))
            body: dict = {"messages": [{"role": "user", "content": f"Request {i}: {text}"}]}
        else:
            body = {"prompt": [rng.randrange(100, 10_000) for _ in range(length)]}
        body |= {"max_tokens": max_tokens, "ignore_eos": True, "temperature": 0.8, "seed": i}
        if rate is not None:
            arrival += rng.expovariate(rate)
        requests.append(BenchRequest(kind, body, max_tokens, arrival if rate is not None else None))
    return requests


def from_trace(
    path: str, fmt: str, options, max_model_len: int | None
) -> tuple[list[BenchRequest], list[str]]:
    """A trace's requests as completions of synthesized token ids, at its arrival times,
    clipped to fit the server's context; returns the notes of what loading changed."""
    from yaie.simulator.traces import PromptSynth, load_trace

    trace = load_trace(path, fmt, options)
    synth = PromptSynth(trace.hash_block)
    start = trace.requests[0].arrival if trace.requests else 0.0
    requests, clipped = [], 0
    for i, req in enumerate(trace.requests):
        prompt = synth.prompt(req, i)
        output = req.output_len
        if max_model_len is not None and len(prompt) + output > max_model_len:
            prompt = prompt[: max(1, min(len(prompt), max_model_len // 2))]
            output = max(1, min(output, max_model_len - len(prompt) - 1))
            clipped += 1
        body = {"prompt": prompt, "max_tokens": output, "ignore_eos": True, "temperature": 0.0}
        requests.append(BenchRequest("completion", body, output, req.arrival - start))
    notes = list(trace.notes)
    if clipped:
        notes.append(
            f"{clipped} requests clipped to fit the server's {max_model_len}-token context"
        )
    return requests, notes


# ---------------------------------------------------------------------------- client


class ServerClient:
    """What the benchmark needs from the server: the model, the stream of one request, and
    (for the load test) engine state and resident memory."""

    def __init__(self, url: str, api_key: str | None, max_connections: int) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(600.0, connect=10.0),
            limits=httpx.Limits(
                max_connections=max_connections + 4, max_keepalive_connections=max_connections + 4
            ),
        )
        self.model = ""
        self.max_model_len: int | None = None

    async def connect(self) -> None:
        try:
            response = await self.http.get(f"{self.url}/v1/models")
        except httpx.TransportError as exc:
            raise ValueError(
                f"cannot reach a server at {self.url} ({exc}); start one with `yaie serve`"
            ) from None
        if response.status_code != 200:
            raise ValueError(
                f"{self.url}/v1/models answered {response.status_code}: {response.text[:200]}"
            )
        card = response.json()["data"][0]
        self.model, self.max_model_len = card["id"], card.get("max_model_len")

    async def engine_state(self) -> dict:
        response = await self.http.get(f"{self.url}/engine/state")
        response.raise_for_status()
        return response.json()

    async def resident_memory(self) -> float | None:
        text = (await self.http.get(f"{self.url}/metrics")).text
        for line in text.splitlines():
            if line.startswith("process_resident_memory_bytes "):
                return float(line.split()[1])
        return None

    async def send(self, index: int, req: BenchRequest) -> Outcome:
        path, chunk_object = (
            ("/v1/chat/completions", "chat.completion.chunk")
            if req.kind == "chat"
            else ("/v1/completions", "text_completion")
        )
        body = {
            **req.body,
            "model": self.model,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        token_times: list[float] = []
        finish: str | None = None
        usage: dict | None = None
        done = False
        try:
            async with self.http.stream("POST", f"{self.url}{path}", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return Outcome(response.status_code, False, text[:300])
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    event = json.loads(line[6:])
                    if "error" in event:
                        return Outcome(500, False, event["error"].get("message"))
                    if event.get("object") != chunk_object:
                        return Outcome(
                            200, False, f"unexpected event object {event.get('object')!r}"
                        )
                    usage = event.get("usage") or usage
                    for choice in event["choices"]:
                        piece = (
                            choice["delta"].get("content") if req.kind == "chat" else choice["text"]
                        )
                        if piece:
                            token_times.append(time.perf_counter())
                        finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
            return Outcome(0, False, f"{type(exc).__name__}: {exc}")
        end = time.perf_counter()
        generated = usage["completion_tokens"] if usage else 0
        problem = (
            "no [DONE]"
            if not done
            else "no usage"
            if usage is None
            else f"finish_reason {finish!r}"
            if finish not in ("stop", "length")
            else f"{generated} tokens, asked {req.max_tokens}"
            if generated != req.max_tokens
            else None
        )
        metrics = RequestMetrics(
            request_id=str(index),
            num_prompt_tokens=usage["prompt_tokens"] if usage else 0,
            num_cached_tokens=((usage or {}).get("prompt_tokens_details") or {}).get(
                "cached_tokens", 0
            ),
            num_output_tokens=generated,
            finish_reason=finish,
            queue_time=None,
            ttft=token_times[0] - start if token_times else None,
            e2e=end - start,
            itls=[b - a for a, b in itertools.pairwise(token_times)],
        )
        return Outcome(200, problem is None, problem, metrics)

    async def run(self, requests: list[BenchRequest], concurrency: int | None) -> RunResult:
        gate = asyncio.Semaphore(concurrency or len(requests) or 1)
        start = time.perf_counter()

        async def one(index: int, req: BenchRequest) -> Outcome:
            if req.arrival is not None:
                await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
            async with gate:
                return await self.send(index, req)

        outcomes = await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
        duration = time.perf_counter() - start
        done = [o.metrics for o in outcomes if o.metrics is not None and o.well_formed]
        return RunResult(list(outcomes), duration, summarize(done, duration))

    async def fill_kv_pool(self, concurrency: int, seed: int) -> None:
        """Prefill unique prompts (one output token each) worth every block still free."""
        state = await self.engine_state()
        block_size, free = state["kv"]["block_size"], state["stats"]["blocks_free"]
        length = min(1024, (self.max_model_len or 2048) // 2)
        rng = random.Random(seed)
        fill = [
            BenchRequest(
                "completion",
                {
                    "prompt": [rng.randrange(100, 10_000) for _ in range(length)],
                    "max_tokens": 1,
                    "ignore_eos": True,
                },
                1,
            )
            for _ in range(free * block_size // length + 2)
        ]
        await self.run(fill, concurrency)

    async def wait_idle(self, timeout_s: float = 120.0) -> dict:
        """Engine state once nothing runs or waits (aborts and finishes land asynchronously)."""
        deadline = time.monotonic() + timeout_s
        state = await self.engine_state()
        while (state["running"] or state["waiting"]) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            state = await self.engine_state()
        return state


# ---------------------------------------------------------------------------- report


def format_report(title: list[str], result: RunResult) -> str:
    m = result.summary
    failures = Counter(o.error or f"HTTP {o.status}" for o in result.outcomes if not o.well_formed)
    lines = [*title]
    lines.append(
        f"completed {result.num_ok} of {len(result.outcomes)} requests well-formed, "
        f"{result.num_5xx} 5xx, in {result.duration:.1f} s"
    )
    lines += [f"  failed x{n}: {why}" for why, n in failures.most_common(5)]
    rate = result.num_ok / result.duration if result.duration else float("nan")
    lines.append(
        f"throughput: {rate:.2f} req/s, {m.get('output_tok_s', float('nan')):.1f} output tok/s, "
        f"{m.get('total_tok_s', float('nan')):.1f} total tok/s; prefix cache hits "
        f"{100 * m.get('prefix_hit_rate', 0.0):.1f}% of prompt tokens"
    )
    lines.append(f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}")
    for key, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")):
        row = [m.get(f"{key}_p{q}") for q in (50, 90, 99)] + [m.get(f"{key}_mean")]
        lines.append(f"{label:<14}" + "".join(f"{1000 * v:>10.1f}" for v in row))
    return "\n".join(lines)


def load_checks(
    result: RunResult, state: dict, rss_warm: float | None, rss_after: float | None
) -> list[tuple[str, bool, str]]:
    held = [b for b in state["kv"]["blocks"] if b["state"] not in ("free", "cached")]
    idle = not held and not state["running"] and not state["waiting"]
    stats = state["stats"]
    checks = [
        (
            "every request completed, well-formed",
            result.num_ok == len(result.outcomes),
            f"{result.num_ok}/{len(result.outcomes)}",
        ),
        ("no 5xx responses", result.num_5xx == 0, str(result.num_5xx)),
        (
            "KV pool back to idle",
            idle,
            f"{len(held)} blocks held, {stats['blocks_cached']} cached, {stats['blocks_free']} free",
        ),
    ]
    if rss_warm is None or rss_after is None:
        checks.append(
            (
                "RSS within 10% of warm-up",
                False,
                "the server exports no process_resident_memory_bytes",
            )
        )
    else:
        change = rss_after / rss_warm - 1
        checks.append(
            (
                "RSS within 10% of warm-up",
                abs(change) <= RSS_TOLERANCE,
                f"{rss_warm / 2**20:.1f} MiB -> {rss_after / 2**20:.1f} MiB ({100 * change:+.1f}%)",
            )
        )
    return checks


# ---------------------------------------------------------------------------- command


def add_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "serve",
        help="load a running `yaie serve` over HTTP: throughput, TTFT/TPOT/E2E percentiles",
        description="Send streaming requests to a running server and print throughput and latency "
        "percentiles as the clients saw them. --load-test runs the server's acceptance load "
        "(64 clients, 500 mixed requests) and checks it.",
    )
    p.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)"
    )
    p.add_argument("--api-key", default=None, help="the server's API key, if it has one")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="clients in flight at most (default: 16 without a rate or trace)",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="Poisson arrivals per second instead of a closed loop",
    )
    p.add_argument(
        "--input-len",
        type=int,
        default=64,
        help="mean words (chat) or token ids (completions) per prompt; each is 0.5x-1.5x",
    )
    p.add_argument(
        "--output-len",
        type=int,
        default=32,
        help="mean tokens generated per request (EOS ignored); each is 0.5x-1.5x",
    )
    p.add_argument("--mix", choices=["both", "chat", "completions"], default="both")
    p.add_argument("--seed", type=int, default=0)
    tr = p.add_argument_group(
        "trace replay (completions of synthesized token ids at the trace's arrival times)"
    )
    tr.add_argument("--trace", default=None, help="our JSONL, an Azure CSV or a Mooncake JSONL")
    tr.add_argument("--format", default="auto", choices=["auto", "jsonl", "azure", "mooncake"])
    tr.add_argument("--limit", type=int, default=None, help="the first N requests")
    tr.add_argument(
        "--rate-scale", type=float, default=1.0, help="multiply the trace's request rate"
    )
    tr.add_argument("--input-scale", type=float, default=1.0, help="multiply prompt lengths")
    tr.add_argument("--max-input-len", type=int, default=None)
    tr.add_argument("--max-output-len", type=int, default=None)
    p.add_argument("--load-test", action="store_true", help="64 clients, 500 requests, with checks")
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> None:
    if args.load_test:
        args.num_requests, args.concurrency, args.mix, args.request_rate, args.trace = (
            500,
            64,
            "both",
            None,
            None,
        )
    for name in ("num_requests", "concurrency", "input_len", "output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.request_rate is not None and args.request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {args.request_rate}")
    if not asyncio.run(_main(args)):
        raise SystemExit(1)


async def _main(args: argparse.Namespace) -> bool:
    concurrency = args.concurrency or (None if args.request_rate or args.trace else 16)
    client = ServerClient(args.url, args.api_key, concurrency or 256)
    try:
        await client.connect()
        notes: list[str] = []
        if args.trace:
            from yaie.simulator.traces import LoadOptions

            options = LoadOptions(
                rate_scale=args.rate_scale,
                input_scale=args.input_scale,
                max_input_len=args.max_input_len,
                max_output_len=args.max_output_len,
                limit=args.limit,
            )
            requests, notes = from_trace(args.trace, args.format, options, client.max_model_len)
            workload = f"trace {args.trace} ({len(requests)} requests at its arrival times x{args.rate_scale})"
        else:
            requests = synthetic(
                args.num_requests,
                args.input_len,
                args.output_len,
                args.mix,
                args.request_rate,
                args.seed,
            )
            pace = f"Poisson {args.request_rate}/s" if args.request_rate else "closed loop"
            workload = f"{len(requests)} {args.mix} requests, {args.input_len} in / {args.output_len} out, {pace}"
        workload += f", {concurrency} concurrent clients" if concurrency else ", no client limit"
        if args.load_test:
            workload += f"; after a warm-up pass of {len(requests)} requests and a KV-pool fill"
        title = [
            f"yaie bench serve: {client.model} at {args.url}",
            f"workload: {workload}",
            *(f"  note: {n}" for n in notes),
        ]
        rss_warm = None
        if args.load_test:
            warm = synthetic(
                len(requests), args.input_len, args.output_len, "both", None, args.seed + 1
            )
            await client.run(warm, concurrency)
            await client.fill_kv_pool(concurrency, args.seed + 2)
            await client.wait_idle()
            rss_warm = await client.resident_memory()
        result = await client.run(requests, concurrency)
        print(format_report(title, result))
        if not args.load_test:
            return result.num_ok == len(result.outcomes)
        state = await client.wait_idle()
        checks = load_checks(result, state, rss_warm, await client.resident_memory())
        print(f"\n{'load-test check':<40}{'result':<8}detail")
        for name, passed, detail in checks:
            print(f"{name:<40}{'PASS' if passed else 'FAIL':<8}{detail}")
        return all(passed for _, passed, _ in checks)
    finally:
        await client.http.aclose()
