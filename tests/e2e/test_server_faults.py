"""Faults and limits: an API key, a full waiting queue (429) and a step that raises (500).

The server runs through ``fault_server.py``, which makes the executor raise on any step that
would compute a third output token for a prompt containing ``FAULT_TOKEN``; one request runs at
a time and one may wait, so overload is easy to reach.
"""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from fault_server import FAULT_AFTER, FAULT_TOKEN
from server_helpers import Server, assert_idle_pool

pytestmark = pytest.mark.slow

KEY = "test-key"
SERVER_SCRIPT = "fault_server.py"
SERVER_ARGS = [
    "--api-key",
    KEY,
    "--max-num-seqs",
    1,
    "--max-waiting",
    1,
    "--max-model-len",
    256,
    "--kv-cache-memory",
    "32MiB",
]
FAULTY_PROMPT = [1, 2, 3, FAULT_TOKEN]


def test_api_key_guards_v1_and_engine_state_only(server: Server):
    for key in (None, "wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path in ("/v1/models", "/engine/state"):
            response = httpx.get(f"{server.url}{path}", headers=headers)
            assert response.status_code == 401
            assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert server.client().models.list().data[0].id == server.model
    for open_path in ("/health", "/metrics", "/schema/openapi.json"):
        assert httpx.get(f"{server.url}{open_path}").status_code == 200


def test_overload_answers_429_and_recovers(server: Server):
    long = {
        "model": server.model,
        "prompt": "Tell a story.",
        "max_tokens": 200,
        "extra_body": {"ignore_eos": True},
    }

    async def main() -> None:
        client = server.async_client()
        running = await client.completions.create(**long, stream=True)
        await anext(aiter(running))  # first token out: it holds the only running slot
        queued = asyncio.ensure_future(client.completions.create(**long, stream=True))
        while not (await asyncio.to_thread(server.state))["waiting"]:
            await asyncio.sleep(0.05)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.completions.create(model=server.model, prompt="hi", max_tokens=1)
        assert "overloaded" in refused.value.message
        assert refused.value.response.headers["retry-after"] == "1"
        await running.close()
        await (await queued).close()

    asyncio.run(main())
    assert_idle_pool(server.wait_idle())
    assert server.client().completions.create(model=server.model, prompt="hi", max_tokens=1).choices


def test_a_failed_step_is_a_500_and_the_server_keeps_serving(server: Server):
    client = server.client()
    with pytest.raises(openai.InternalServerError) as failed:
        client.completions.create(model=server.model, prompt=FAULTY_PROMPT, max_tokens=20)
    assert failed.value.status_code == 500 and "injected fault" in failed.value.message
    assert failed.value.type == "server_error"
    out = client.completions.create(model=server.model, prompt="Hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens == 3
    assert_idle_pool(server.wait_idle())


def test_a_failed_step_mid_stream_sends_an_error_event(server: Server):
    async def main() -> int:
        client = server.async_client()
        tokens = 0
        stream = (
            await client.completions.create(  # logprobs: one event per token, even without text
                model=server.model,
                prompt=FAULTY_PROMPT,
                max_tokens=20,
                temperature=0,
                stream=True,
                logprobs=1,
            )
        )
        with pytest.raises(openai.APIError, match="injected fault"):
            async for chunk in stream:
                tokens += len(chunk.choices[0].logprobs.tokens)
        return tokens

    assert asyncio.run(main()) == FAULT_AFTER  # the tokens before the failing step arrived
    chat = server.client().chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content
    assert_idle_pool(server.wait_idle())
