"""Bad requests get OpenAI's error body naming the problem, and the server keeps serving.

The server runs with a 64-token context, so "longer than the context" is cheap to reach and
the schema fuzzing at the end (schemathesis, from the served OpenAPI schema) never waits on a
long generation.
"""

from __future__ import annotations

import asyncio
import collections

import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance
from schemathesis.config import SchemathesisConfig
from server_helpers import Server, assert_idle_pool

pytestmark = pytest.mark.slow

CONTEXT = 64
SERVER_ARGS = ["--max-model-len", CONTEXT, "--kv-cache-memory", "32MiB"]
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _chat(**fields) -> dict:
    return {"model": MODEL, "messages": HI, "max_tokens": 2, **fields}


def _completion(**fields) -> dict:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **fields}


def _without(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


# (path, JSON body or raw bytes, status, the error's param, words its message must contain)
CASES = [
    (CHAT, b'{"model": "x", "messages": [', 400, None, "not valid JSON"),
    (COMPLETIONS, b'{"model": x}', 400, None, "not valid JSON"),
    (CHAT, b"[1, 2]", 400, None, "Expected `object`"),
    (CHAT, _without(_chat(), "messages"), 400, "messages", "messages"),
    (COMPLETIONS, _without(_completion(), "prompt"), 400, "prompt", "prompt"),
    (CHAT, _without(_chat(), "model"), 400, "model", "model"),
    (CHAT, _chat(messages="hi"), 400, "messages", "Expected `array`"),
    (CHAT, _chat(messages=[]), 400, "messages", "length >= 1"),
    (CHAT, _chat(messages=[{"content": "hi"}]), 400, "role", "role"),
    (CHAT, _chat(temperature="hot"), 400, "temperature", "Expected `float"),
    (CHAT, _chat(temperature=-0.5), 400, "temperature", ">= 0"),
    (CHAT, _chat(top_p=1.5), 400, "top_p", "<= 1"),
    (CHAT, _chat(top_p=0), 400, "top_p", "> 0"),
    (CHAT, _chat(max_tokens=0), 400, "max_tokens", ">= 1"),
    (COMPLETIONS, _completion(max_tokens=-3), 400, "max_tokens", ">= 1"),
    (CHAT, _chat(n=0), 400, "n", ">= 1"),
    (CHAT, _chat(presence_penalty=3), 400, "presence_penalty", "<= 2"),
    (CHAT, _chat(logprobs=True, top_logprobs=30), 400, "top_logprobs", "<= 20"),
    (CHAT, _chat(top_logprobs=2), 400, "top_logprobs", "logprobs=true"),
    (CHAT, _chat(stop=[""]), 400, "stop", "non-empty"),
    (CHAT, _chat(model="gpt-4o"), 404, "model", "does not exist"),
    (
        CHAT,
        _chat(messages=[{"role": "user", "content": "word " * 100}]),
        400,
        "messages",
        "maximum context length",
    ),
    (COMPLETIONS, _completion(prompt="word " * 100), 400, "prompt", "maximum context length"),
    (COMPLETIONS, _completion(max_tokens=CONTEXT), 400, "max_tokens", "maximum context length"),
    (COMPLETIONS, _completion(prompt=""), 400, "prompt", "empty"),
    (COMPLETIONS, _completion(prompt=[1, 10**6]), 400, "prompt", "outside the vocabulary"),
    (COMPLETIONS, _completion(prompt=["a", "b"]), 400, "prompt", "separate requests"),
    (
        CHAT,
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        400,
        "tools",
        "not supported",
    ),
    (CHAT, _chat(response_format={"type": "json_object"}), 400, "response_format", "supported"),
    (
        CHAT,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]),
        400,
        "messages[0].content[0].type",
        "image_url",
    ),
    (COMPLETIONS, _completion(echo=True), 400, "echo", "not supported"),
]


@pytest.mark.parametrize(
    "path, body, status, param, words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_bad_request_gets_an_openai_error_and_the_server_keeps_serving(
    server: Server, path: str, body: dict | bytes, status: int, param: str | None, words: str
):
    sent = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = server.post(path, **sent)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and words in error["message"], error
    assert error["type"] == "invalid_request_error"
    _assert_still_serving(server)


def test_unknown_routes_and_methods_get_the_error_shape(server: Server):
    for response, status in ((server.get("/v1/nope"), 404), (server.get(CHAT), 405)):
        assert response.status_code == status and "message" in response.json()["error"]


def test_the_openai_client_raises_typed_errors_sync_async_and_streaming(server: Server):
    client = server.client()
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    assert bad.value.param == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=HI, stream=True)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as long:
        client.completions.create(model=MODEL, prompt="word " * 100, stream=True)
    assert long.value.code == "context_length_exceeded"

    async def main() -> None:
        with pytest.raises(openai.BadRequestError) as top_p:
            await server.async_client().completions.create(model=MODEL, prompt="hi", top_p=2)
        assert top_p.value.param == "top_p"

    asyncio.run(main())
    _assert_still_serving(server)


def _assert_still_serving(server: Server) -> None:
    out = server.client().completions.create(
        model=MODEL, prompt="Hello", max_tokens=1, temperature=0
    )
    assert out.usage.completion_tokens == 1


# ---------------------------------------------------------------------------- fuzzing

# Generated bodies that pass the schema may still be refused for what a schema cannot say (the
# model name, a prompt too long for the context), so schema-valid data may get a 400; what must
# hold is no 5xx, documented status codes, content types and bodies, and schema-invalid data
# refused with a 4xx. Hypothesis drives each operation directly: schemathesis' pytest plugin
# (``from_fixture``) does not run under pytest 9.
FUZZ_EXAMPLES = 20
FUZZ_CONFIG = "request-timeout = 120"


def test_fuzzed_requests_never_get_a_5xx(server: Server):
    schema = schemathesis.openapi.from_url(
        f"{server.url}/schema/openapi.json", config=SchemathesisConfig.from_str(FUZZ_CONFIG)
    )

    @schema.hook
    def map_body(ctx, body):  # the served model, so bodies reach the engine (404s are tested above)
        if isinstance(body, dict) and isinstance(body.get("model"), str):
            body["model"] = MODEL
        return body

    fuzz = settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],
    )
    statuses: collections.Counter[tuple[str, int]] = collections.Counter()
    for operation in (result.ok() for result in schema.get_all_operations()):
        # Only a body can be made invalid: a GET without parameters has no negative case.
        modes = [GenerationMode.POSITIVE] + (
            [GenerationMode.NEGATIVE] if operation.method == "post" else []
        )
        for mode in modes:

            @fuzz
            @given(case=operation.as_strategy(mode))
            def check(case) -> None:
                response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
                statuses[(case.operation.path, response.status_code)] += 1

            check()
    assert statuses[(CHAT, 200)] and statuses[(COMPLETIONS, 200)], (
        statuses
    )  # generation was reached
    assert_idle_pool(server.wait_idle())
