"""The gate every HTTP request passes: request id, drain, API key, body size, in-flight count.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streaming responses and client
disconnects pass through untouched.
"""

from __future__ import annotations

import hmac
import json
import re
import uuid
from typing import TYPE_CHECKING

from llmserve.server.openai.errors import error_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from llmserve.server.openai.context import ServerContext

# Routes a load balancer or scraper must reach without a key.
PUBLIC_PATHS = frozenset({"/health", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")


class GatewayMiddleware:
    """Assigns `X-Request-Id`, refuses work while draining (503), checks the API key (401),
    caps the body size (413) and counts in-flight requests for the drain."""

    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        self._keys = [k.encode() for k in ctx.api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        request_id = _request_id(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        send = _echo_request_id(send, request_id)
        path = scope.get("path", "")
        if self.ctx.draining and path != "/metrics":
            await _reply(send, 503, "server is shutting down", code="server_shutting_down")
            return
        if path not in PUBLIC_PATHS and not self._authorized(headers.get("authorization")):
            await _reply(send, 401, "missing or invalid API key", code="invalid_api_key")
            return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        self.ctx.in_flight += 1
        try:
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.ctx.in_flight -= 1

    def _authorized(self, header: bytes | None) -> bool:
        if not self._keys:
            return True
        if not header or not header[:7].lower() == b"bearer ":
            return False
        token = header[7:].strip()
        # Compare against every key, without stopping early, in constant time per key.
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(token, key)
        return ok

    async def _read_body(self, headers: dict, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (or when the client went away)."""
        limit = self.ctx.max_body_bytes
        declared = headers.get("content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _reply(send, 413, f"request body exceeds the limit of {limit} bytes")
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, 413, f"request body exceeds the limit of {limit} bytes")
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _request_id(value: bytes | None) -> str:
    if value:
        text = value.decode("latin-1")
        if _REQUEST_ID.match(text):
            return text
    return uuid.uuid4().hex


def _echo_request_id(send: Send, request_id: str) -> Send:
    header = (b"x-request-id", request_id.encode())

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), header]}
        await send(message)

    return wrapped


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass through (disconnect notices)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


async def _reply(send: Send, status: int, message: str, code: str | None = None) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode())]
    if status == 503:
        headers.append((b"retry-after", b"5"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
