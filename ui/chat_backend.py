"""Where ``yaie chat`` gets replies: the engine in this process, or any OpenAI-compatible server.

The app only ever sees ``ChatBackend``: hand it the conversation, get ``ReplyChunk``s back. Both
backends report what they know about the engine in the same records, so the status bar is one
piece of code; what a server does not tell (KV blocks, cache hits) simply stays unknown.

A conversation that no longer fits the context is signalled with ``ContextTooLong`` *before*
any token streams, and the app answers by dropping the oldest turn and asking again. In process
the check is exact (the prompt is tokenized with the chat template here); a server says so
itself, with an HTTP 400 whose message mentions the context.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from yaie.core.async_engine import AsyncEngine
from yaie.core.request import FinishReason
from yaie.core.sampling import SamplingParams

Messages = Sequence[Mapping[str, str]]


class ContextTooLong(ValueError):
    """The conversation, plus room for a reply, is longer than the model's context."""


class BackendError(ValueError):
    """The backend could not answer (bad request, server down); the message says why."""


@dataclass(slots=True)
class ReplyChunk:
    """A piece of a streamed reply; counts are ``None`` where the backend does not know them."""

    text: str
    num_tokens: int  # new tokens in this piece
    finish_reason: str | None = None  # set on the piece that ends the reply
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache
    completion_tokens: int | None = None


@dataclass(slots=True)
class KVUsage:
    """The engine's KV pool right now: blocks held by requests (``used``) and blocks held only
    by the radix tree (``cached``, reusable by a later prompt with the same prefix); the same
    split as the server's ``yaie_kv_blocks`` metric."""

    total: int
    used: int
    cached: int


class ChatBackend(Protocol):
    model_name: str
    max_model_len: int | None

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    def stream(self, messages: Messages, params: SamplingParams) -> AsyncIterator[ReplyChunk]:
        """Stream one reply. Raises ``ContextTooLong`` or ``BackendError`` before the first
        chunk; closing the iterator early stops the generation on the other side."""
        ...

    async def kv_usage(self) -> KVUsage | None: ...


