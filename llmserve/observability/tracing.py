"""Trace identity: W3C ``traceparent`` headers, trace ids, hashed users, optional OpenTelemetry.

Every request gets a trace id: the one in an incoming ``traceparent`` header when it is valid,
else a new one (an invalid header restarts the trace, as the W3C spec says). The server's own span
id goes back in the response's ``traceparent`` so a client can join its logs to the ledger.
OpenTelemetry is optional (``pip install 'llmserve[otlp]'``); spans use the ``gen_ai.*`` semantic
convention attribute names.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.observability.ledger import TraceRecord

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """The trace a request belongs to and the span id this server gives its handling."""

    trace_id: str
    span_id: str
    parent_span_id: str | None = None
    flags: str = "01"

    @property
    def traceparent(self) -> str:
        return format_traceparent(self.trace_id, self.span_id, self.flags)


def new_trace_id() -> str:
    """A random, non-zero 32-hex-digit trace id."""
    while True:
        value = secrets.token_hex(16)
        if value != _ZERO_TRACE:
            return value


def new_span_id() -> str:
    """A random, non-zero 16-hex-digit span id."""
    while True:
        value = secrets.token_hex(8)
        if value != _ZERO_SPAN:
            return value


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_span_id, flags)`` from a traceparent header, or None if invalid."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip())
    if match is None:
        return None
    version, trace_id, parent_id, flags, rest = match.groups()
    # Version ff is forbidden; version 00 has exactly four fields; later versions may add more.
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, flags


def format_traceparent(trace_id: str, span_id: str, flags: str = "01") -> str:
    """A version-00 traceparent header value."""
    if not re.fullmatch(r"[0-9a-f]{32}", trace_id) or trace_id == _ZERO_TRACE:
        raise ValueError(f"invalid trace id {trace_id!r}: 32 lowercase hex digits, not all zero")
    if not re.fullmatch(r"[0-9a-f]{16}", span_id) or span_id == _ZERO_SPAN:
        raise ValueError(f"invalid span id {span_id!r}: 16 lowercase hex digits, not all zero")
    return f"00-{trace_id}-{span_id}-{flags}"


def context_from_headers(headers: Mapping[str, str]) -> TraceContext:
    """Continue the caller's trace from ``traceparent`` or start a new one."""
    parsed = parse_traceparent(headers.get("traceparent"))
    if parsed is None:
        return TraceContext(trace_id=new_trace_id(), span_id=new_span_id())
    trace_id, parent, flags = parsed
    return TraceContext(trace_id=trace_id, span_id=new_span_id(), parent_span_id=parent, flags=flags)


def hash_user(user: str | None, key: bytes) -> str | None:
    """A keyed hash (HMAC-SHA256) of a user id: stable for one ledger, not reversible by guessing."""
    if user is None or user == "":
        return None
    return hmac.new(key, str(user).encode("utf-8"), hashlib.sha256).hexdigest()[:32]


# --- OpenTelemetry (optional) ---

_OPERATIONS = {"/v1/chat/completions": "chat", "/v1/completions": "text_completion"}


def span_attributes(record: TraceRecord) -> dict[str, Any]:
    """OpenTelemetry attributes for a trace row, with the ``gen_ai.*`` semantic names."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": _OPERATIONS.get(record.endpoint or "", "generate"),
        "gen_ai.provider.name": "llmserve",
        "gen_ai.system": "llmserve",  # the older name of gen_ai.provider.name
        "gen_ai.request.model": record.model,
        "gen_ai.response.model": record.model,
        "gen_ai.response.id": record.request_id,
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "gen_ai.usage.cache_read.input_tokens": record.cached_tokens,
        "llmserve.model_version": record.model_version,
        "llmserve.prompt_version": record.prompt_version,
        "llmserve.route": record.route,
        "llmserve.status": record.status,
        "llmserve.cost_usd": record.cost_usd,
        "llmserve.ttft_seconds": record.ttft,
        "llmserve.tpot_seconds": record.tpot,
        "http.route": record.endpoint,
    }
    if record.finish_reason:
        attrs["gen_ai.response.finish_reasons"] = [record.finish_reason]
    if record.error_type:
        attrs["error.type"] = record.error_type
    return {k: v for k, v in attrs.items() if v is not None}


_NEXT_IDS: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "llmserve_next_otel_ids", default=None)


class SpanExporter:
    """Emits one OpenTelemetry span per trace row, with the row's own trace and span ids."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def emit(self, record: TraceRecord) -> None:
        from opentelemetry import trace

        parent_ctx = None
        if record.parent_span_id:
            parent = trace.SpanContext(int(record.trace_id, 16), int(record.parent_span_id, 16),
                                       is_remote=True, trace_flags=trace.TraceFlags(1))
            parent_ctx = trace.set_span_in_context(trace.NonRecordingSpan(parent))
        token = _NEXT_IDS.set((int(record.trace_id, 16), int(record.span_id or new_span_id(), 16)))
        try:
            attrs = span_attributes(record)
            span = self.tracer.start_span(
                f"{attrs['gen_ai.operation.name']} {record.model or ''}".strip(),
                context=parent_ctx, kind=trace.SpanKind.SERVER, attributes=attrs,
                start_time=int(record.start_time * 1e9))
        finally:
            _NEXT_IDS.reset(token)
        if record.status != "ok":
            span.set_status(trace.Status(trace.StatusCode.ERROR, record.error_type or record.status))
        span.end(end_time=int((record.end_time or record.start_time) * 1e9))


