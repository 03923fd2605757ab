"""The engine observer that turns served requests into trace-ledger rows.

``TraceRecorder`` watches an engine (request added / step / finished) and writes one row per
request. ``TraceMiddleware`` (``tracing.py``) calls its HTTP side for each ``POST /v1/...``:
it joins the HTTP request to the engine requests it submitted, and holds back every response
byte sent after an engine request finished until that request's row is committed. Requests
refused before they reached the engine (400s and the like) get an error row of their own.
The server flags live in ``trace_options.py``; wiring into an app in ``trace_app.py``.

From the ``info`` the caller passes to ``add_request`` the recorder reads ``model``,
``endpoint``, ``user``, ``metadata``, ``http_request_id``, ``route``, ``response_format`` (the
kind of output asked for) and ``tool_call_counter`` (called on each completion's final text to
count its tool calls; no counter means 0 calls).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmserve.observability.cost import Attribution, CostCounters, HardwareMeter, price_record
from llmserve.observability.ledger import TraceLedger, TraceRecord
from llmserve.observability.pricing import HardwarePrice, PricingTable
from llmserve.observability.tracing import TraceContext, context_from_headers, hash_user

if TYPE_CHECKING:
    from llmserve.outputs import RequestOutput

logger = logging.getLogger(__name__)
ROUTES = ("primary", "canary", "shadow", "batch")
_MAX_LABEL = 256  # prompt versions and error types are labels, not documents


@dataclass
class HttpTrace:
    """One HTTP request's trace state, shared by the middleware and the engine hooks."""

    ctx: TraceContext
    endpoint: str
    start_time: float
    headers: dict[str, str]
    key: str = ""  # the http_request_id the handler passes to the engine
    status: int = 0
    body: bytes = b""
    error_body: bytes = b""
    linked: list[str] = field(default_factory=list)  # engine request ids it submitted
    futures: list = field(default_factory=list)  # commits not yet awaited

    def header(self, name: str, allowed: tuple[str, ...] | None = None) -> str | None:
        value = self.headers.get(name)
        if not value or (allowed is not None and value not in allowed):
            return None
        return value[:_MAX_LABEL]


@dataclass
class _Pending:
    info: dict
    http: HttpTrace | None


