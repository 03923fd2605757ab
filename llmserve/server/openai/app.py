"""create_app: the FastAPI application of the OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from llmserve.engine.async_engine import AsyncEngine
from llmserve.server.openai.chat import create_chat_completion
from llmserve.server.openai.completions import create_completion
from llmserve.server.openai.context import DEFAULT_MAX_BODY_BYTES, ServerContext, get_context
from llmserve.server.openai.errors import install_error_handlers
from llmserve.server.openai.layer import (
    render_chat,
    resolve_reasoning_parser,
    resolve_tool_call_parser,
)
from llmserve.server.openai.middleware import GatewayMiddleware
from llmserve.server.openai.protocol import DetokenizeRequest, TokenizeRequest

_ERRORS = {
    status: {"description": text, "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/ErrorResponse"}}}}
    for status, text in [(400, "Invalid request"), (401, "Missing or invalid API key"),
                         (404, "Unknown model"), (413, "Body too large"),
                         (429, "Overloaded; retry after Retry-After seconds"),
                         (503, "Engine unavailable or server draining")]
}


def create_app(engine: AsyncEngine, *, served_model_names: Sequence[str] | None = None,
               api_keys: Sequence[str] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               metrics: bool = True, tool_call_parser: str | None = None,
               reasoning_parser: str | None = None) -> FastAPI:
    """Build the app around a (not yet started) AsyncEngine.

    Args:
        engine: serves every request; started on app start-up, stopped on shutdown.
        served_model_names: names clients may pass as `model` (default: the engine's name).
        api_keys: bearer tokens accepted on every route but /health and /metrics.
        max_body_bytes: request bodies above this get 413.
        metrics: attach Prometheus metrics (served at /metrics).
        tool_call_parser: parser of `tools` calls (default: detected from the chat template).
        reasoning_parser: splits `<think>` reasoning into `reasoning_content` (default: none).
    """
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    names = list(served_model_names or [engine.model_name])
    ctx = ServerContext(engine, names, tuple(k for k in api_keys if k), max_body_bytes,
                        tool_call_parser=resolve_tool_call_parser(tool_call_parser,
                                                                  engine.tokenizer),
                        reasoning_parser=resolve_reasoning_parser(reasoning_parser))
    if metrics:
        from llmserve.observability.metrics import EngineMetrics

        ctx.registry = EngineMetrics(engine, names[0]).registry

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
            await asyncio.to_thread(engine.shutdown)
        finally:
            for hook in app.state.shutdown_hooks:  # e.g. the trace ledger's close
                hook()

    options = {}
    if "strict_content_type" in inspect.signature(FastAPI).parameters:
        options["strict_content_type"] = False  # a body without Content-Type is read as JSON
    app = FastAPI(title="llmserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible API of the llmserve engine.", **options)
    app.state.ctx = ctx
    app.state.shutdown_hooks = []  # callables run at shutdown, after the engine stopped
    install_error_handlers(app)
    app.add_middleware(GatewayMiddleware, ctx=ctx)
    _add_routes(app)
    _add_error_schema(app)
    return app


def _add_routes(app: FastAPI) -> None:
    app.add_api_route("/v1/chat/completions", create_chat_completion, methods=["POST"],
                      responses=_ERRORS, summary="Create a chat completion")
    app.add_api_route("/v1/completions", create_completion, methods=["POST"],
                      responses=_ERRORS, summary="Create a completion")
    app.add_api_route("/v1/models", list_models, methods=["GET"], summary="List models")
    app.add_api_route("/v1/models/{model_id:path}", get_model, methods=["GET"],
                      responses={404: _ERRORS[404]}, summary="Retrieve a model")
    app.add_api_route("/tokenize", tokenize, methods=["POST"], responses=_ERRORS)
    app.add_api_route("/detokenize", detokenize, methods=["POST"], responses=_ERRORS)
    app.add_api_route("/health", health, methods=["GET"], responses={503: _ERRORS[503]})
    app.add_api_route("/metrics", metrics_endpoint, methods=["GET"])


def _add_error_schema(app: FastAPI) -> None:
    """Publish OpenAI's ErrorResponse in /openapi.json, since routes refer to it."""
    original = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        nullable_str = {"anyOf": [{"type": "string"}, {"type": "null"}]}
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = {
            "type": "object", "required": ["error"],
            "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                               "param": nullable_str, "code": nullable_str}}},
        }
        return schema

    app.openapi = openapi


def _model_card(ctx: ServerContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "llmserve",
            "max_model_len": ctx.engine.max_model_len}


async def list_models(request: Request) -> dict:
    ctx = get_context(request)
    return {"object": "list", "data": [_model_card(ctx, n) for n in ctx.served_model_names]}


async def get_model(model_id: str, request: Request) -> dict:
    ctx = get_context(request)
    return _model_card(ctx, ctx.check_model(model_id))


async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    ctx = get_context(request)
    ctx.check_model(body.model)
    tokenizer = ctx.engine.tokenizer
    if body.messages is not None:
        tokens = render_chat(tokenizer, body.messages, body.add_generation_prompt)
    else:
        tokens = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": ctx.engine.max_model_len}


async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    ctx = get_context(request)
    ctx.check_model(body.model)
    tokenizer = ctx.engine.tokenizer
    vocab = tokenizer.vocab_size
    bad = next((t for t in body.tokens if t >= vocab), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab})")
    return {"prompt": tokenizer.decode(body.tokens)}


async def health(request: Request) -> Response:
    ctx = get_context(request)
    engine = ctx.engine
    if not engine.is_healthy:
        reason = "draining" if ctx.draining else f"engine unavailable: {engine.dead_error}"
        return JSONResponse({"status": "unhealthy", "reason": reason}, status_code=503)
    return JSONResponse({"status": "ok"})


async def metrics_endpoint(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = get_context(request).registry
    data = generate_latest(registry) if registry is not None else b""
    return Response(data, media_type=CONTENT_TYPE_LATEST)
