"""OpenAI semantics on top of ``AsyncEngine``: requests → ``SamplingParams``, outputs → responses.

Chat and text completions differ only at the edges (how the prompt is built, how a choice and
its logprobs are shaped), so one ``_Format`` per endpoint plugs into one generation path:

* ``_start`` queues the request and waits for its first output. Until then nothing has been sent,
  so a request the engine refuses (too long, queue full) or whose first step fails still gets a
  proper HTTP status (400, 429, 500) instead of a stream that errors at once.
* Non-streaming: the outputs are folded per choice (``_Choice``) into one response.
* Streaming: each output becomes one server-sent event; a failed step becomes an OpenAI error
  event, after which the stream ends without ``[DONE]``. The engine stream is closed in a
  ``finally``, so a client that disconnects (Litestar cancels the response) aborts its request
  and frees its KV blocks.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from yaie.api import schemas as s
from yaie.api.metrics import ServerMetrics
from yaie.core.async_engine import AsyncEngine
from yaie.core.engine import EngineOverloadedError, RequestOutput
from yaie.core.request import FinishReason
from yaie.core.sampling import SamplingParams

if TYPE_CHECKING:
    from yaie.llm import LLM


class OpenAIError(Exception):
    """An error with OpenAI's body; the app's exception handler renders it."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = s.ErrorDetail(
            message=message,
            type=type or _ERROR_TYPES.get(status, "invalid_request_error"),
            param=param,
            code=code,
        )


