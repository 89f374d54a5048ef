"""The dashboard live, in a real browser, on a real ``yaie serve --dashboard`` with the default model.

One request streams: while it runs the map shows blocks owned in its hue; once it ends, its full
blocks stay in the radix tree (cached). The same prompt again: the blocks it takes from the tree
show as shared while it runs. Then ``yaie dashboard --url`` reads the same server with its key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from dashboard_helpers import (
    chromium,
    map_counts,
    open_page,
    screenshot,
    wait_for_map,
    yaie_process,
)
from playwright.sync_api import Browser, Page
from server_helpers import Server, free_port

from yaie.ui.dashboard import BlockMap, DashboardError, http_state, request_colour

pytestmark = pytest.mark.slow

KEY = "dashboard-test-key"
SERVER_ARGS = ["--api-key", KEY, "--dashboard"]  # for the ``server`` fixture (conftest.py)
PROMPT = "Explain, step by step, how an inference engine stores the keys and values of attention."
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as b:
        yield b


class Stream(threading.Thread):
    """One streaming chat request (greedy, exactly ``MAX_TOKENS`` tokens) on a thread."""

    def __init__(self, server: Server) -> None:
        super().__init__()
        self.server = server
        self.finish_reason: str | None = None

    def run(self) -> None:
        stream = self.server.client().chat.completions.create(
            model=self.server.model,
            messages=[{"role": "user", "content": PROMPT}],
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            for choice in chunk.choices:
                self.finish_reason = choice.finish_reason or self.finish_reason


def _running_row(page: Page) -> dict[str, str]:
    """The requests table's running row: request id and its counts, by column header."""
    table = page.locator("#kv-requests table")
    heads = table.locator("th").all_inner_texts()
    cells = table.locator('tr[data-status="running"] td').all_inner_texts()
    assert len(cells) == len(heads), f"expected one running row, got {cells}"
    return {h.strip(): c.strip() for h, c in zip(heads, cells)}


def test_a_request_owns_blocks_then_the_tree_keeps_them_then_a_second_one_shares_them(
    server: Server, browser: Browser
) -> None:
    page = open_page(browser, f"{server.url}/dashboard")
    start = map_counts(page)
    assert start["free"] == start["blocks"] > 0  # a fresh server: nothing used, nothing cached

    first = Stream(server)
    first.start()
    wait_for_map(page, lambda c: c["owned"] > 0, "the first request's blocks")
    # Owned blocks exist only while the request runs; they take the hue of its table row.
    row = _running_row(page)
    prompt_tokens = int(row["prompt"])
    fills = page.eval_on_selector_all(
        '.kv-map rect[data-state="owned"]', "rs => rs.map(r => r.getAttribute('fill'))"
    )
    assert set(fills) == {request_colour(row["request"])}
    first.join()
    assert first.finish_reason == "length"

    # It ended having computed prompt + 95 tokens (the last one is sampled, never computed): its
    # full blocks stay in the radix tree, the partial last one is freed.
    full = (prompt_tokens + MAX_TOKENS - 1) // start["blockSize"]
    done = wait_for_map(page, lambda c: c["owned"] == 0, "the first request to end")
    assert done["cached"] == full and done["free"] == done["blocks"] - full and done["shared"] == 0

    second = Stream(server)
    second.start()
    sharing = wait_for_map(page, lambda c: c["shared"] > 0, "the second request to reuse blocks")
    row = _running_row(page)  # the same poll drew the map and the table
    assert int(row["cached"]) == start["blockSize"] * sharing["shared"] > 0
    assert page.locator('#kv-radix li:not([data-locked="0"])').count() > 0  # its prefix is locked
    screenshot(page, "dashboard_live.png")
    second.join()
    assert second.finish_reason == "length"
    after = wait_for_map(
        page, lambda c: c["owned"] == c["shared"] == 0, "the second request to end"
    )
    assert after["cached"] >= full


def test_the_dashboard_command_reads_a_server_with_its_api_key(
    server: Server, browser: Browser
) -> None:
    with pytest.raises(
        DashboardError, match="wants an API key: start the dashboard with --api-key"
    ):
        http_state(server.url)()
    expected = BlockMap.from_snapshot(server.state()["kv"]).counts
    port = free_port()
    args = ["dashboard", "--url", server.url, "--api-key", KEY, "--port", str(port)]
    with yaie_process(args, f"http://127.0.0.1:{port}/"):
        page = open_page(browser, f"http://127.0.0.1:{port}/")
        counts = map_counts(page)
        assert {s: counts[s] for s in expected} == expected  # the server is idle: nothing moves
        assert "SmolLM2-135M-Instruct" in page.locator("#kv-status").inner_text()
