"""``yaie dashboard``: the KV-cache dashboard, live from a server or replayed from a simulation."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    dash = subparsers.add_parser(
        "dashboard",
        help="browser dashboard of the KV cache: live from `yaie serve` or replayed",
        description="Serve the KV-cache dashboard (block map, usage over time, radix tree, "
        "batches, latencies, requests) on HOST:PORT. --url polls a running `yaie serve`; "
        "--replay plays a `yaie simulate --out DIR --record-kv` recording.",
    )
    source = dash.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    source.add_argument("--replay", type=Path, metavar="DIR", help="a simulation's --out folder")
    dash.add_argument(
        "--api-key",
        default=os.environ.get("YAIE_API_KEY"),
        help="the server's API key (default: $YAIE_API_KEY)",
    )
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=7860)
    dash.add_argument(
        "--interval",
        type=float,
        default=None,
        help="seconds between polls (live, default 1) "
        "or between samples while playing (replay, default 0.5)",
    )
    dash.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> None:
    import uvicorn

    from yaie.ui.dashboard import asgi_app, http_state, live_dashboard, replay_dashboard
    from yaie.ui.dashboard_recording import Recording

    if args.interval is not None and args.interval <= 0:
        raise ValueError("--interval must be > 0")
    if args.url is not None:
        blocks = live_dashboard(http_state(args.url, args.api_key), args.interval or 1.0, args.url)
    else:
        blocks = replay_dashboard(Recording.load(args.replay), args.interval or 0.5)
    print(f"YAIE dashboard on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(asgi_app(blocks), host=args.host, port=args.port, log_level="warning")
