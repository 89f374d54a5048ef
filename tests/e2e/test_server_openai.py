"""``yaie serve`` against the official ``openai`` client: sync, async and streaming.

One server for the module (the default model on CPU, a 512-token context); every request asks
for a few tokens, greedy unless the test is about sampling, so results are exact and cheap.
"""

from __future__ import annotations

import asyncio
import collections

import httpx
import pytest
from server_helpers import Server, assert_idle_pool

from yaie.tokenizer import apply_chat_template

pytestmark = pytest.mark.slow

SERVER_ARGS = ["--max-model-len", 512, "--kv-cache-memory", "64MiB", "--max-num-seqs", 16]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "max_tokens": 32}


def test_models_health_and_schema(server: Server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [server.model]
    assert client.models.retrieve(server.model).id == server.model
    assert server.get("/health").json()["status"] == "ok"
    schema = server.get("/schema/openapi.json").json()
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ErrorResponse"
    )
    temperature = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"][
        "temperature"
    ]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)


def test_chat_greedy_answer_usage_and_finish_reasons(server: Server, smollm2_tokenizer):
    client = server.client()
    full = client.chat.completions.create(model=server.model, messages=QUESTION, **GREEDY)
    choice = full.choices[0]
    assert "Paris" in choice.message.content and choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    prompt_len = len(apply_chat_template(smollm2_tokenizer, QUESTION))
    assert full.usage.prompt_tokens == prompt_len
    assert full.usage.total_tokens == prompt_len + full.usage.completion_tokens
    assert full.id.startswith("chatcmpl-") and full.model == server.model

    again = client.chat.completions.create(model=server.model, messages=QUESTION, **GREEDY)
    assert again.choices[0].message.content == choice.message.content  # greedy is deterministic
    assert (
        again.usage.prompt_tokens_details.cached_tokens > 0
    )  # the prompt's full blocks were cached

    short = client.chat.completions.create(
        model=server.model, messages=QUESTION, temperature=0, max_completion_tokens=3
    )
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    assert choice.message.content.startswith(short.choices[0].message.content)


def test_streaming_matches_the_full_response(server: Server):
    client = server.client()
    full = client.chat.completions.create(model=server.model, messages=QUESTION, **GREEDY)
    chunks = list(
        client.chat.completions.create(
            model=server.model,
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    assert (
        chunks[-1].choices == []
        and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    )
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_completions_with_text_and_token_id_prompts(server: Server, smollm2_tokenizer):
    client = server.client()
    prompt = "The capital of France is"
    by_text = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, max_tokens=5
    )
    ids = smollm2_tokenizer.encode(prompt)
    by_ids = client.completions.create(model=server.model, prompt=ids, temperature=0, max_tokens=5)
    assert by_text.choices[0].text == by_ids.choices[0].text and by_text.choices[0].text
    assert by_text.usage.prompt_tokens == len(ids) and by_text.usage.completion_tokens == 5
    assert by_text.choices[0].finish_reason == "length" and by_text.object == "text_completion"
    default = client.completions.create(
        model=server.model, prompt=prompt, temperature=0, extra_body={"ignore_eos": True}
    )
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=server.model, prompt=prompt, temperature=0, max_tokens=5, stream=True
        )
    )
    assert streamed == by_text.choices[0].text


def test_stop_strings_cut_the_text(server: Server):
    client = server.client()
    body = {"model": server.model, "prompt": "1, 2, 3, 4,", "temperature": 0, "max_tokens": 12}
    free = client.completions.create(**body).choices[0].text
    assert " 6" in free, free
    for stop in (" 6", [" 6", "never"]):
        cut = client.completions.create(**body, stop=stop).choices[0]
        assert cut.text == free[: free.index(" 6")] and cut.finish_reason == "stop"
    streamed = client.completions.create(**body, stop=[" 6"], stream=True)
    assert "".join(c.choices[0].text for c in streamed) == free[: free.index(" 6")]


