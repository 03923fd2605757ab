"""The `llmserve.v1.Generation` servicer (grpc.aio) over the AsyncEngine.

Each call is validated like the equivalent HTTP body, submitted with `endpoint="grpc"` in the
engine's request info (so metrics and the trace ledger see it as the HTTP requests are seen),
and mapped to a gRPC status on failure; nothing fails with a silent OK. A client that cancels
(or disconnects) cancels the handler, and the engine stream aborts the request, which frees
its KV blocks within one step.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from llmserve.engine.async_engine import EngineDeadError, QueueFullError
from llmserve.server.grpc import convert
from llmserve.server.grpc import llmserve_pb2 as pb
from llmserve.server.grpc.options import GrpcOptions
from llmserve.server.openai.layer import (
    CHAT_URL,
    COMPLETIONS_URL,
    APIError,
    DeltaTracker,
    ModelView,
    RequestAborted,
    parse_body,
)

if TYPE_CHECKING:
    from llmserve.engine.async_engine import AsyncEngine, RequestStream
    from llmserve.server.openai.replies import Reply
    from llmserve.server.openai.shapes import TextShape

logger = logging.getLogger(__name__)
SERVICE_NAME = "llmserve.v1.Generation"


class _Failure(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Call:
    """One accepted request: its stream plus what building replies needs."""

    request_id: str
    stream: RequestStream
    model: str
    top: int | None  # logprob alternatives requested; None = no logprobs
    reply: Reply
    created: int = field(default_factory=lambda: int(time.time()))


class GenerationServicer:
    """Implements every RPC of `llmserve.v1.Generation`."""

    def __init__(self, engine: AsyncEngine, options: GrpcOptions) -> None:
        self.engine = engine
        self.options = options
        self.served_names = list(options.served_model_names or [engine.model_name])
        self.created = int(time.time())
        self.stopping = False
        self._keys = [k.encode() for k in options.api_keys if k]
        self._active: set[str] = set()
        source = options.context if hasattr(options.context, "tool_call_parser") else options
        self._parsers = (source.tool_call_parser, source.reasoning_parser)
        self._view: ModelView | None = None

    # -- RPCs ----------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        return await self._unary(context, "Generate", COMPLETIONS_URL,
                                 lambda: convert.completion_body(request), request.request_id)

    async def Chat(self, request: pb.ChatRequest, context) -> pb.GenerateResponse:
        return await self._unary(context, "Chat", CHAT_URL, lambda: convert.chat_body(request),
                                 request.request_id)

    async def GenerateStream(self, request: pb.GenerateRequest, context
                             ) -> AsyncIterator[pb.GenerateStreamChunk]:
        async for chunk in self._streaming(context, "GenerateStream", COMPLETIONS_URL,
                                           lambda: convert.completion_body(request),
                                           request.request_id):
            yield chunk

    async def ChatStream(self, request: pb.ChatRequest, context
                         ) -> AsyncIterator[pb.GenerateStreamChunk]:
        async for chunk in self._streaming(context, "ChatStream", CHAT_URL,
                                           lambda: convert.chat_body(request),
                                           request.request_id):
            yield chunk

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        await self._guard(context, admit=False)
        found = request.request_id in self._active
        if found:
            self.engine.abort(request.request_id)
        return pb.AbortResponse(found=found)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        await self._guard(context, admit=False)
        cards = [pb.ModelCard(id=name, max_model_len=self.engine.max_model_len,
                              owned_by="llmserve", created=self.created)
                 for name in self.served_names]
        return pb.ListModelsResponse(models=cards)

    # -- shared paths --------------------------------------------------------------------------
    # `body` builds the HTTP body of the request inside the error handling (bad JSON text in a
    # field is INVALID_ARGUMENT, like any other bad input).
    async def _unary(self, context, method: str, url: str, body: Callable[[], dict],
                     request_id: str) -> pb.GenerateResponse:
        await self._guard(context)
        try:
            with self._in_flight():
                call = await self._submit(method, url, body, request_id)
                try:
                    last = None
                    async for out in call.stream:
                        last = out
                finally:
                    self._active.discard(call.request_id)
                _check_finished(last)
                return convert.response(call.request_id, call.model, call.created, last,
                                        call.top, self.engine.tokenizer, call.reply)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            failure = self._failure(exc)
        await context.abort(failure.code, failure.message)

    async def _streaming(self, context, method: str, url: str, body: Callable[[], dict],
                         request_id: str) -> AsyncIterator[pb.GenerateStreamChunk]:
        await self._guard(context)
        try:
            with self._in_flight():
                call = await self._submit(method, url, body, request_id)
                try:
                    async for chunk in self._chunks(call):
                        yield chunk
                finally:
                    self._active.discard(call.request_id)
                return
        except Exception as exc:  # noqa: BLE001 - every failure becomes a status
            failure = self._failure(exc)
        await context.abort(failure.code, failure.message)

    async def _chunks(self, call: _Call) -> AsyncIterator[pb.GenerateStreamChunk]:
        tracker = DeltaTracker()
        shapes: dict[int, TextShape] = {}
        called: set[int] = set()
        last = None
        async for out in call.stream:
            last = out
            usage = convert.usage(out)
            for c in out.outputs:
                delta = tracker.delta(c.index, c)
                if delta is None or delta.empty:
                    continue
                chunk = pb.GenerateStreamChunk(
                    request_id=call.request_id, index=c.index, token_ids=delta.token_ids,
                    text=delta.text, usage=usage, finish_reason=delta.finish_reason or "",
                    logprobs=convert.token_logprobs(c, delta.first_token, len(c.token_ids),
                                                    call.top, self.engine.tokenizer))
                if call.reply.spec.chat:
                    shape = shapes.setdefault(c.index, call.reply.spec.shape())
                    parts = shape.feed(delta.text) if delta.text else []
                    parts += shape.finish() if delta.finish_reason is not None else []
                    if convert.message_parts(chunk, parts):
                        called.add(c.index)
                    if c.index in called and delta.finish_reason == "stop":
                        chunk.finish_reason = "tool_calls"
                yield chunk
        _check_finished(last)

    async def _submit(self, method: str, url: str, body: Callable[[], dict],
                      request_id: str) -> _Call:
        parsed = parse_body(url, body(), self.view)
        rid = request_id or f"grpc-{uuid.uuid4().hex}"
        info = parsed.info("grpc", grpc_method=method)
        stream = await self.engine.add_request(rid, parsed.prompts[0], parsed.params,
                                               priority=parsed.request.priority, info=info)
        self._active.add(rid)
        top = parsed.params.logprobs
        return _Call(rid, stream, parsed.model, top, parsed.reply(rid, int(time.time())))

    @property
    def view(self) -> ModelView:
        """The served model as the request layer sees it (built on first use)."""
        if self._view is None:
            self._view = ModelView.build(self.engine.tokenizer, self.served_names,
                                         self.engine.max_model_len, *self._parsers)
        return self._view

    # -- gatekeeping and errors ----------------------------------------------------------------
    async def _guard(self, context, admit: bool = True) -> None:
        """Refuse without a valid key (UNAUTHENTICATED) or while shutting down (UNAVAILABLE)."""
        if self._keys and not self._authorized(context.invocation_metadata() or ()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid API key")
        ctx = self.options.context
        if admit and (self.stopping or (ctx is not None and getattr(ctx, "draining", False))):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")

    def _authorized(self, metadata) -> bool:
        offered = []
        for key, value in metadata:
            if isinstance(value, bytes):
                continue
            if key == "authorization" and value.lower().startswith("bearer "):
                offered.append(value[7:].strip().encode())
            elif key == "x-api-key":
                offered.append(value.strip().encode())
        return any(hmac.compare_digest(o, k) for o in offered for k in self._keys)

    def _in_flight(self):
        return _InFlight(self.options.context)

    def _failure(self, exc: BaseException) -> _Failure:
        if isinstance(exc, _Failure):
            return exc
        if isinstance(exc, APIError):
            code = grpc.StatusCode.NOT_FOUND if exc.status == 404 else (
                grpc.StatusCode.INVALID_ARGUMENT)
            return _Failure(code, exc.message)
        if isinstance(exc, RequestAborted):
            if exc.error:  # the request's own fault (its grammar failed to compile)
                return _Failure(grpc.StatusCode.INVALID_ARGUMENT, exc.error)
            return _Failure(grpc.StatusCode.ABORTED, "the request was aborted")
        if isinstance(exc, QueueFullError):
            return _Failure(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        if isinstance(exc, EngineDeadError):
            code = grpc.StatusCode.UNAVAILABLE if self.stopping else grpc.StatusCode.INTERNAL
            return _Failure(code, f"the engine is not available: {exc}")
        if isinstance(exc, ValueError):  # the engine's own input checks
            return _Failure(grpc.StatusCode.INVALID_ARGUMENT, str(exc)[:1000])
        logger.exception("gRPC call failed", exc_info=exc)
        return _Failure(grpc.StatusCode.INTERNAL, "internal server error")


class _InFlight:
    """Counts a call in the HTTP server's in-flight total, so a drain waits for it."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx if ctx is not None and hasattr(ctx, "in_flight") else None

    def __enter__(self) -> None:
        if self.ctx is not None:
            self.ctx.in_flight += 1

    def __exit__(self, *exc: object) -> None:
        if self.ctx is not None:
            self.ctx.in_flight -= 1


def _check_finished(last) -> None:
    if last is None or not last.finished:
        raise _Failure(grpc.StatusCode.INTERNAL, "the request ended without a result")
    aborted = [c for c in last.outputs if c.finish_reason == "abort"]
    error = next((c.error for c in aborted if c.error), None)
    if error is not None:  # the request's own fault (its grammar failed to compile)
        raise _Failure(grpc.StatusCode.INVALID_ARGUMENT, error)
    if aborted:
        raise _Failure(grpc.StatusCode.ABORTED, "the request was aborted")
