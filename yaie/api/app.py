"""The Litestar app: routes, API key, OpenAI-shaped errors, and the engine's lifetime.

``build_app`` is the one entry point (``yaie serve`` and the dashboard call it). Everything
model-specific happens in ``OpenAIServing``; this module only maps HTTP onto it:

* every error, whether raised by us (``OpenAIError``), by Litestar while decoding a body
  (malformed JSON, a wrong type, a value out of range, a missing field) or by a bug, leaves as
  OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with the field named in ``param``;
* with an API key, ``/v1/*`` and ``/engine/state`` need ``Authorization: Bearer <key>``;
  ``/health``, ``/metrics``, the OpenAPI schema and mounted apps stay open;
* reads of engine state run in a worker thread, so a long step never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from litestar import Litestar, Request, Response, Router, asgi, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, SerializationException, ValidationException
from litestar.handlers import BaseRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, Schema
from litestar.response import Stream
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from yaie import __version__
from yaie.api import schemas as s
from yaie.api.metrics import ServerMetrics
from yaie.api.serving import OpenAIError, OpenAIServing
from yaie.core.async_engine import AsyncEngine

if TYPE_CHECKING:
    from yaie.llm import LLM

logger = logging.getLogger(__name__)

_ERROR_DOCS = {
    400: "Invalid request: malformed JSON, a wrong type or value, a prompt longer than the context",
    401: "Missing or wrong API key (only when the server has one)",
    404: "Unknown model",
    429: "The engine's waiting queue is full; retry later",
    500: "The model step that ran this request failed",
    503: "The server is shutting down",
}
_METRIC_PATHS = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/health",
    "/metrics",
    "/engine/state",
}


def build_app(
    llm: LLM,
    *,
    engine: AsyncEngine | None = None,
    api_key: str | None = None,
    mounts: dict[str, ASGIApp] | None = None,
) -> Litestar:
    """The OpenAI-compatible app for ``llm``.

    ``engine``: an ``AsyncEngine`` over ``llm.engine`` that the caller owns and runs (to share
    it with something else in the process); by default the app makes one and starts and stops
    it with its own lifespan. ``mounts``: extra ASGI apps by path (the Gradio dashboard mounts
    at ``/dashboard``); they are not behind the API key.
    """
    owned = engine is None
    engine = engine or AsyncEngine(llm.engine)
    metrics = ServerMetrics()
    serving = OpenAIServing(llm, engine, metrics)
    guards = [_bearer_guard(api_key)] if api_key else []

    generation = {  # both generation routes: 200 (not Litestar's 201), JSON or events, errors
        "status_code": 200,
        "operation_class": _StreamingOperation,
        "responses": _errors(400, 401, 404, 429, 500, 503),
    }

    @post("/chat/completions", **generation)
    async def chat_completions(data: s.ChatCompletionRequest) -> Response[s.ChatCompletion]:
        """Chat completion with the model's chat template; ``stream: true`` for server-sent events."""
        return _respond(await serving.chat(data))

    @post("/completions", **generation)
    async def completions(data: s.CompletionRequest) -> Response[s.Completion]:
        """Text completion of a raw prompt (a string or token ids); ``stream: true`` for events."""
        return _respond(await serving.completions(data))

    @get("/models", responses=_errors(401))
    async def list_models() -> s.ModelList:
        return serving.models()

    @get("/models/{model:path}", responses=_errors(401, 404))
    async def retrieve_model(model: str) -> s.Model:
        serving.check_model(model.lstrip("/"))
        return serving.models().data[0]

    @get("/engine/state", guards=guards, responses=_errors(401))
    async def engine_state() -> dict[str, Any]:
        """KV block map, radix summary, queues and recent steps, for the dashboard."""

        def read() -> dict[str, Any]:
            return {"model": serving.model_name, "stats": engine.stats(), **engine.snapshot()}

        return await asyncio.to_thread(read)

    @get("/health")
    async def health() -> s.Health:
        return s.Health(status="ok", loop_error=engine.loop_error)

    @get("/metrics", media_type="text/plain; version=0.0.4")
    async def prometheus_metrics() -> str:
        return metrics.render(await asyncio.to_thread(engine.stats))

    handlers: list[Any] = [
        Router(
            "/v1",
            route_handlers=[chat_completions, completions, list_models, retrieve_model],
            guards=guards,
        ),
        engine_state,
        health,
        prometheus_metrics,
    ]
    for path, app in (mounts or {}).items():
        handlers.append(asgi(path, is_mount=True, copy_scope=True)(_as_handler(app)))

    async def start() -> None:
        engine.start()

    async def stop() -> None:
        await asyncio.to_thread(engine.stop)

    return Litestar(
        route_handlers=handlers,
        on_startup=[start] if owned else [],
        on_shutdown=[stop] if owned else [],
        exception_handlers={
            OpenAIError: _openai_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        middleware=[lambda app: _count_responses(app, metrics)],
        openapi_config=OpenAPIConfig(
            title="YAIE",
            version=__version__,
            description="OpenAI-compatible API of YAIE (Yet Another Inference Engine); see docs/api.md.",
        ),
    )


# ---------------------------------------------------------------------------- responses


def _respond(result: Any) -> Response:
    if isinstance(result, AsyncIterator):
        return Stream(
            result,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    return Response(result)


def _errors(*codes: int) -> dict[int, ResponseSpec]:
    return {code: ResponseSpec(s.ErrorResponse, description=_ERROR_DOCS[code]) for code in codes}


@dataclass
class _StreamingOperation(Operation):
    """Documents the ``stream: true`` form of a 200 response next to the JSON one: the schema
    of one server-sent event, as OpenAPI 3.1 tools (schemathesis) read it."""

    def __post_init__(self) -> None:
        ok = self.responses["200"] if self.responses else None
        if ok is not None and ok.content is not None:
            data = Schema(
                type=OpenAPIType.STRING,
                content_media_type="application/json",
                description="One chunk object (chat.completion.chunk or text_completion) as JSON; "
                'the last event is `[DONE]`, or `{"error": {...}}` if the request failed.',
            )
            event = Schema(type=OpenAPIType.OBJECT, required=["data"], properties={"data": data})
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=event)


def _as_handler(app: ASGIApp):
    """Litestar's ``asgi`` decorator takes a function, not any ASGI callable (an app object)."""

    async def mounted(scope: Scope, receive: Receive, send: Send) -> None:
        await app(scope, receive, send)

    return mounted


# ---------------------------------------------------------------------------- errors


def _openai_error(request: Request, exc: OpenAIError) -> Response:
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return Response(s.ErrorResponse(error=exc.detail), status_code=exc.status, headers=headers)


_MISSING_FIELD = re.compile(r"required field `([^`]+)`")


def _http_error(request: Request, exc: HTTPException) -> Response:
    """Litestar's own errors (body decoding, unknown route, wrong method) in OpenAI's shape."""
    message, param = exc.detail, None
    if isinstance(exc, ValidationException) and isinstance(exc.extra, list) and exc.extra:
        first = exc.extra[0]
        key, why = str(first.get("key", "")), str(first.get("message", ""))
        missing = _MISSING_FIELD.search(why)
        param = missing.group(1) if missing else (key if key not in ("", "data", "body") else None)
        message = f"Invalid request body: {why}" + (
            f" (at `{param}`)" if param and not missing else ""
        )
    elif isinstance(exc.__cause__, SerializationException):
        message = f"The request body is not valid JSON ({exc.detail})"
    error = s.ErrorDetail(message=message, type="invalid_request_error", param=param, code=None)
    return Response(s.ErrorResponse(error=error), status_code=exc.status_code, headers=exc.headers)


def _internal_error(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    error = s.ErrorDetail(
        message=f"internal server error: {type(exc).__name__}", type="server_error"
    )
    return Response(s.ErrorResponse(error=error), status_code=500)


def _bearer_guard(api_key: str):
    expected = f"Bearer {api_key}".encode()

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        given = connection.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise OpenAIError(
                401,
                "Missing or incorrect API key: send it as 'Authorization: Bearer <key>'",
                code="invalid_api_key",
            )

    return guard


def _count_responses(app: ASGIApp, metrics: ServerMetrics) -> ASGIApp:
    """Counts every HTTP response by path and status for ``/metrics``."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"] if scope["path"] in _METRIC_PATHS else "other"

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                metrics.http_responses[(path, message["status"])] += 1
            await send(message)

        await app(scope, receive, counting_send)

    return middleware