_ERROR_TYPES = {
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# SamplingParams fields whose API names differ, for naming the field in a 400.
_API_NAMES = {"logprobs": "top_logprobs"}


@dataclass(slots=True)
class _Choice:
    """One choice being folded from the engine's deltas (non-streaming responses)."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[float, dict[int, float]] | None] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIServing:
    """The model-facing half of the server: everything between a decoded request body and
    the response object, independent of Litestar (the app only routes to it)."""

    def __init__(self, llm: LLM, engine: AsyncEngine, metrics: ServerMetrics) -> None:
        self.llm = llm
        self.engine = engine
        self.metrics = metrics
        self.model_name: str = llm.model_name
        self.max_model_len: int = llm.max_model_len
        self.vocab_size = min(len(llm.tokenizer), llm.executor.model_config.vocab_size)
        self.created = int(time.time())
        self._token_text: dict[int, str] = {}

    # ------------------------------------------------------------ endpoints

    def models(self) -> s.ModelList:
        card = s.Model(
            id=self.model_name,
            created=self.created,
            owned_by="yaie",
            max_model_len=self.max_model_len,
        )
        return s.ModelList(data=[card])

    async def chat(self, req: s.ChatCompletionRequest) -> s.ChatCompletion | AsyncIterator[bytes]:
        self.check_model(req.model)
        _refuse_if(bool(req.tools), "tools", "tool calling is not supported")
        _refuse_if(
            isinstance(req.tool_choice, dict) or req.tool_choice not in (None, "none", "auto"),
            "tool_choice",
            "tool calling is not supported",
        )
        _refuse_if(
            req.response_format is not None and req.response_format.get("type") != "text",
            "response_format",
            'only {"type": "text"} is supported (no JSON mode or schemas)',
        )
        _refuse_if(
            req.top_logprobs is not None and not req.logprobs,
            "top_logprobs",
            "top_logprobs needs logprobs=true",
            "invalid_value",
        )
        messages = [
            {
                "role": "system" if m.role == "developer" else m.role,
                "content": _message_text(m.content),
            }
            for m in req.messages
        ]
        try:
            ids = self.llm.encode(messages)
        except ValueError as exc:  # the template rejected the messages, or there is none
            raise OpenAIError(400, str(exc), "messages") from None
        max_tokens = (
            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        )
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._params(req, ids, "messages", max_tokens, logprobs)
        return await self._run(
            req, ids, params, _ChatFormat(self, "chatcmpl", logprobs is not None)
        )

    async def completions(self, req: s.CompletionRequest) -> s.Completion | AsyncIterator[bytes]:
        self.check_model(req.model)
        _refuse_if(bool(req.echo), "echo", "echo is not supported")
        _refuse_if(bool(req.suffix), "suffix", "suffix (insertion) is not supported")
        _refuse_if(
            req.best_of is not None and req.best_of != (req.n or 1),
            "best_of",
            "best_of is not supported (it may only equal n)",
        )
        ids = self._prompt_ids(req.prompt)
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default here
        params = self._params(req, ids, "prompt", max_tokens, req.logprobs)
        return await self._run(
            req, ids, params, _CompletionFormat(self, "cmpl", req.logprobs is not None)
        )

    # ------------------------------------------------------------ request → engine

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise OpenAIError(
                404,
                f"The model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )

    def _prompt_ids(self, prompt: str | list[int | str]) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.llm.encode(prompt)
        if not all(isinstance(t, int) for t in prompt):
            raise OpenAIError(
                400,
                "prompt must be a string, a list of token ids or a list of one string "
                "(send several prompts as separate requests)",
                "prompt",
            )
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        _refuse_if(
            bad is not None,
            "prompt",
            f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})",
            "invalid_value",
        )
        return prompt

    def _params(
        self,
        req: s.GenerationRequest,
        ids: list[int],
        prompt_field: str,
        max_tokens: int | None,
        logprobs: int | None,
    ) -> SamplingParams:
        n, limit = len(ids), self.max_model_len
        _refuse_if(n == 0, prompt_field, "the prompt is empty", "invalid_value")
        if n >= limit or (max_tokens is not None and n + max_tokens > limit):
            asked = f" and {max_tokens} tokens for the completion" if max_tokens is not None else ""
            raise OpenAIError(
                400,
                f"This model's maximum context length is {limit} tokens; the request has {n} "
                f"prompt tokens{asked}. Shorten the {prompt_field} or lower max_tokens.",
                prompt_field if n >= limit else "max_tokens",
                "context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else req.stop
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=_default(req.temperature, 1.0),
                top_p=_default(req.top_p, 1.0),
                top_k=_default(req.top_k, 0),
                min_p=_default(req.min_p, 0.0),
                seed=req.seed,
                stop=stop or [],
                stop_token_ids=req.stop_token_ids or [],
                ignore_eos=bool(req.ignore_eos),
                presence_penalty=_default(req.presence_penalty, 0.0),
                frequency_penalty=_default(req.frequency_penalty, 0.0),
                repetition_penalty=_default(req.repetition_penalty, 1.0),
                logprobs=logprobs,
                n=_default(req.n, 1),
            )
        except ValueError as exc:  # the message starts with the field's name
            name = str(exc).split(" ", 1)[0]
            raise OpenAIError(400, str(exc), _API_NAMES.get(name, name)) from None

    async def _run(
        self, req: s.GenerationRequest, ids: list[int], params: SamplingParams, fmt: _Format
    ) -> Any:
        outputs = await self._start(ids, params, fmt.id)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self._stream(outputs, fmt, len(ids), params.n, include_usage)
        choices = [_Choice() for _ in range(params.n)]
        cached = 0
        async with aclosing(outputs):
            async for out in outputs:
                _raise_if_failed(out)
                choice = choices[out.index]
                choice.text.append(out.text)
                choice.token_ids += out.new_token_ids
                choice.logprobs += out.logprobs or []
                if out.finished:
                    choice.finish_reason = out.finish_reason.value
                    if out.index == 0 and out.metrics is not None:
                        cached = out.metrics.num_cached_tokens
        usage = _usage(len(ids), sum(len(c.token_ids) for c in choices), cached)
        return fmt.response(choices, usage)

    async def _start(
        self, ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Queue the request and wait for its first output; returns every output, that one first.

        Refusals and a failed first step raise ``OpenAIError`` here, before any byte is sent.
        """
        stream = self._observed(self.engine.generate(ids, params, request_id))
        try:
            first = await anext(stream)
            _raise_if_failed(first)
        except ValueError as exc:
            await stream.aclose()
            raise OpenAIError(400, str(exc)) from None
        except EngineOverloadedError as exc:
            await stream.aclose()
            raise OpenAIError(429, str(exc), code="engine_overloaded") from None
        except BaseException:
            await stream.aclose()
            raise
        return _prepend(first, stream)

    async def _observed(
        self, outputs: AsyncIterator[RequestOutput]
    ) -> AsyncIterator[RequestOutput]:
        async with aclosing(outputs):
            async for out in outputs:
                if out.finished and out.metrics is not None:
                    self.metrics.observe_finished(out.metrics)
                yield out

    async def _stream(
        self,
        outputs: AsyncIterator[RequestOutput],
        fmt: _Format,
        num_prompt: int,
        n: int,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        async with aclosing(outputs):
            for index in range(n):
                if (head := fmt.head(index)) is not None:
                    yield _event(head)
            generated, cached = 0, 0
            async for out in outputs:
                try:
                    _raise_if_failed(out)
                except OpenAIError as exc:
                    yield _event(s.ErrorResponse(error=exc.detail))
                    return
                generated += len(out.new_token_ids)
                if out.finished and out.index == 0 and out.metrics is not None:
                    cached = out.metrics.num_cached_tokens
                if out.text or out.finished or (fmt.logprobs and out.new_token_ids):
                    yield _event(fmt.chunk(out))
            if include_usage:
                yield _event(fmt.usage_chunk(_usage(num_prompt, generated, cached)))
            yield b"data: [DONE]\n\n"

    # ------------------------------------------------------------ logprobs

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.llm.tokenizer.decode([token_id])
        return text


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _refuse_if(
    condition: bool, param: str, message: str, code: str = "unsupported_parameter"
) -> None:
    if condition:
        raise OpenAIError(400, message, param, code)


def _message_text(content: str | list[s.TextPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content)


def _raise_if_failed(out: RequestOutput) -> None:
    if out.finish_reason is FinishReason.ERROR:
        raise OpenAIError(500, out.error or "the request failed in the engine")
    if out.finish_reason is FinishReason.ABORT:  # only the server stopping aborts a live request
        raise OpenAIError(503, "the server is shutting down; the request was aborted")


async def _prepend(
    first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    async with aclosing(rest):
        yield first
        async for out in rest:
            yield out


def _usage(prompt: int, completion: int, cached: int) -> s.Usage:
    return s.Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=s.PromptTokensDetails(cached_tokens=cached),
    )


def _event(payload: msgspec.Struct) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


# ---------------------------------------------------------------------------- formats


class _Format(ABC):
    """How one endpoint shapes choices, chunks and logprobs."""

    def __init__(self, serving: OpenAIServing, prefix: str, logprobs: bool) -> None:
        self.serving = serving
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = serving.model_name
        self.logprobs = logprobs

    def head(self, index: int) -> msgspec.Struct | None:
        """An event to send per choice before any token (chat's role delta), or None."""
        return None

    @abstractmethod
    def response(self, choices: list[_Choice], usage: s.Usage) -> msgspec.Struct:
        """The whole non-streaming reply."""

    @abstractmethod
    def chunk(self, out: RequestOutput) -> msgspec.Struct:
        """One streamed event for one engine output."""

    @abstractmethod
    def usage_chunk(self, usage: s.Usage) -> msgspec.Struct:
        """The final event of ``stream_options.include_usage``."""

    def _entries(
        self, token_ids: list[int], logprobs: list[tuple[float, dict[int, float]] | None] | None
    ) -> list[tuple[str, float, list[tuple[str, float]]]]:
        """(token text, logprob, [(top token text, logprob)]) per token that has logprobs."""
        text = self.serving.token_text
        return [
            (text(t), lp[0], [(text(k), v) for k, v in lp[1].items()])
            for t, lp in zip(token_ids, logprobs or [])
            if lp is not None
        ]


class _ChatFormat(_Format):
    def head(self, index: int) -> s.ChatCompletionChunk:
        choice = s.ChatChunkChoice(index=index, delta=s.Delta(role="assistant", content=""))
        return s.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def response(self, choices: list[_Choice], usage: s.Usage) -> s.ChatCompletion:
        return s.ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            usage=usage,
            choices=[
                s.ChatChoice(
                    index=i,
                    message=s.AssistantMessage(content="".join(c.text)),
                    finish_reason=c.finish_reason,
                    logprobs=self._logprobs(c.token_ids, c.logprobs),
                )
                for i, c in enumerate(choices)
            ],
        )

    def chunk(self, out: RequestOutput) -> s.ChatCompletionChunk:
        choice = s.ChatChunkChoice(
            index=out.index,
            delta=s.Delta(content=out.text),
            finish_reason=out.finish_reason.value if out.finished else None,
            logprobs=self._logprobs(out.new_token_ids, out.logprobs),
        )
        return s.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[choice]
        )

    def usage_chunk(self, usage: s.Usage) -> s.ChatCompletionChunk:
        return s.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _logprobs(self, token_ids: list[int], logprobs: list | None) -> s.ChatLogprobs | None:
        if not self.logprobs:
            return None
        return s.ChatLogprobs(
            content=[
                s.TokenLogprob(
                    token=tok,
                    logprob=lp,
                    bytes=list(tok.encode()),
                    top_logprobs=[
                        s.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, v in top
                    ],
                )
                for tok, lp, top in self._entries(token_ids, logprobs)
            ]
        )


class _CompletionFormat(_Format):
    def __init__(self, serving: OpenAIServing, prefix: str, logprobs: bool) -> None:
        super().__init__(serving, prefix, logprobs)
        self._offsets: dict[int, int] = {}  # streaming: text offset reached by each choice

    def response(self, choices: list[_Choice], usage: s.Usage) -> s.Completion:
        return s.Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            usage=usage,
            choices=[
                s.CompletionChoice(
                    index=i,
                    text="".join(c.text),
                    finish_reason=c.finish_reason,
                    logprobs=self._logprobs(c.token_ids, c.logprobs, 0),
                )
                for i, c in enumerate(choices)
            ],
        )

    def chunk(self, out: RequestOutput) -> s.Completion:
        logprobs = self._logprobs(out.new_token_ids, out.logprobs, self._offsets.get(out.index, 0))
        if logprobs is not None and logprobs.tokens:
            self._offsets[out.index] = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
        choice = s.CompletionChoice(
            index=out.index,
            text=out.text,
            finish_reason=out.finish_reason.value if out.finished else None,
            logprobs=logprobs,
        )
        return s.Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: s.Usage) -> s.Completion:
        return s.Completion(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def _logprobs(
        self, token_ids: list[int], logprobs: list | None, offset: int
    ) -> s.CompletionLogprobs | None:
        """``text_offset`` counts the characters of the tokens before, from the start of the
        choice's text (there is no echo, so the prompt is not counted)."""
        if not self.logprobs:
            return None
        entries = self._entries(token_ids, logprobs)
        offsets = []
        for tok, _, _ in entries:
            offsets.append(offset)
            offset += len(tok)
        return s.CompletionLogprobs(
            tokens=[tok for tok, _, _ in entries],
            token_logprobs=[lp for _, lp, _ in entries],
            top_logprobs=[dict(top) for _, _, top in entries],
            text_offset=offsets,
        )
