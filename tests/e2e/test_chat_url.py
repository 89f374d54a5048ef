"""``yaie chat --url``: the app against a small fake OpenAI server that streams SSE.

The fake serves ``/v1/models``, YAIE's KV gauge on ``/metrics`` and streaming
``/v1/chat/completions`` the way OpenAI, vLLM and YAIE do (a role chunk, content chunks, a
finish chunk, a usage chunk, ``[DONE]``); it refuses a conversation over ``CONTEXT_CHARS``
characters with OpenAI's context-length error, and records every request body and every client
that hung up mid-stream. No model is loaded.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from chat_helpers import (
    last_reply,
    lines,
    send,
    status,
    stop_mid_reply,
    tokens_per_s,
    type_text,
    wait_until,
)
from textual.widgets import Markdown

from yaie.core.sampling import SamplingParams
from yaie.ui.chat import ChatApp, PromptInput
from yaie.ui.chat_backend import RemoteBackend

REPLY = ["Hello", " there", ",", " **friend**", "!"]
CONTEXT_CHARS = 200
SLOW_CHUNKS = 500  # a reply long enough to be stopped half-way
METRICS = """# TYPE yaie_kv_blocks gauge
yaie_kv_blocks{state="used"} 2
yaie_kv_blocks{state="cached"} 5
yaie_kv_blocks{state="free"} 93
yaie_kv_blocks_total 100
"""

pytestmark = pytest.mark.asyncio


@dataclass
class FakeOpenAI:
    bodies: list[dict] = field(default_factory=list)
    hung_up: threading.Event = field(default_factory=threading.Event)
    url: str = ""


def _handler(state: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

        def _json(self, code: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/metrics":  # YAIE's KV gauge, amid other samples
                data = METRICS.encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            models = [{"id": "fake-model", "object": "model", "max_model_len": 100}]
            self._json(200, {"object": "list", "data": models})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.bodies.append(body)
            size = sum(len(m["content"]) for m in body["messages"])
            if size > CONTEXT_CHARS:
                message = f"This model's maximum context length is 100 tokens; yours is {size}"
                self._json(400, {"error": {"message": message, "type": "invalid_request_error"}})
                return
            slow = "slowly" in body["messages"][-1]["content"]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            pieces = ["word "] * SLOW_CHUNKS if slow else REPLY
            try:
                self._event({"role": "assistant"}, None)
                for piece in pieces:
                    time.sleep(0.02)
                    self._event({"content": piece}, None)
                self._event({}, "stop")
                usage = {
                    "prompt_tokens": 12,
                    "completion_tokens": len(pieces),
                    "total_tokens": 12 + len(pieces),
                    "prompt_tokens_details": {"cached_tokens": 3},
                }
                self._send(
                    {"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage}
                )
                self.wfile.write(b"data: [DONE]\n\n")
            except (BrokenPipeError, ConnectionResetError):
                state.hung_up.set()

        def _event(self, delta: dict, finish: str | None) -> None:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            self._send({"id": "c", "object": "chat.completion.chunk", "choices": [choice]})

        def _send(self, payload: dict) -> None:
            self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
            self.wfile.flush()

    return Handler


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    state = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def _app(server: FakeOpenAI) -> ChatApp:
    return ChatApp(RemoteBackend(server.url), SamplingParams(max_tokens=50, temperature=0.0))


async def test_reply_streams_with_usage_in_the_status_bar(fake_openai: FakeOpenAI):
    app = _app(fake_openai)
    async with app.run_test(size=(100, 30)) as pilot:
        assert app.backend.model_name == "fake-model" and app.backend.max_model_len == 100
        await send(pilot, "/system Be brief.")
        await send(pilot, "/set temperature=0.5 seed=7 top_k=20")
        await send(pilot, "Hi there", typed=True)
        reply = last_reply(app)
        assert reply.text == "".join(REPLY)
        assert reply.num_updates == len(REPLY)
        assert reply.query(Markdown), "a finished reply is rendered as Markdown"
        assert tokens_per_s(app) > 0
        assert "context 17/100" in status(app)  # usage: 12 prompt + 5 completion tokens
        assert "prefix hits 3/12 tokens" in status(app)
        assert "KV 2 used, 5 cached of 100 blocks" in status(app)
        await send(pilot, "Again")

    first, second = fake_openai.bodies
    assert first["stream"] is True and first["model"] == "fake-model"
    assert (first["temperature"], first["seed"], first["top_k"], first["max_tokens"]) == (
        0.5,
        7,
        20,
        50,
    )
    assert first["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    assert second["messages"][1:] == [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "".join(REPLY)},
        {"role": "user", "content": "Again"},
    ]


async def test_a_context_length_error_drops_the_oldest_turns(fake_openai: FakeOpenAI):
    app = _app(fake_openai)
    async with app.run_test(size=(100, 30)) as pilot:
        for word in ("one", "two", "three"):
            await send(pilot, f"{word} " + "x" * 60)
        assert last_reply(app).text == "".join(REPLY)
        assert any("dropped the oldest" in line for line in lines(app, "notice"))
        assert app.conversation.start > 0
        assert len(app.conversation.messages) == 6, "the transcript keeps trimmed turns"
        await send(pilot, "y" * (CONTEXT_CHARS + 1))  # alone too long: an error line, no crash
        assert any("does not fit" in line for line in lines(app, "error"))
        assert app.conversation.messages[-1]["role"] == "assistant"
    sent = [[m["content"][:3] for m in b["messages"]] for b in fake_openai.bodies]
    assert sent[2] == ["one", "Hel", "two", "Hel", "thr"]  # refused...
    assert sent[3] == ["two", "Hel", "thr"]  # ...then sent without the oldest turn


async def test_stopping_closes_the_stream_and_keeps_the_partial_reply(fake_openai: FakeOpenAI):
    app = _app(fake_openai)
    async with app.run_test(size=(100, 30)) as pilot:
        reply = await stop_mid_reply(pilot, "answer slowly")
        await wait_until(pilot, fake_openai.hung_up.is_set, "the server to see the hang-up")
        assert reply.text.startswith("word ") and len(reply.text) < 5 * SLOW_CHUNKS
        assert "stopped" in str(reply.query(".note").first().content)
        assert app.conversation.messages[-1] == {"role": "assistant", "content": reply.text}


async def test_input_history_and_multiline_input(fake_openai: FakeOpenAI):
    app = _app(fake_openai)
    async with app.run_test(size=(100, 30)) as pilot:
        prompt = app.query_one(PromptInput)
        await type_text(pilot, "a")
        await pilot.press("ctrl+j")
        await type_text(pilot, "b")
        assert prompt.text == "a\nb"
        await pilot.press("enter")
        await wait_until(pilot, lambda: not app.generating, "the reply")
        await send(pilot, "second", typed=True)
        await type_text(pilot, "draft")
        await pilot.press("up")
        assert prompt.text == "second"
        await pilot.press("up")  # "a\nb", with the cursor on its last line...
        assert prompt.text == "a\nb"
        await pilot.press("down")  # ...so down goes forward in the history
        assert prompt.text == "second"
        await pilot.press("down")
        assert prompt.text == "draft"
    assert fake_openai.bodies[0]["messages"][-1]["content"] == "a\nb"


async def test_an_unreachable_server_ends_the_app_with_one_message():
    app = ChatApp(RemoteBackend("http://127.0.0.1:9"))
    async with app.run_test() as pilot:
        await pilot.pause()
    assert app.return_value is not None and "cannot reach" in app.return_value
