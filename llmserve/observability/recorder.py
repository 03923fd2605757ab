"""The glue that turns served requests into trace-ledger rows.

``TraceRecorder`` is an AsyncEngine observer (request added / step / finished) and
``TraceMiddleware`` wraps each ``POST /v1/...`` HTTP request: it continues or starts the trace,
adds ``traceparent`` and ``X-Trace-Id`` to the response, and holds back every response byte sent
after an engine request finished until that request's row is committed. Requests refused before
they reached the engine (400s and the like) get an error row of their own.
``install_trace_ledger(app, engine, options)`` wires both into an app from ``create_app``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from llmserve.observability.cost import Attribution, CostCounters, HardwareMeter, request_cost
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
            extra={"http_request_id": info["http_request_id"]} if info.get("http_request_id") else {})

    def _price(self, record: TraceRecord, attribution: Any, computed_prefill: int | None) -> None:
        price = self.pricing.for_model(record.model or "") if self.pricing else None
        cost = request_cost(price, prompt_tokens=record.prompt_tokens,
                            cached_tokens=record.cached_tokens,
                            completion_tokens=record.completion_tokens,
                            completed=record.status == "ok",
                            computed_prefill_tokens=computed_prefill, attribution=attribution)
        record.hardware_seconds = attribution.seconds
        record.cost_partial = record.status != "ok"
        if cost is not None:
            record.cost_mode = price.mode
            record.cost_usd, record.input_cost_usd = cost.total_usd, cost.input_usd
            record.cached_input_cost_usd, record.output_cost_usd = cost.cached_input_usd, cost.output_usd

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


# --- wiring into the server ---


@dataclass(frozen=True)
class TraceOptions:
    """Server options of the trace ledger (``llmserve serve --trace-db/--pricing/...``)."""

    trace_db: str
    pricing: str | None = None
    log_prompts: bool = False
    otlp_endpoint: str | None = None


def add_trace_args(parser: Any) -> None:
    """Add ``--trace-db``, ``--pricing``, ``--log-prompts``, ``--otlp-endpoint`` to a parser."""
    g = parser.add_argument_group("trace ledger")
    g.add_argument("--trace-db", default=None, metavar="PATH",
                   help="SQLite trace ledger, one row per request (default: $LLMSERVE_TRACE_DB "
                        "or ~/.local/state/llmserve/traces.db; 'off' disables it)")
    g.add_argument("--pricing", default=None, metavar="FILE",
                   help="TOML or YAML pricing file (list price or $/hour hardware) per model")
    g.add_argument("--log-prompts", action="store_true",
                   help="store prompt and completion text in the ledger (off by default)")
    g.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="also export an OpenTelemetry span per request (needs llmserve[otlp])")


def trace_options_from_args(args: Any) -> TraceOptions | None:
    """TraceOptions from parsed ``add_trace_args`` options; None when the ledger is off.

    The pricing file is read here too, so a bad one fails before the model loads.
    """
    from llmserve.observability.ledger import default_trace_db_path
    from llmserve.observability.pricing import load_pricing

    path = args.trace_db or default_trace_db_path()
    if path.lower() in ("off", "none", "no"):
        if args.pricing or args.log_prompts or args.otlp_endpoint:
            raise ValueError("--pricing, --log-prompts and --otlp-endpoint need the trace ledger "
                             "(remove --trace-db off)")
        return None
    if args.pricing:
        load_pricing(args.pricing)
    return TraceOptions(path, args.pricing, bool(args.log_prompts), args.otlp_endpoint)


def install_trace_ledger(app: Any, engine: Any, options: TraceOptions | None) -> TraceRecorder | None:
    """Attach the trace ledger to an app built by ``create_app`` (before it starts serving).

    Registers the recorder as an engine observer, adds TraceMiddleware innermost (inside the
    gateway, so requests refused for auth, size or drain get no row), adds cost counters to the
    app's /metrics registry, and closes the ledger when the app shuts down.
    """
    if options is None:
        return None
    import contextlib

    from starlette.middleware import Middleware

    from llmserve import __version__
    from llmserve.models.version import compute_model_version
    from llmserve.observability.pricing import load_pricing
    from llmserve.observability.tracing import TraceMiddleware, otlp_exporter

    if getattr(app, "middleware_stack", None) is not None:
        raise RuntimeError("install_trace_ledger must run before the app starts serving")
    pricing = load_pricing(options.pricing) if options.pricing else None
    exporter = otlp_exporter(options.otlp_endpoint) if options.otlp_endpoint else None
    inner = getattr(engine, "engine", engine)
    model_dir = getattr(getattr(getattr(inner, "config", None), "model", None), "model", None)
    ctx = getattr(app.state, "ctx", None)
    recorder = TraceRecorder(
        TraceLedger(options.trace_db), engine,
        model_name=ctx.model_name if ctx is not None else engine.model_name,
        model_version=compute_model_version(model_dir) if model_dir else None,
        pricing=pricing, chat_template_hash=getattr(engine.tokenizer, "chat_template_hash", None),
        log_prompts=options.log_prompts, span_exporter=exporter,
        endpoint_version=f"llmserve-{__version__}/openai-v1",
        registry=getattr(ctx, "registry", None))
    engine.add_observer(recorder)
    app.user_middleware.append(Middleware(TraceMiddleware, recorder=recorder))
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(a: Any) -> Any:
        try:
            async with original(a) as state:
                yield state
        finally:
            recorder.close()

    app.router.lifespan_context = lifespan
    app.state.trace_recorder = recorder
    return recorder
