"""What the chat and completion handlers share: sampling params, submission, collection, SSE."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from llmserve.engine.async_engine import EngineDeadError, RequestStream
from llmserve.sampling_params import SamplingParams
from llmserve.server.openai.errors import APIError, error_body

if TYPE_CHECKING:
    from llmserve.outputs import RequestOutput
    from llmserve.server.openai.context import ServerContext
    from llmserve.server.openai.protocol import SamplingFields

# Seconds between SSE keep-alive comments on a silent stream.
SSE_PING_SECONDS = 15


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


class RequestAborted(Exception):
    """The engine aborted the request (server drain timeout); not the client's doing."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None
                    ) -> SamplingParams:
    """SamplingParams from the request's fields; ValueError (400) for bad combinations."""
    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=0 if req.top_k is None else req.top_k,
        min_p=0.0 if req.min_p is None else req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        seed=req.seed,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
    )


async def submit(ctx: ServerContext, request: Request, request_id: str, prompt: Any,
                 params: SamplingParams, req: SamplingFields, endpoint: str) -> RequestStream:
    """Hand one prompt to the engine; the info dict reaches the engine's observers."""
    info = {
        "model": ctx.model_name,
        "endpoint": endpoint,
        "user": req.user,
        "metadata": getattr(req, "metadata", None),
        "http_request_id": request.scope.get("state", {}).get("request_id"),
    }
    return await ctx.engine.add_request(request_id, prompt, params, priority=req.priority,
                                        info=info)


async def submit_all(ctx: ServerContext, request: Request, base_id: str, prompts: Sequence,
                     params: SamplingParams, req: SamplingFields, endpoint: str
                     ) -> list[RequestStream]:
    """Submit several prompts; if one is refused, abort the ones already accepted."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            streams.append(await submit(ctx, request, rid, prompt, params, req, endpoint))
    except BaseException:
        for s in streams:
            s.abort()
        raise
    return streams


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _final(stream: RequestStream) -> RequestOutput:
    last = None
    async for out in stream:
        last = out
    if last is None or any(c.finish_reason == "abort" for c in last.outputs):
        raise RequestAborted()
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


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def stream_error(exc: BaseException) -> dict:
    if isinstance(exc, EngineDeadError):
        return error_body(503, f"the engine is not available: {exc}", code="engine_unavailable")
    if isinstance(exc, RequestAborted):
        return error_body(503, "the request was aborted by the server (shutting down)",
                          code="request_aborted")
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


def aborted_response() -> APIError:
    return APIError(503, "the request was aborted by the server (shutting down)",
                    code="request_aborted")