def otlp_exporter(endpoint: str, span_processor: Any = None) -> SpanExporter:
    """A SpanExporter sending to an OTLP/HTTP ``endpoint`` (or to ``span_processor`` in tests).

    Raises:
        ValueError: the optional OpenTelemetry SDK packages are not installed.
    """
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    except ImportError:
        raise ValueError("--otlp-endpoint needs the OpenTelemetry SDK: "
                         "pip install 'llmserve[otlp]'") from None

    class _RowIds(RandomIdGenerator):
        # The SDK draws ids from its generator; hand it the row's ids so the exported span is
        # the one named in the response's traceparent header.
        def generate_trace_id(self) -> int:
            ids = _NEXT_IDS.get()
            return ids[0] if ids else super().generate_trace_id()

        def generate_span_id(self) -> int:
            ids = _NEXT_IDS.get()
            return ids[1] if ids else super().generate_span_id()

    provider = TracerProvider(resource=Resource.create({"service.name": "llmserve"}),
                              id_generator=_RowIds())
    if span_processor is None:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ValueError("--otlp-endpoint needs the OTLP exporter: "
                             "pip install 'llmserve[otlp]'") from None
        url = endpoint.rstrip("/")
        url = url if url.endswith("/v1/traces") else url + "/v1/traces"
        span_processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=url))
    provider.add_span_processor(span_processor)
    return SpanExporter(provider.get_tracer("llmserve"))


# --- HTTP (ASGI) ---


class TraceMiddleware:
    """Pure ASGI middleware giving every ``POST /v1/...`` request a trace, for a TraceRecorder.

    It adds ``traceparent`` and ``X-Trace-Id`` to the response, waits before each body chunk
    until the rows of engine requests that finished so far are committed (so no byte after a
    finish, the last one included, leaves before its row is durable), and lets the recorder
    write an error row for a request that never reached the engine.
    """

    def __init__(self, app: Any, recorder: Any) -> None:
        self.app = app
        self.recorder = recorder

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] != "http" or scope.get("method") != "POST"
                or not scope.get("path", "").startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        http = self.recorder.begin_http(scope)
        extra = [(b"traceparent", http.ctx.traceparent.encode()),
                 (b"x-trace-id", http.ctx.trace_id.encode())]
        ended = False

        async def receive_copy() -> dict:
            message = await receive()
            if message["type"] == "http.request" and len(http.body) < _MAX_CAPTURE:
                http.body += message.get("body", b"")
            return message

        async def send_after_commit(message: dict) -> None:
            nonlocal ended
            if message["type"] == "http.response.start":
                http.status = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            elif message["type"] == "http.response.body":
                if http.status >= 400 and len(http.error_body) < _MAX_CAPTURE:
                    http.error_body += message.get("body", b"")
                if not message.get("more_body", False):
                    ended = True
                    await self.recorder.end_http(http)
                elif http.futures:
                    await self.recorder.wait_committed(http)
            await send(message)

        try:
            await self.app(scope, receive_copy, send_after_commit)
        except Exception as exc:
            if not ended:
                await self.recorder.end_http(http, exc)
            raise
        finally:
            self.recorder.release(http)


_MAX_CAPTURE = 1 << 20  # request/error bodies kept for error rows; larger ones are cut
