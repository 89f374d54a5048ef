"""``yaie chat`` on the real default model in this process, driven by Textual's pilot.

One model for the module, with a 256-token context so trimming is cheap to reach; replies are
a few greedy tokens (CI is a 2-core CPU box). The pool check after a stop is the engine's own
invariant: with no live request, each block is free or held by the radix cache alone.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub.constants
import pytest
from chat_helpers import (
    last_reply,
    lines,
    send,
    status,
    stop_mid_reply,
    submit,
    tokens_per_s,
    wait_until,
)
from textual.widgets import Markdown

from yaie.core.sampling import SamplingParams
from yaie.hub import ResolvedModel
from yaie.llm import LLM
from yaie.ui.chat import ChatApp
from yaie.ui.chat_backend import LocalBackend

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

ARTIFACTS = Path(__file__).parent.parent / "artifacts"
CONTEXT = 256


@pytest.fixture(scope="module")
def llm(smollm2: ResolvedModel) -> LLM:
    """The default model by its default name, as `yaie chat` opens it; offline, it resolves to
    the GGUF that ``smollm2`` fetched."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        return LLM(None, kv_cache_memory="64MiB", max_model_len=CONTEXT)


def _app(llm: LLM, **params) -> ChatApp:
    return ChatApp(LocalBackend(llm), SamplingParams(**{"temperature": 0.0, **params}))


def _assert_pool_idle(backend: LocalBackend) -> None:
    engine = backend.engine.engine
    assert backend.engine.is_idle and not engine.requests
    engine.kv.check_invariants([])


async def test_multi_turn_chat_streams_and_reports_the_engine(llm: LLM, tmp_path: Path):
    app = _app(llm, max_tokens=8)
    async with app.run_test(size=(110, 32)) as pilot:
        await send(pilot, "What is the capital of France?", typed=True)
        reply = last_reply(app)
        assert "Paris" in reply.text
        assert reply.num_updates > 1, "the reply streamed in pieces"
        assert reply.query(Markdown), "a finished reply is rendered as Markdown"
        assert tokens_per_s(app) > 0
        used = int(re.search(r"context (\d+)/256", status(app)).group(1))
        assert used > 8
        assert re.search(r"KV \d+ used, \d+ cached of \d+ blocks", status(app))
        ARTIFACTS.mkdir(exist_ok=True)
        app.save_screenshot("chat.svg", path=str(ARTIFACTS))

        await send(pilot, "And of Germany?")
        hits = re.search(r"prefix hits (\d+)/(\d+) tokens", status(app))
        assert hits and int(hits.group(1)) > 0, "turn 2 reuses turn 1's KV blocks"
        assert int(hits.group(2)) > used, "turn 2's prompt holds turn 1"
        assert [m["role"] for m in app.conversation.messages] == ["user", "assistant"] * 2

        await send(pilot, f"/save {tmp_path / 'chat.json'}")
        await send(pilot, f"/save {tmp_path / 'chat.md'}")
        await send(pilot, f"/save {tmp_path / 'chat.txt'}")
        saved = json.loads((tmp_path / "chat.json").read_text())
        assert saved["messages"] == app.conversation.messages
        assert saved["settings"]["max_tokens"] == 8
        assert "What is the capital of France?" in (tmp_path / "chat.md").read_text()
        assert any(".json or .md" in line for line in lines(app, "error"))

        await send(pilot, "/clear")
        assert not app.query("#log > *") and not app.conversation.messages
    assert (ARTIFACTS / "chat.svg").read_text().startswith("<svg")
    _assert_pool_idle(app.backend)


async def test_stopping_aborts_the_request_and_frees_its_blocks(llm: LLM):
    app = _app(llm, max_tokens=200, ignore_eos=True)
    engine = app.backend.engine.engine
    async with app.run_test(size=(100, 30)) as pilot:
        reply = await stop_mid_reply(pilot, "Tell me a long story about a dragon.")
        await wait_until(pilot, lambda: app.backend.engine.is_idle, "the engine to go idle")
        _assert_pool_idle(app.backend)
        assert engine.finished_metrics[-1].finish_reason == "abort"
        assert 0 < engine.finished_metrics[-1].num_output_tokens < 200
        assert app.conversation.messages[-1] == {"role": "assistant", "content": reply.text}

        await submit(pilot, "Another story, please.")
        await pilot.press("ctrl+c")  # during the prefill
        await wait_until(pilot, lambda: not app.generating, "the stop")
        await wait_until(pilot, lambda: app.backend.engine.is_idle, "the engine to go idle")
        _assert_pool_idle(app.backend)

        params = app.params
        for bad in (
            "temperature=hot",
            "top_p=2",
            "max_tokens=0",
            "seed=1.5",
            "colour=red",
            "top_p",
        ):
            await send(pilot, f"/set {bad}")
        errors = lines(app, "error")
        assert len(errors) == 6 and "top_p" in errors[1] and "max_tokens" in errors[2]
        assert app.params == params and app.is_running
        await send(pilot, "/set temperature=0.7 top_p=0.9 max_tokens=256 seed=1")
        assert (
            app.params.temperature,
            app.params.top_p,
            app.params.max_tokens,
            app.params.seed,
        ) == (
            0.7,
            0.9,
            256,
            1,
        )


async def test_a_conversation_longer_than_the_context_is_trimmed(llm: LLM):
    app = _app(llm, max_tokens=3)
    long_turn = "Please remember these fruits: " + "apple, banana, cherry, " * 12
    async with app.run_test(size=(100, 30)) as pilot:
        for _ in range(3):
            await send(pilot, long_turn)
        assert any("dropped the oldest" in line for line in lines(app, "notice"))
        assert app.conversation.start > 0 and not lines(app, "error")
        assert len(llm.encode(app.conversation.context())) + 3 <= CONTEXT

        await send(pilot, "cherry " * CONTEXT)  # longer than the context on its own
        assert any("does not fit" in line for line in lines(app, "error"))
        assert app.conversation.messages[-1]["role"] == "assistant"
    _assert_pool_idle(app.backend)