def reply_room(params: SamplingParams, max_model_len: int) -> int:
    """Tokens kept free for the reply when deciding whether a conversation fits: the reply's
    ``max_tokens``, but never more than half the context (a huge ``max_tokens`` must not erase
    the whole history; the engine ends such a reply at the context's end instead)."""
    return min(params.max_tokens or max_model_len, max_model_len // 2)


class LocalBackend:
    """The engine in this process, on ``AsyncEngine``'s background thread."""

    def __init__(self, llm: Any) -> None:  # a yaie.LLM; Any keeps torch out of this import
        self.llm = llm
        self.engine = AsyncEngine(llm.engine)
        self.model_name: str = llm.model_name
        self.max_model_len: int | None = llm.max_model_len

    async def open(self) -> None:
        self.engine.start()

    async def close(self) -> None:
        await asyncio.to_thread(self.engine.stop)

    async def stream(self, messages: Messages, params: SamplingParams) -> AsyncIterator[ReplyChunk]:
        ids = self.llm.encode(list(messages))  # ValueError: no chat template, rejected roles
        limit = self.llm.max_model_len
        if len(ids) + reply_room(params, limit) > limit:
            raise ContextTooLong(
                f"the conversation has {len(ids)} tokens and the reply needs room for "
                f"{reply_room(params, limit)} of the model's {limit}"
            )
        async with aclosing(self.engine.generate(ids, params)) as outputs:
            async for out in outputs:
                if out.finish_reason is FinishReason.ERROR:
                    raise BackendError(out.error or "the engine failed on this request")
                m = out.metrics
                yield ReplyChunk(
                    out.text,
                    len(out.new_token_ids),
                    out.finish_reason.value if out.finish_reason else None,
                    len(ids),
                    m.num_cached_tokens if m else None,
                    m.num_output_tokens if m else None,
                )

    async def kv_usage(self) -> KVUsage:
        s = await asyncio.to_thread(self.engine.stats)
        total, cached = s["blocks_total"], s["blocks_cached"]
        return KVUsage(total, total - s["blocks_free"] - cached, cached)


class RemoteBackend:
    """Any OpenAI-compatible server: streaming ``/v1/chat/completions`` over SSE."""

    def __init__(self, url: str, model: str | None = None, api_key: str | None = None) -> None:
        base = url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else f"{base}/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a long prompt on a busy CPU server may take minutes to its first token.
        self.client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(10.0, read=None)
        )
        self.model_name: str = model or ""
        self.max_model_len: int | None = None
        self._metrics_url: str | None = f"{self.base_url.removesuffix('/v1')}/metrics"

    async def open(self) -> None:
        """Ask the server which model it serves (and its context, where it says, as vLLM and
        YAIE do); fails with one clear line when the server is not there."""
        try:
            response = await self.client.get("/models")
        except httpx.HTTPError as exc:
            raise BackendError(f"cannot reach {self.base_url}: {exc}") from None
        if response.status_code != 200:
            raise BackendError(f"{self.base_url}/models answered {_error_message(response)}")
        models = response.json().get("data") or []
        if not models:
            raise BackendError(f"{self.base_url} serves no model")
        card = next((m for m in models if m.get("id") == self.model_name), None)
        if card is None:
            if self.model_name:
                names = ", ".join(str(m.get("id")) for m in models)
                raise BackendError(
                    f"{self.base_url} does not serve {self.model_name!r} (it serves {names})"
                )
            card = models[0]
        self.model_name = str(card.get("id"))
        self.max_model_len = card.get("max_model_len")

    async def close(self) -> None:
        await self.client.aclose()

    def request_body(self, messages: Messages, params: SamplingParams) -> dict[str, Any]:
        """OpenAI's fields, plus YAIE/vLLM's extras only where they differ from the default
        (OpenAI itself rejects fields it does not know)."""
        body: dict[str, Any] = {
            "model": self.model_name,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        for name in ("max_tokens", "seed"):
            if getattr(params, name) is not None:
                body[name] = getattr(params, name)
        defaults = SamplingParams()
        for name in (
            "top_k",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            if getattr(params, name) != getattr(defaults, name):
                body[name] = getattr(params, name)
        return body

    async def stream(self, messages: Messages, params: SamplingParams) -> AsyncIterator[ReplyChunk]:
        body = self.request_body(messages, params)
        try:
            async with self.client.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    message = _error_message(response)
                    if response.status_code == 400 and "context" in message.lower():
                        raise ContextTooLong(message)
                    raise BackendError(f"the server answered {message}")
                async for line in response.aiter_lines():
                    chunk = _parse_event(line)
                    if chunk is not None:
                        yield chunk
        except httpx.HTTPError as exc:
            raise BackendError(f"lost the connection to {self.base_url}: {exc}") from None

    async def kv_usage(self) -> KVUsage | None:
        """YAIE's server exports its KV pool on ``/metrics``; a server that does not is asked
        only once."""
        if self._metrics_url is None:
            return None
        try:
            response = await self.client.get(self._metrics_url)
        except httpx.HTTPError:
            return None  # the stream reports a dead server; this is only the status bar
        usage = _kv_blocks(response.text) if response.status_code == 200 else None
        if usage is None:
            self._metrics_url = None
        return usage


_KV_SAMPLE = re.compile(r'^yaie_kv_blocks\{state="(\w+)"\} (\S+)$', re.MULTILINE)


def _kv_blocks(exposition: str) -> KVUsage | None:
    states = {m[1]: int(float(m[2])) for m in _KV_SAMPLE.finditer(exposition)}
    if not {"used", "cached", "free"} <= states.keys():
        return None
    return KVUsage(
        states["used"] + states["cached"] + states["free"], states["used"], states["cached"]
    )


def _parse_event(line: str) -> ReplyChunk | None:
    """One SSE line → a chunk (``None`` for keep-alives, comments and ``[DONE]``)."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]" or not data:
        return None
    try:
        event = json.loads(data)
    except json.JSONDecodeError:
        raise BackendError(f"the server sent a malformed event: {data[:80]!r}") from None
    if "error" in event:
        raise BackendError(f"the server failed: {_describe(event['error'])}")
    choices = event.get("choices") or []
    usage = event.get("usage")
    choice = choices[0] if choices else {}
    text = (choice.get("delta") or {}).get("content") or ""
    reason = choice.get("finish_reason")
    if not usage:
        if not text and reason is None:
            return None  # the role-only first chunk
        return ReplyChunk(text, 1 if text else 0, reason)
    details = usage.get("prompt_tokens_details") or {}
    return ReplyChunk(
        text,
        1 if text else 0,
        reason,
        usage.get("prompt_tokens"),
        details.get("cached_tokens"),
        usage.get("completion_tokens"),
    )


def _error_message(response: httpx.Response) -> str:
    try:
        detail = response.json().get("error", response.text)
    except (json.JSONDecodeError, AttributeError):
        detail = response.text
    return f"HTTP {response.status_code}: {_describe(detail)}"


def _describe(error: object) -> str:
    if isinstance(error, Mapping):
        return str(error.get("message") or error)
    return str(error).strip() or "(no message)"
