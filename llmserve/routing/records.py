"""What the router writes: trace rows in the ledger, shadow comparisons and routing events.

Everything goes through the trace ledger's one writer thread (``llmserve.observability.ledger``),
so a request never waits on the disk and the file never has a second writer. The router adds
to each trace row, under ``extra``, the deployment that served it and that deployment's owner:
the gate reads them back. Shadow comparisons and events are tables of their own in the same
file, declared to the ledger when it opens. Rows are priced by the same rule as the server's
(``llmserve.observability.cost.price_record``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from llmserve import __version__
from llmserve.observability.cost import price_record
from llmserve.observability.ledger import Table, TraceLedger, TraceRecord
from llmserve.observability.tracing import TraceContext, hash_user
from llmserve.routing.backends import Capture
from llmserve.routing.config import Deployment

log = logging.getLogger("llmserve.router")
ENDPOINT_VERSION = f"llmserve-router/{__version__} openai-v1"

COMPARISONS_SQL = """CREATE TABLE IF NOT EXISTS router_shadow_comparisons (
  id INTEGER PRIMARY KEY AUTOINCREMENT, trace_id TEXT NOT NULL, created REAL NOT NULL,
  model TEXT, primary_deployment TEXT, shadow_deployment TEXT,
  primary_model_version TEXT, shadow_model_version TEXT, shadow_status TEXT,
  exact_match INTEGER, token_agreement REAL, length_delta INTEGER,
  latency_delta REAL, cost_delta REAL)"""
EVENTS_SQL = """CREATE TABLE IF NOT EXISTS router_events (
  id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, kind TEXT NOT NULL, model TEXT,
  deployment TEXT, owner TEXT, actor TEXT, reason TEXT, detail TEXT)"""
COMPARISON_FIELDS = ("trace_id", "created", "model", "primary_deployment", "shadow_deployment",
                     "primary_model_version", "shadow_model_version", "shadow_status",
                     "exact_match", "token_agreement", "length_delta", "latency_delta", "cost_delta")
FLUSH_S = 0.05  # how long a trace row may wait in the router before it is queued for disk
EVENT_FIELDS = ("ts", "kind", "model", "deployment", "owner", "actor", "reason", "detail")
COMPARISONS = Table("router_shadow_comparisons", COMPARISONS_SQL, COMPARISON_FIELDS)
EVENTS = Table("router_events", EVENTS_SQL, EVENT_FIELDS)


@dataclass
class RequestInfo:
    """What the router knows about a client request before it is forwarded."""

    trace: TraceContext
    request_id: str
    start_wall: float  # time.time()
    start: float  # time.perf_counter()
    endpoint: str
    model: str
    user: str | None
    prompt_version: str | None
    stream: bool
    route: str = "primary"  # primary / canary / shadow
    parent_trace_id: str | None = None  # shadow rows: the primary's trace


def build_record(info: RequestInfo, cap: Capture, dep: Deployment, status: str,
                 error_type: str | None, user_key: bytes | None) -> TraceRecord:
    """A ledger row for one forwarded request (primary, canary or shadow)."""
    end = cap.end if cap.end is not None else time.perf_counter()
    record = TraceRecord(
        trace_id=info.trace.trace_id, span_id=info.trace.span_id,
        parent_span_id=info.trace.parent_span_id, parent_trace_id=info.parent_trace_id,
        request_id=info.request_id,
        start_time=info.start_wall, end_time=info.start_wall + (end - info.start),
        status=status, endpoint=info.endpoint, endpoint_version=ENDPOINT_VERSION,
        model=info.model, model_version=cap.model_version or dep.model_version,
        prompt_version=info.prompt_version,
        user_hash=hash_user(info.user, user_key) if user_key else None, route=info.route,
        prompt_tokens=cap.prompt_tokens, cached_tokens=cap.cached_tokens,
        completion_tokens=cap.output_tokens, ttft=cap.ttft, tpot=cap.tpot,
        e2e_latency=end - info.start, finish_reason=cap.finish_reason, error_type=error_type,
        http_status=cap.status_code or None,
        extra={"deployment": dep.name, "owner": dep.owner},
    )
    price_record(record, dep.pricing)
    return record


class RouterRecorder:
    """Hands trace rows, comparisons and events to the trace ledger (a no-op without one)."""

    def __init__(self, trace_db: str | None) -> None:
        self.path = trace_db
        self.ledger = TraceLedger(trace_db, tables=(COMPARISONS, EVENTS)) if trace_db else None
        self.dropped_rows = 0
        self._buffer: list[TraceRecord] = []

    @property
    def user_key(self) -> bytes | None:
        return self.ledger.user_hash_key if self.ledger else None

    def trace(self, record: TraceRecord) -> None:
        """Buffer a trace row; rows reach the ledger's queue in batches every FLUSH_S.

        Handing each row over on its own would wake the ledger's writer thread once per
        request, and that thread switch (GIL hand-off, one fsync per commit) costs more than
        the rest of the router's work on a request.
        """
        if self.ledger is None:
            return
        self._buffer.append(record)
        if len(self._buffer) == 1:
            try:
                asyncio.get_running_loop().call_later(FLUSH_S, self._submit_buffer)
            except RuntimeError:  # no event loop (offline use): hand over at once
                self._submit_buffer()

    def _submit_buffer(self) -> None:
        rows, self._buffer = self._buffer, []
        for record in rows:
            try:
                self.ledger.submit(record, timeout=0)  # type: ignore[union-attr]
            except RuntimeError as exc:
                self.dropped_rows += 1
                log.warning("trace row dropped: %s", exc)

    def _row(self, table: Table, row: dict[str, Any]):
        if self.ledger is None:
            return None
        try:
            return self.ledger.submit_row(table.name, row, timeout=0)  # never block the loop
        except RuntimeError as exc:
            self.dropped_rows += 1
            log.warning("%s row dropped: %s", table.name, exc)
            return None

    def comparison(self, row: dict[str, Any]) -> asyncio.Future | None:
        """Queue a shadow comparison row; the returned future resolves once it is committed."""
        future = self._row(COMPARISONS, row)
        return asyncio.wrap_future(future) if future is not None else None

    def event(self, row: dict[str, Any]) -> None:
        """Queue an event row (rare; fire and forget)."""
        self._row(EVENTS, dict(row, detail=json.dumps(row.get("detail") or {}, sort_keys=True)))

    def flush(self) -> None:
        """Block until everything recorded so far is on disk (tests and shutdown)."""
        if self.ledger is not None:
            self._submit_buffer()
            self.ledger.flush()

    def close(self) -> None:
        if self.ledger is not None:
            self._submit_buffer()
            self.ledger.close()
