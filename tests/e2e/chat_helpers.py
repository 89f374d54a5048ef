"""Driving ``ChatApp`` through Textual's pilot: type like a user, wait for the app."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from textual.pilot import Pilot
from textual.widgets import Static

from yaie.ui.chat import ChatApp, PromptInput, Reply

# A guard against a hung app, not a speed check: CPU replies on a loaded CI box are slow.
WAIT_LIMIT_S = 300.0


async def wait_until(pilot: Pilot, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_S
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        await pilot.pause(0.02)


async def type_text(pilot: Pilot, text: str) -> None:
    """Key by key, as a user types (Enter is not pressed)."""
    await pilot.press(*text)


async def submit(pilot: Pilot, text: str, typed: bool = False) -> None:
    """Submit ``text``, typed key by key or pasted, without waiting for the answer."""
    if typed:
        await type_text(pilot, text)
    else:
        pilot.app.query_one(PromptInput).load_text(text)
    await pilot.press("enter")


async def send(pilot: Pilot, text: str, typed: bool = False) -> None:
    """Submit ``text`` and wait until the app has answered."""
    app: ChatApp = pilot.app
    await submit(pilot, text, typed)
    await wait_until(pilot, lambda: not app.generating, "the reply to end")
    await pilot.pause()


async def stop_mid_reply(pilot: Pilot, text: str) -> Reply:
    """Submit ``text``, press Esc once the reply has streamed, wait for the app to stop it."""
    app: ChatApp = pilot.app
    await submit(pilot, text)
    await wait_until(pilot, lambda: last_reply(app).num_updates >= 1, "the reply to stream")
    await pilot.press("escape")
    await wait_until(pilot, lambda: not app.generating, "the reply to stop")
    return last_reply(app)


def last_reply(app: ChatApp) -> Reply:
    return app.query(Reply).last()


def lines(app: ChatApp, kind: str) -> list[str]:
    """Text of the log's notice or error lines."""
    return [str(w.content) for w in app.query(f"#log > .{kind}").results(Static)]


def status(app: ChatApp) -> str:
    return str(app.query_one("#status", Static).content)


def tokens_per_s(app: ChatApp) -> float:
    match = re.search(r"([\d.]+) tok/s", status(app))
    assert match, status(app)
    return float(match.group(1))