class TraceRecorder:
    """Writes one ledger row per engine request, priced by ``pricing``; see the module doc."""

    def __init__(self, ledger: TraceLedger, engine: Any = None, *, model_name: str = "",
                 model_version: str | None = None, pricing: PricingTable | None = None,
                 chat_template_hash: str | None = None, log_prompts: bool = False,
                 span_exporter: Any = None, endpoint_version: str = "", registry: Any = None
                 ) -> None:
        self.ledger, self.engine = ledger, engine
        self.model_name, self.model_version = model_name, model_version
        self.pricing, self.log_prompts = pricing, log_prompts
        self.chat_template_hash, self.endpoint_version = chat_template_hash, endpoint_version
        self.span_exporter = span_exporter
        price = pricing.for_model(model_name) if pricing else None
        self.meter = HardwareMeter.for_price(price) if isinstance(price, HardwarePrice) else HardwareMeter()
        self._pending: dict[str, _Pending] = {}
        self._http: dict[str, HttpTrace] = {}
        self._last_step: object = None
        self._metrics = CostCounters(registry) if registry is not None else None

    # --- AsyncEngine hooks (event loop thread) ---

    def on_request_added(self, request_id: str, info: dict) -> None:
        http = self._http.get(info.get("http_request_id") or "")
        if http is not None:
            http.linked.append(request_id)
        self._pending[request_id] = _Pending(info, http)
        self.meter.add(request_id, _get(info, "arrival_time", time.time()))

    def on_step(self, step: Any) -> None:
        if step is self._last_step:
            return  # the engine re-reports its last step after a step that ran nothing
        self._last_step = step
        self.meter.step(step.start, step.end, step.work)

    def on_finished(self, output: RequestOutput, usage: dict, timings: dict) -> None:
        pending = self._pending.pop(output.request_id, None) or _Pending({}, None)
        attribution = self.meter.finish(output.request_id, _get(timings, "finished_time", time.time()))
        aborted = any(c.finish_reason == "abort" for c in output.outputs)
        record = self._base_record(output.request_id, pending.info, pending.http,
                                   _get(timings, "arrival_time", time.time()))
        record.end_time = timings.get("finished_time")
        record.status = "aborted" if aborted else "ok"
        record.error_type = "aborted" if aborted else None
        record.finish_reason = output.outputs[0].finish_reason if output.outputs else None
        record.prompt_tokens, record.cached_tokens = usage["prompt_tokens"], usage["cached_tokens"]
        record.completion_tokens = usage["completion_tokens"]
        record.queue_time, record.ttft = timings.get("queue_time"), timings.get("ttft")
        record.e2e_latency, record.tpot = timings.get("e2e"), _tpot(output, timings)
        if self.log_prompts:
            record.prompt_text = output.prompt if output.prompt is not None else self._decode(output)
            texts = [c.text for c in output.outputs]
            record.completion_text = texts[0] if len(texts) == 1 else json.dumps(texts)
        record.num_tool_calls = _count_tool_calls(pending.info, output)
        self._price(record, attribution, output.num_computed_prefill_tokens)
        self._submit(record, pending.http)

    # --- HTTP side (called by TraceMiddleware) ---

    def begin_http(self, scope: dict) -> HttpTrace:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        state = scope.setdefault("state", {})
        http_id = state.get("request_id")
        if not http_id or http_id in self._http:
            # A client may reuse an X-Request-Id; the hooks need a unique key for this request.
            http_id = state["request_id"] = uuid.uuid4().hex
        http = HttpTrace(context_from_headers(headers), scope.get("path", ""), time.time(), headers,
                         key=http_id)
        self._http[http_id] = http
        state["trace_id"] = http.ctx.trace_id
        return http

    async def wait_committed(self, http: HttpTrace) -> None:
        """Wait until every row this request has submitted so far is committed."""
        futures, http.futures = http.futures, []
        for future in futures:
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), 30.0)
            except Exception:  # noqa: BLE001 - a ledger failure must not fail the response
                logger.exception("trace row was not committed")

    async def end_http(self, http: HttpTrace, exc: BaseException | None = None) -> None:
        """The response is about to end: record failures, then wait for every row."""
        dead = getattr(self.engine, "dead_error", None)
        if dead is not None:
            # A dead engine never reports these requests again; a live one will report them
            # (finished or aborted) through on_finished, which writes their rows.
            for rid in [r for r in http.linked if r in self._pending]:
                self._fail(rid, type(dead).__name__)
        if not http.linked and (exc is not None or http.status >= 400):
            self._request_error_row(http, exc)
        await self.wait_committed(http)

    def release(self, http: HttpTrace) -> None:
        self._http.pop(http.key, None)

    def close(self) -> None:
        """Record requests the engine never finished (shutdown), then flush and close."""
        for rid in list(self._pending):
            self._fail(rid, "EngineStopped")
        self.ledger.close()

    # --- internals ---

    def _base_record(self, request_id: str, info: dict, http: HttpTrace | None,
                     start: float) -> TraceRecord:
        ctx = http.ctx if http else context_from_headers({})
        metadata = info.get("metadata") if isinstance(info.get("metadata"), dict) else {}
        version = metadata.get("prompt_version") or (http.header("x-prompt-version") if http else None)
        endpoint = http.endpoint if http else info.get("endpoint")
        is_chat = "chat" in (endpoint or "")
        return TraceRecord(
            trace_id=ctx.trace_id, span_id=ctx.span_id, parent_span_id=ctx.parent_span_id,
            request_id=request_id, start_time=start, endpoint=endpoint,
            endpoint_version=self.endpoint_version, model=info.get("model") or self.model_name,
            model_version=self.model_version,
            prompt_version=str(version)[:_MAX_LABEL] if version else None,
            chat_template_hash=self.chat_template_hash if is_chat else None,
            user_hash=hash_user(info.get("user"), self.ledger.user_hash_key),
            route=(http.header("x-llmserve-route", ROUTES) if http else None)
            or (info.get("route") if info.get("route") in ROUTES else None)
            or "primary",
            parent_trace_id=http.header("x-parent-trace-id") if http else None,
            response_format=_label(info.get("response_format")), num_tool_calls=0,
            extra={"http_request_id": info["http_request_id"]} if info.get("http_request_id") else {})

    def _price(self, record: TraceRecord, attribution: Attribution, computed_prefill: int | None) -> None:
        price = self.pricing.for_model(record.model or "") if self.pricing else None
        price_record(record, price, attribution=attribution, computed_prefill_tokens=computed_prefill)

    def _fail(self, request_id: str, error_type: str) -> None:
        """Row for an engine request that ended without a final output (engine failure)."""
        pending = self._pending.pop(request_id)
        now = time.time()
        attribution = self.meter.finish(request_id, now)
        start = _get(pending.info, "arrival_time", now)
        record = self._base_record(request_id, pending.info, pending.http, start)
        record.status, record.error_type, record.end_time = "error", error_type, now
        record.e2e_latency = now - start
        record.prompt_tokens = len(pending.info.get("prompt_token_ids") or ())
        self._price(record, attribution, None)
        self._submit(record, pending.http)

    def _request_error_row(self, http: HttpTrace, exc: BaseException | None) -> None:
        """Row for a request refused before reaching the engine (bad input, overload...)."""
        body = _json(http.body)
        err = _json(http.error_body).get("error") or {}
        info = {"model": body.get("model") if isinstance(body.get("model"), str) else None,
                "user": body.get("user") if isinstance(body.get("user"), str) else None,
                "metadata": body.get("metadata"), "http_request_id": http.key}
        record = self._base_record(f"http-{uuid.uuid4().hex}", info, http, http.start_time)
        record.status, record.end_time = "error", time.time()
        record.e2e_latency = record.end_time - http.start_time
        record.http_status = http.status or 500
        kind = type(exc).__name__ if exc is not None else (err.get("code") or err.get("type"))
        record.error_type = str(kind or f"http_{record.http_status}")[:_MAX_LABEL]
        self._price(record, Attribution(), 0)  # it computed nothing: an explicit $0, flagged
        self._submit(record, http)

    def _submit(self, record: TraceRecord, http: HttpTrace | None) -> None:
        if http is not None and http.status:
            record.http_status = record.http_status or http.status
        try:
            future = self.ledger.submit(record, timeout=0)  # never block the event loop
        except RuntimeError:
            logger.error("trace ledger is full or closed: row for %s dropped", record.request_id)
            if self._metrics:
                self._metrics.dropped.inc()
            return
        if http is not None:
            http.futures.append(future)
        if self._metrics:
            self._metrics.observe(record)
        if self.span_exporter is not None:
            try:
                self.span_exporter.emit(record)
            except Exception:  # noqa: BLE001 - tracing export must never break serving
                logger.exception("OpenTelemetry span export failed")

    def _decode(self, output: RequestOutput) -> str | None:
        tokenizer = getattr(self.engine, "tokenizer", None)
        return tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False) if tokenizer else None


def _label(value: Any) -> str | None:
    return value[:_MAX_LABEL] if isinstance(value, str) and value else None


def _count_tool_calls(info: dict, output: RequestOutput) -> int | None:
    """Tool calls in the final texts, by the caller's counter (0 without one; None if it fails)."""
    counter = info.get("tool_call_counter")
    if not callable(counter):
        return 0
    try:
        return sum(int(counter(c.text)) for c in output.outputs)
    except Exception:  # noqa: BLE001 - a parser bug must not cost the billing row
        logger.exception("tool_call_counter failed for request %s", output.request_id)
        return None


def _get(d: dict, key: str, default: float) -> float:
    value = d.get(key)
    return default if value is None else value


def _tpot(output: RequestOutput, timings: dict) -> float | None:
    """Seconds per output token after the first, for the longest completion."""
    longest = max((len(c.token_ids) for c in output.outputs), default=0)
    m = output.metrics
    first = (m.first_token_time if m else None) or timings.get("first_token_time")
    last = (m.last_token_time if m else None) or timings.get("finished_time")
    if longest < 2 or first is None or last is None:
        return None
    return max(0.0, last - first) / (longest - 1)


def _json(data: bytes) -> dict:
    try:
        value = json.loads(data) if data else {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
