"""``yaie serve [MODEL]``: load a model and serve the OpenAI API on uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict
from typing import TYPE_CHECKING

from yaie.args import EngineArgs

if TYPE_CHECKING:
    from yaie.llm import LLM

DEFAULT_MAX_WAITING = 1024  # a server bounds its queue: past it, 429 instead of unbounded memory


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve the OpenAI API (chat/completions, completions, models) over HTTP",
        description="Load MODEL (default: SmolLM2-135M-Instruct) and serve an OpenAI-compatible "
        "API: /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /engine/state "
        "and the OpenAPI schema at /schema/openapi.json.",
    )
    p.add_argument("model", nargs="?", default=None, help="local dir, .gguf file or Hub repo id")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key",
        default=os.environ.get("YAIE_API_KEY") or None,
        help="require 'Authorization: Bearer KEY' on /v1 and /engine routes (default: $YAIE_API_KEY)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=DEFAULT_MAX_WAITING,
        help=f"queued requests before the server answers 429 (default: {DEFAULT_MAX_WAITING})",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="also serve the live KV-cache dashboard at /dashboard",
    )
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from yaie.llm import LLM

    if args.max_waiting < 1:
        raise ValueError(f"--max-waiting must be >= 1, got {args.max_waiting}")
    llm = LLM(**asdict(EngineArgs.from_cli(args)))
    serve(llm, args.host, args.port, args.api_key, verbose=args.verbose, dashboard=args.dashboard)


def serve(
    llm: LLM,
    host: str,
    port: int,
    api_key: str | None = None,
    verbose: bool = False,
    dashboard: bool = False,
) -> None:
    """Run the app for ``llm`` on uvicorn until interrupted."""
    import uvicorn

    from yaie.api.app import build_app

    mounts = {}
    if dashboard:
        from yaie.ui.dashboard import server_dashboard

        mounts["/dashboard"] = server_dashboard(host, port, api_key)
    app = build_app(llm, api_key=api_key, mounts=mounts)
    auth = "API key required" if api_key else "no API key"
    print(f"yaie: serving {llm.model_name} on http://{host}:{port}/v1 ({auth})", file=sys.stderr)
    if dashboard:
        print(f"yaie: KV-cache dashboard on http://{host}:{port}/dashboard", file=sys.stderr)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=logging.INFO if verbose else logging.WARNING,
        access_log=verbose,
        timeout_graceful_shutdown=5,
    )
