"""What the tests that run ``yaie`` in a subprocess share: a port to start it on, stopping it,
a handle on a running ``yaie serve`` and the idle-pool check."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from yaie.hub import DEFAULT_MODEL


@dataclass(slots=True)
class Server:
    url: str  # http://127.0.0.1:PORT
    api_key: str | None
    model: str = DEFAULT_MODEL

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs) -> openai.OpenAI:
        """The official client; no retries, so a 429 or 500 reaches the test as it was sent."""
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def async_client(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key=self.api_key or "none", max_retries=0, **kwargs
        )

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.url}{path}", headers=self.headers, timeout=120, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=self.headers, timeout=60, **kwargs)

    def state(self) -> dict:
        response = self.get("/engine/state")
        response.raise_for_status()
        return response.json()

    def wait_idle(self, timeout_s: float = 60) -> dict:
        """Poll ``/engine/state`` until no request is running or waiting; return that state.

        Aborts reach the engine thread asynchronously, so a test that just dropped a stream
        waits here instead of asserting at once (the bound only stops a hung test)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            state = self.state()
            if not state["running"] and not state["waiting"]:
                return state
            time.sleep(0.05)
        return self.state()


def assert_idle_pool(state: dict) -> None:
    """Every KV block is free or held only by the radix cache; no request holds any."""
    assert not state["running"] and not state["waiting"]
    held = [b for b in state["kv"]["blocks"] if b["state"] not in ("free", "cached")]
    assert held == [], f"blocks still owned after every request ended: {held[:5]}"
    stats = state["stats"]
    assert stats["blocks_free"] + stats["blocks_cached"] == stats["blocks_total"]


def wait_healthy(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    """Wait until ``yaie serve`` at ``url`` answers ``/health``; fail the test with the server's
    log if it exits or is not up within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"yaie serve exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    pytest.fail(f"yaie serve was not healthy in {timeout_s} s:\n{log_path.read_text()}")


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it), for a child server to bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float) -> None:
    """Ask ``process`` to exit (SIGTERM: ``yaie`` shuts down cleanly) and wait; kill it if it is
    still running after ``timeout_s``, so a hung child never outlives the test."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
