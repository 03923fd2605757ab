"""What the HTTP chat and completion routes share: submission, collection, SSE."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse, ServerSentEvent

from llmserve.engine.async_engine import EngineDeadError, RequestStream
from llmserve.server.openai.deltas import RequestAborted
from llmserve.server.openai.errors import APIError, error_body

if TYPE_CHECKING:
    from llmserve.outputs import RequestOutput
    from llmserve.server.openai.context import ServerContext
    from llmserve.server.openai.layer import EngineRequest
    from llmserve.server.openai.replies import ChunkWriter, Reply

# Seconds between SSE keep-alive comments on a silent stream.
SSE_PING_SECONDS = 15


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def submit_all(ctx: ServerContext, request: Request, base_id: str, prepared: EngineRequest,
                     endpoint: str) -> list[RequestStream]:
    """Submit every prompt of a request; if one is refused, abort the ones already accepted.

    Each prompt's info dict reaches the engine's observers (metrics, the trace ledger).
    """
    info = prepared.info(endpoint,
                         http_request_id=request.scope.get("state", {}).get("request_id"))
    prompts = prepared.prompts
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await ctx.engine.add_request(
                rid, prompt, prepared.params, priority=prepared.request.priority, info=info))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def respond(request: Request, reply: Reply, streams: list[RequestStream],
                  stream: bool) -> Response:
    """The SSE stream or the whole JSON response of a submitted request."""
    if stream:
        return sse_response(events(reply.writer(), streams), streams)
    try:
        outputs = await collect(request, streams)
    except ClientGone:
        return Response(status_code=499)
    except RequestAborted as exc:
        raise aborted_response(exc) from None
    return JSONResponse(reply.response(outputs))


async def events(writer: ChunkWriter, streams: list[RequestStream]
                 ) -> AsyncGenerator[str, None]:
    """The SSE data of every chunk of a streamed request."""
    for chunk in writer.start(len(streams)):
        yield dumps(chunk)
    async for p, out in merge(streams):
        for chunk in writer.feed(p, out):
            yield dumps(chunk)
    for chunk in writer.finish():
        yield dumps(chunk)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None:
        raise RequestAborted()
    aborted = [c for c in last.outputs if c.finish_reason == "abort"]
    if aborted:
        raise RequestAborted(next((c.error for c in aborted if c.error), None))
    return last


async def collect(request: Request, streams: list[RequestStream]) -> list[RequestOutput]:
    """Final outputs of every stream; aborts them all if the client disconnects first."""
    work = asyncio.ensure_future(asyncio.gather(*(_final(s) for s in streams)))
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            for s in streams:
                s.abort()
    if not work.done() or work.cancelled():
        raise ClientGone()
    if work.exception() is not None:
        for s in streams:
            s.abort()  # one prompt failed: the others are of no use any more
    return work.result()


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    iters = [s.__aiter__() for s in streams]
    pending = {asyncio.ensure_future(it.__anext__()): i for i, it in enumerate(iters)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(iters[i].__anext__())] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()
        for s in streams:
            s.abort()


def stream_error(exc: BaseException) -> dict:
    if isinstance(exc, EngineDeadError):
        return error_body(503, f"the engine is not available: {exc}", code="engine_unavailable")
    if isinstance(exc, RequestAborted):
        exc = aborted_response(exc)
    if isinstance(exc, APIError):
        return error_body(exc.status, exc.message, exc.param, exc.code)
    return error_body(500, "internal server error")


def sse_response(events: AsyncGenerator[str | ServerSentEvent, None],
                 streams: list[RequestStream]) -> EventSourceResponse:
    """An SSE response over `events`; closing it early (disconnect) aborts the streams."""

    async def guarded() -> AsyncIterator[str | ServerSentEvent]:
        try:
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - reported to the client in-band
            yield ServerSentEvent(data=dumps(stream_error(exc)), event="error")
        finally:
            for s in streams:
                s.abort()
            await events.aclose()
        yield "[DONE]"

    return EventSourceResponse(guarded(), sep="\n", ping=SSE_PING_SECONDS)


def aborted_response(exc: RequestAborted) -> APIError:
    """The error of an aborted request: 400 when the request itself was at fault (its grammar
    failed to compile or timed out), else 503 (the server is shutting down)."""
    if exc.error:
        return APIError(400, exc.error, code="invalid_grammar")
    return APIError(503, "the request was aborted by the server (shutting down)",
                    code="request_aborted")
