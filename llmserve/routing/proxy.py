"""Serving one client request: cohort, replica, response passthrough, and the accounting after.

Streaming responses pass through byte for byte. After the first byte reached the client, a
replica failure ends the stream with an OpenAI-style error event (it cannot be retried). When a
request finishes it is settled by the router's ``Accounts`` (counters, trace row, watchdog
sample) and, for sampled primary requests, offered to the shadow mirror.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
from starlette.responses import JSONResponse, Response, StreamingResponse

from llmserve.observability.tracing import context_from_headers
from llmserve.routing.canary import CANARY, PIN_HEADER, PRIMARY, assign
from llmserve.routing.policies import routing_key
from llmserve.routing.records import RequestInfo
from llmserve.routing.shadow import ShadowJob
from llmserve.routing.state import ModelState
from llmserve.routing.upstream import Opened, UpstreamError

if TYPE_CHECKING:
    from llmserve.routing.router import Router


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error envelope."""
    return JSONResponse({"error": {"message": message, "type": type_, "param": None, "code": code}},
                        status_code=status, headers=headers)


@dataclass
class Call:
    """One client request on its way through the router."""

    router: Router
    state: ModelState
    deployment: str
    info: RequestInfo
    body: dict
    raw: bytes
    headers: Mapping[str, str]
    key: str | None
    shadowed: bool = False
    finished: bool = False

    async def open(self, deployment: str, keep_text: bool = False) -> Opened:
        """Send this request to a replica of ``deployment``."""
        return await self.router.upstream.open(
            self.state.pool(deployment), deployment, self.upstream_body(deployment),
            self.headers, self.key, self.info, keep_text)

    def upstream_body(self, deployment: str) -> bytes:
        target = self.state.deployment(deployment).backend_model
        if not target or target == self.body["model"]:
            return self.raw  # untouched bytes: no re-serialisation on the hot path
        return json.dumps({**self.body, "model": target}).encode()

    def response_headers(self) -> dict[str, str]:
        return {"x-trace-id": self.info.trace.trace_id, "traceparent": self.info.trace.traceparent,
                "x-llmserve-version": self.deployment, "x-llmserve-route": self.info.route}


def _parse(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the request body must be a JSON object")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ValueError("'model' is required and must be a string")
    return body


def _prompt_version(body: dict, headers: Mapping[str, str]) -> str | None:
    meta = body.get("metadata")
    if isinstance(meta, dict) and meta.get("prompt_version"):
        return str(meta["prompt_version"])
    return headers.get("x-prompt-version") or None


async def handle(router: Router, headers: Mapping[str, str], raw: bytes, endpoint: str) -> Response:
    """Serve one OpenAI request (chat or completions) through the router."""
    try:
        body = _parse(raw)
    except ValueError as exc:
        return error_response(400, str(exc))
    state = router.models.get(body["model"])
    if state is None:
        return error_response(404, f"the model {body['model']!r} does not exist; configured: "
                              f"{', '.join(sorted(router.models))}", code="model_not_found")
    user = body.get("user") if isinstance(body.get("user"), str) else None
    pinned = headers.get(PIN_HEADER)
    try:
        deployment, route = assign(state.route.name, state.primary, state.canary,
                                   state.canary_weight, user, pinned, state.route.deployments)
    except ValueError as exc:
        return error_response(400, str(exc), code="unknown_deployment")
    info = RequestInfo(trace=context_from_headers(headers),
                       request_id=headers.get("x-request-id") or f"rtr-{uuid.uuid4().hex}",
                       start_wall=time.time(), start=time.perf_counter(), endpoint=endpoint,
                       model=state.route.name, user=user,
                       prompt_version=_prompt_version(body, headers),
                       stream=bool(body.get("stream")), route=route)
    call = Call(router, state, deployment, info, body, raw, headers,
                routing_key(state.route.policy, body, state.route.prefix_chars))
    call.shadowed = route == PRIMARY and state.mirror is not None and state.mirror.sampled()
    try:
        opened = await call.open(deployment, call.shadowed)
    except UpstreamError as exc:
        if route != CANARY or pinned:
            return _fail(call, exc)
        # A broken canary must not fail its users: count the failure against the canary for
        # the watchdog, then serve the request from the primary.
        if state.route.watchdog is not None:
            router.accounts.canary_failed(info.model, deployment, exc.code)
        call.deployment, info.route = state.primary, PRIMARY
        try:
            opened = await call.open(call.deployment)
        except UpstreamError as exc2:
            return _fail(call, exc2)
    return _respond(call, opened)


def _fail(call: Call, exc: UpstreamError) -> Response:
    _finish(call, None, "error", exc.code)
    return error_response(exc.status, exc.message, "server_error", exc.code,
                          call.response_headers())


def _respond(call: Call, opened: Opened) -> Response:
    cap, resp = opened.capture, opened.response
    if opened.body is not None:
        cap.feed_body(opened.body)
        cap.end = time.perf_counter()
        failed = resp.status_code >= 400 or cap.error_type is not None
        error_type = (cap.error_type or f"http_{resp.status_code}") if failed else None
        _finish(call, opened, "error" if failed else "ok", error_type)
        return Response(opened.body, status_code=resp.status_code, headers=call.response_headers(),
                        media_type=resp.headers.get("content-type", "application/json"))
    return _RelayResponse(call, opened)


class _RelayResponse(StreamingResponse):
    """A passthrough stream that accounts for itself even if its body never starts (the client
    left before the first byte): an unstarted generator never runs its ``finally``."""

    def __init__(self, call: Call, opened: Opened) -> None:
        super().__init__(_relay(call, opened), status_code=opened.response.status_code,
                         headers=call.response_headers(), media_type="text/event-stream")
        self._call, self._opened = call, opened

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._call.finished:
                await self._opened.response.aclose()
                _finish(self._call, self._opened, "aborted", "client_disconnected")


async def _relay(call: Call, opened: Opened):
    """Pass the upstream SSE bytes through unchanged while watching them."""
    cap, status, error_type = opened.capture, "ok", None
    try:
        if opened.first:
            cap.feed_stream(opened.first)
            yield opened.first
        async for chunk in opened.chunks:
            cap.feed_stream(chunk)
            yield chunk
        if cap.error_type is not None:
            status, error_type = "error", cap.error_type
    except httpx.HTTPError as exc:
        status, error_type = "error", "upstream_disconnected"
        err = {"error": {"message": f"the replica failed mid-stream: {type(exc).__name__}",
                         "type": "server_error", "param": None, "code": "upstream_disconnected"}}
        yield f"data: {json.dumps(err)}\n\n".encode()
    except BaseException:  # the client went away (cancellation) or the app is shutting down
        status, error_type = "aborted", "client_disconnected"
        raise
    finally:
        cap.end = time.perf_counter()
        await opened.response.aclose()
        _finish(call, opened, status, error_type)


def _finish(call: Call, opened: Opened | None, status: str, error_type: str | None) -> None:
    """Settle a finished request once, then offer a sampled primary to the shadow mirror."""
    if call.finished:
        return
    call.finished = True
    state, info = call.state, call.info
    record, cap = call.router.accounts.settle(
        info, opened, state.deployment(call.deployment), status, error_type,
        watched=state.route.watchdog is not None)  # only watched models keep a sample window
    shadow = state.route.shadow
    if call.shadowed and status == "ok" and state.mirror is not None and shadow is not None:
        state.mirror.offer(ShadowJob(info.model, shadow.deployment,
                                     call.upstream_body(shadow.deployment), info, record, cap.text))
