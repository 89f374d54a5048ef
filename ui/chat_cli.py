"""``yaie chat [MODEL] [--url URL]``: open the terminal chat on a model or on a server.

The model loads *before* the app takes the screen, so its download and load progress (pip's
and the loader's bars, the resolver's log lines) stay readable on the plain terminal, and a bad
model name ends in one line instead of inside a half-drawn app.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict

from yaie.args import EngineArgs


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    chat = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (streams tokens, shows engine stats)",
        description="A terminal chat on the in-process engine (MODEL, default: the default "
        "model), or with --url on any OpenAI-compatible server (MODEL then names the server's "
        "model; default: the first it lists). Type /help in the app for its commands.",
    )
    chat.add_argument("model", nargs="?", default=None, help="local path, .gguf file or Hub id")
    chat.add_argument(
        "--url", default=None, help="an OpenAI-compatible server, e.g. http://localhost:8000"
    )
    chat.add_argument(
        "--api-key",
        default=os.environ.get("YAIE_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer token for --url (default: $YAIE_API_KEY, else $OPENAI_API_KEY)",
    )
    chat.add_argument("--system", default=None, help="system prompt")
    EngineArgs.add_cli_args(chat)
    chat.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from yaie.ui.chat import ChatApp
    from yaie.ui.chat_backend import RemoteBackend

    if args.url:
        backend = RemoteBackend(args.url, args.model, args.api_key)
    else:
        backend = _load_local(args)
    failure = ChatApp(backend, system=args.system).run()
    if failure:
        raise ValueError(failure)


def _load_local(args: argparse.Namespace):
    """Load the model with its progress on stderr: the resolver's and loader's log lines (a
    download says where it comes from) and their progress bars."""
    from yaie.llm import LLM
    from yaie.ui.chat_backend import LocalBackend

    name = args.model or "the default model"
    print(f"Loading {name}…", file=sys.stderr, flush=True)
    yaie_logger = logging.getLogger("yaie")  # `yaie`'s own handler prints what passes this level
    level = yaie_logger.level
    yaie_logger.setLevel(min(logging.INFO, yaie_logger.getEffectiveLevel()))
    start = time.perf_counter()
    try:
        llm = LLM(**asdict(EngineArgs.from_cli(args)))
    finally:
        yaie_logger.setLevel(level)
    print(
        f"Loaded {llm.model_name} in {time.perf_counter() - start:.1f} s "
        f"(context {llm.max_model_len} tokens, {llm.engine.config.num_blocks} KV blocks)",
        file=sys.stderr,
        flush=True,
    )
    return LocalBackend(llm)
