"""A pool of 100,000 blocks in a real browser: the map aggregates instead of drawing every block.

The engine runs on the HashExecutor (no model) behind a minimal Litestar route, the way
``yaie serve`` serves ``/engine/state``; the dashboard polls it as ``yaie dashboard --url`` does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from dashboard_helpers import chromium, map_counts, open_page, screenshot
from litestar import Litestar, get
from server_helpers import free_port

from yaie.core.engine import EngineConfig, LLMEngine
from yaie.core.hash_executor import HashExecutor
from yaie.core.sampling import SamplingParams
from yaie.core.scheduler import SchedulerConfig
from yaie.ui.dashboard import MAX_CELLS, asgi_app, http_state, live_dashboard

NUM_BLOCKS = 100_000


def _engine() -> LLMEngine:
    """Blocks 0-3 cached by a finished request c; a (a 320-token prompt) owns 21 blocks, the
    first 10 of which b (a's first 160 tokens and 40 of its own) took from the tree: shared."""
    sched = SchedulerConfig(max_num_batched_tokens=4096)
    executor = HashExecutor(NUM_BLOCKS, 16, 1000)
    engine = LLMEngine(EngineConfig(NUM_BLOCKS, 16, True, sched), executor, time.monotonic)
    a = list(range(2000, 2320))
    for rid, prompt, max_tokens in (
        ("c", list(range(1000, 1064)), 1),
        ("a", a, 100),
        ("b", a[:160] + list(range(40)), 100),
    ):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        engine.step()
    return engine


@contextmanager
def _serve(app, port: int) -> Iterator[None]:
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield
    finally:
        server.should_exit = True
        thread.join()


def test_a_pool_of_100000_blocks_becomes_4096_cells_and_says_so() -> None:
    engine = _engine()

    @get("/engine/state", sync_to_thread=True)
    def engine_state() -> dict:
        return {"model": "hash-executor", **engine.snapshot()}

    state_port, dash_port = free_port(), free_port()
    state = http_state(f"http://127.0.0.1:{state_port}")
    with (
        _serve(Litestar([engine_state]), state_port),
        _serve(asgi_app(live_dashboard(state, interval=2.0)), dash_port),
        chromium() as browser,
    ):
        page = open_page(browser, f"http://127.0.0.1:{dash_port}/")
        counts = map_counts(page)
        assert counts == {
            "blocks": NUM_BLOCKS,
            "blockSize": 16,
            "cells": MAX_CELLS,
            "free": NUM_BLOCKS - 28,
            "cached": 4,
            "owned": 14,
            "shared": 10,
        }
        assert page.locator(".kv-map rect").count() == MAX_CELLS
        assert page.evaluate("document.querySelectorAll('*').length") < 2 * MAX_CELLS + 3000
        note = page.locator(".kv-note[data-aggregated]").inner_text()
        assert "each of the 4,096 cells stands for 24-25 neighbouring blocks" in note
        # Blocks 0-23: c's 4 cached, a's 10 shared with b, 10 more of a's own (ties go to owned).
        first = page.locator(".kv-map rect").first
        assert first.get_attribute("data-state") == "owned"
        assert first.locator("title").text_content() == (
            "blocks 0-23: 4 cached, 10 owned, 10 shared\nowners: a, b\nmax refcount 3\n384/384 tokens"
        )
        # The next cell holds the other 4 blocks in use, outnumbered: drawn free, hover tells.
        second = page.locator(".kv-map rect").nth(1)
        assert second.get_attribute("data-state") == "free"
        assert second.locator("title").text_content().startswith("blocks 24-47: 20 free, 4 owned\n")
        assert page.locator('.kv-map rect:not([data-state="free"])').count() == 1
        screenshot(page, "dashboard_pool.png")