def test_n_choices_and_seeds(server: Server):
    client = server.client()
    body = {
        "model": server.model,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 1.0,
        "n": 3,
    }
    first = client.chat.completions.create(**body, seed=7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    again = client.chat.completions.create(**body, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    assert len({c.message.content for c in first.choices}) > 1  # seed + i per choice: not clones
    texts = collections.defaultdict(str)
    tokens = 0
    for chunk in client.chat.completions.create(
        **body, seed=7, stream=True, stream_options={"include_usage": True}
    ):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    assert [texts[i] for i in range(3)] == [c.message.content for c in first.choices]
    assert tokens == first.usage.completion_tokens


def test_sampling_filters_that_leave_one_token_are_greedy(server: Server):
    client = server.client()
    greedy = client.completions.create(
        model=server.model, prompt="Once upon a time", temperature=0, max_tokens=8
    )
    for knobs in ({"top_p": 1e-6}, {"extra_body": {"top_k": 1}}, {"extra_body": {"min_p": 1.0}}):
        sampled = client.completions.create(
            model=server.model,
            prompt="Once upon a time",
            temperature=1.5,
            max_tokens=8,
            seed=1,
            **knobs,
        )
        assert sampled.choices[0].text == greedy.choices[0].text, knobs


def test_penalties_reduce_repetition(server: Server):
    client = server.client()
    body = {"model": server.model, "prompt": "1 1 1 1 1 1 1", "temperature": 0, "max_tokens": 16}

    def repeats(**penalty) -> int:
        text = client.completions.create(**body, **penalty).choices[0].text
        return collections.Counter(text.split()).most_common(1)[0][1] if text.split() else 0

    plain = repeats()
    assert repeats(frequency_penalty=2.0) < plain
    assert repeats(presence_penalty=2.0) < plain


def test_chat_logprobs(server: Server):
    client = server.client()
    out = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the most likely token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )
        assert bytes(entry.bytes).decode() == entry.token
    assert "".join(e.token for e in content) == out.choices[0].message.content
    plain = client.chat.completions.create(
        model=server.model, messages=QUESTION, temperature=0, max_tokens=2
    )
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_full_and_streamed(server: Server):
    client = server.client()
    body = {
        "model": server.model,
        "prompt": "The capital of France is",
        "temperature": 0,
        "max_tokens": 5,
        "logprobs": 2,
    }
    out = client.completions.create(**body).choices[0]
    lp = out.logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    )
    assert "".join(lp.tokens) == out.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(
        len(top) == 2 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs)
    )
    streamed = [c.choices[0].logprobs for c in client.completions.create(**body, stream=True)]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_async_clients_run_concurrently_and_the_pool_returns_to_idle(server: Server):
    async def main() -> list[str]:
        client = server.async_client()

        async def chat(i: int) -> str:
            out = await client.chat.completions.create(
                model=server.model,
                messages=[{"role": "user", "content": f"Say the number {i}"}],
                max_tokens=6,
                temperature=0,
            )
            return out.choices[0].message.content

        async def stream(i: int) -> str:
            chunks = await client.completions.create(
                model=server.model,
                prompt=f"Count from {i}:",
                max_tokens=6,
                temperature=0,
                stream=True,
            )
            return "".join([c.choices[0].text async for c in chunks])

        return await asyncio.gather(*(chat(i) for i in range(3)), *(stream(i) for i in range(3)))

    results = asyncio.run(main())
    assert len(results) == 6 and all(results)
    assert_idle_pool(server.wait_idle())


def test_client_disconnect_mid_stream_aborts_and_frees_blocks(server: Server):
    before = server.state()["stats"]["generation_tokens"]
    body = {
        "model": server.model,
        "prompt": "Write a very long story about a dragon.",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 3:
                break  # leaving the block closes the connection mid-stream
    state = server.wait_idle()
    assert_idle_pool(state)
    generated = state["stats"]["generation_tokens"] - before
    assert 3 <= generated < 400  # aborted long before max_tokens


def test_metrics_and_engine_state(server: Server):
    server.client().completions.create(
        model=server.model, prompt="Hello", max_tokens=2, temperature=0
    )
    text = server.get("/metrics").text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)  # every sample line parses
    assert samples["yaie_time_to_first_token_seconds_count"] >= 1
    assert (
        samples['yaie_time_to_first_token_seconds_bucket{le="+Inf"}']
        == samples["yaie_time_to_first_token_seconds_count"]
    )
    assert samples["yaie_generation_tokens_total"] >= 2
    assert samples['yaie_http_responses_total{path="/v1/completions",status="200"}'] >= 1
    state = server.state()
    kv_gauges = [samples[f'yaie_kv_blocks{{state="{s}"}}'] for s in ("used", "cached", "free")]
    assert sum(kv_gauges) == samples["yaie_kv_blocks_total"] == len(state["kv"]["blocks"])
    assert samples["process_resident_memory_bytes"] > 0
    assert state["model"] == server.model
    assert {"running", "waiting", "steps", "num_preemptions", "time"} <= set(state)
    assert state["steps"] and state["kv"]["radix"] is not None
