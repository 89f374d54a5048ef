"""OpenAI request and response bodies, as msgspec Structs.

Litestar decodes and validates request bodies with these types and builds the served OpenAPI
schema from them, so the ranges below (``Meta``) are both the documentation and the first line
of validation: a value outside them is a 400 naming the field before anything reaches the engine.
The ranges are OpenAI's; fields that OpenAI documents as nullable are nullable here, and ``null``
means "the default".

Unknown fields are ignored, as OpenAI clients send many optional ones. Fields that would change
the output if honoured and that YAIE does not implement (tools, response formats, logit bias,
echo, suffix, best_of) are declared so that the server can refuse them with a 400 instead of
silently doing something else; ``docs/api.md`` lists every field and difference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct

# ---------------------------------------------------------------------------- requests


def _bounded(kind: type, description: str | None = None, **bounds: float) -> Any:
    """``Annotated[kind, Meta(**bounds)]`` whose bounds also reach the OpenAPI schema.

    Litestar copies a ``Meta`` bound into the schema only when the bound is truthy, so
    ``ge=0`` would vanish from the served schema; the JSON Schema keywords are passed again as
    schema extras, which it copies as they are.
    """
    keys = {"ge": "minimum", "gt": "exclusive_minimum", "le": "maximum", "lt": "exclusive_maximum"}
    extra = {"extra": {keys[k]: v for k, v in bounds.items()}, "description": description}
    return Annotated[kind, Meta(**bounds, extra_json_schema=extra)]


Temperature = _bounded(float, "0 = greedy", ge=0, le=2)
TopP = _bounded(float, gt=0, le=1)
Penalty = _bounded(float, ge=-2, le=2)
MaxTokens = _bounded(int, ge=1)
Choices = _bounded(int, ge=1, le=128)
TopLogprobs = _bounded(int, ge=0, le=20)
TokenId = _bounded(int, ge=0)
Seed = _bounded(int, ge=-(2**63), le=2**63 - 1)
TopK = _bounded(int, "0 or -1 = off", ge=-1)
MinP = _bounded(float, ge=0, le=1)
RepetitionPenalty = _bounded(float, gt=0)


class StreamOptions(Struct, kw_only=True):
    include_usage: bool | None = None


class GenerationRequest(Struct, kw_only=True):
    """Fields shared by chat and text completions (the sampling knobs)."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Choices | None = None
    stop: str | list[str] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored
    logit_bias: dict[str, float] | None = None  # refused unless empty
    # Extensions (vLLM's names), not in OpenAI's API.
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[TokenId] | None = None


class TextPart(Struct, kw_only=True):
    type: Literal["text"]
    text: str


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class ChatCompletionRequest(GenerationRequest, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None
    # Refused when set: YAIE has no tool calling or constrained decoding.
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(GenerationRequest, kw_only=True):
    prompt: Annotated[
        str | list[int | str],
        Meta(description="a string, a list of token ids, or a list of one string"),
    ]
    logprobs: TopLogprobs | None = None
    echo: bool | None = None  # refused when true
    suffix: str | None = None  # refused when set
    best_of: int | None = None  # refused unless equal to n


# ---------------------------------------------------------------------------- responses


class PromptTokensDetails(Struct, kw_only=True):
    cached_tokens: int


class Usage(Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Struct, kw_only=True):
    content: list[TokenLogprob] | None


class CompletionLogprobs(Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


FinishReasonName = Literal["stop", "length"]


class AssistantMessage(Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str


class _Envelope(Struct, kw_only=True):
    """What every generation response and chunk starts with."""

    id: str
    created: int
    model: str


class ChatChoice(Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: FinishReasonName | None
    logprobs: ChatLogprobs | None = None


class ChatCompletion(_Envelope, kw_only=True):
    choices: list[ChatChoice]
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class Delta(Struct, kw_only=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: FinishReasonName | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(_Envelope, kw_only=True):
    """One server-sent event of a streamed chat completion (``data: {json}``)."""

    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class CompletionChoice(Struct, kw_only=True):
    index: int
    text: str
    finish_reason: FinishReasonName | None
    logprobs: CompletionLogprobs | None = None


class Completion(_Envelope, kw_only=True):
    """A text completion; also each server-sent event of a streamed one."""

    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: Literal["text_completion"] = "text_completion"


class Model(Struct, kw_only=True):
    id: str
    created: int
    owned_by: str
    max_model_len: int
    object: Literal["model"] = "model"


class ModelList(Struct, kw_only=True):
    data: list[Model]
    object: Literal["list"] = "list"


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """OpenAI's error body; every 4xx/5xx of the server has this shape."""

    error: ErrorDetail


class Health(Struct, kw_only=True):
    status: Literal["ok"]
    loop_error: str | None = None
