"""Driving the dashboard in Debian's chromium (headless, through Playwright; never downloaded).

The page's state is read from what it renders: the block map's ``data-*`` counts, the cells'
``data-state``, the status line. Waits poll the page and give up after ``WAIT_LIMIT_S``, a guard
against a hung server on a loaded CI box, not a speed check.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from playwright.sync_api import Browser, Page, sync_playwright
from server_helpers import stop_process

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
WAIT_LIMIT_S = 300.0


@contextmanager
def chromium() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser: Browser, url: str) -> Page:
    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    page.set_default_timeout(WAIT_LIMIT_S * 1000)
    page.goto(url)
    page.wait_for_selector(".kv-map")
    return page


def map_counts(page: Page) -> dict[str, int]:
    """The block map's data: blocks, blockSize, cells and exact free, cached, owned, shared."""
    data = page.eval_on_selector(".kv-map", "e => ({...e.dataset})")
    return {k: int(v) for k, v in data.items()}


def wait_for_map(
    page: Page, condition: Callable[[dict[str, int]], bool], what: str
) -> dict[str, int]:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while True:
        counts = map_counts(page)
        if condition(counts):
            return counts
        assert time.monotonic() < deadline, f"gave up waiting for {what}; the map shows {counts}"
        page.wait_for_timeout(100)


def cell_states(page: Page) -> list[str]:
    return page.eval_on_selector_all(".kv-map rect", "rs => rs.map(r => r.dataset.state)")


def cells(page: Page, state: str) -> list[tuple[str, str]]:
    """``(fill, hover text)`` of the map's cells in ``state``."""
    return page.eval_on_selector_all(
        f'.kv-map rect[data-state="{state}"]',
        "rs => rs.map(r => [r.getAttribute('fill'), r.querySelector('title').textContent])",
    )


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


@contextmanager
def yaie_process(
    args: list[str], ready_url: str, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run ``yaie ARGS`` (in ``cwd``) until the block exits; wait until ``ready_url`` answers."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: nobody reads it meanwhile
        proc = subprocess.Popen(
            [sys.executable, "-m", "yaie.cli", *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            deadline = time.monotonic() + WAIT_LIMIT_S
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"yaie {' '.join(args)} exited:\n{log.read()}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code < 500:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, f"yaie {' '.join(args)} did not start"
                time.sleep(0.25)
            yield proc
        finally:
            stop_process(proc, timeout_s=20)
