"""Hardware-cost attribution: split the machine's busy time over the requests that used it.

The rule (documented for finance; ``HardwarePrice`` holds the weights):

1. **Busy window.** The machine is *busy* from the moment a request arrives while none is in
   flight until the moment the last in-flight request finishes. Every second of a busy window is
   charged to some request; time with no request in flight is charged to nobody.
2. **Step time.** Each engine step's wall time (``StepStats.end - start``) goes to the requests in
   that step in proportion to their work ``w = prefill_token_weight * prefill_tokens +
   decode_token_weight * decode_tokens``. The default weights are 1 and 1: a step runs one flat
   batch of token rows through the weight matmuls, which cost the same per row whether the row is
   a prompt token or a generated one. Only tokens actually computed count, so prefix-cache hits
   are free and a preempted request pays again for its recompute.
3. **Idle time.** Time inside a busy window that no step covers (scheduling, detokenisation,
   waiting for the next request) is spread equally over the requests in flight at that moment.

Hence, by construction, the per-request seconds of a window sum to the window's length, and so
``sum(request costs) == usd_per_hour * busy_seconds / 3600`` (conservation, tested to 0.1%).

For the report's cost per input / output token, a request's step time is labelled prefill or
decode by the same weights, and its share of idle time is split in the same proportion.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmserve.observability.pricing import CostBreakdown, HardwarePrice, ListPrice, ModelPrice

if TYPE_CHECKING:
    from llmserve.observability.ledger_schema import TraceRecord


@dataclass
class Attribution:
    """Machine seconds attributed to one request."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    idle_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds + self.idle_seconds


@dataclass
class _Active:
    arrival: float
    attribution: Attribution


class HardwareMeter:
    """Attributes busy-window wall time to requests; thread-safe.

    Feed it ``add`` when a request arrives, ``step`` after every engine step and ``finish`` when a
    request ends (finished, aborted or failed); ``finish`` returns the request's seconds.
    """

    def __init__(self, prefill_token_weight: float = 1.0, decode_token_weight: float = 1.0) -> None:
        if prefill_token_weight < 0 or decode_token_weight < 0:
            raise ValueError("token weights must not be negative")
        self.prefill_weight = float(prefill_token_weight)
        self.decode_weight = float(decode_token_weight)
        self._lock = threading.Lock()
        self._active: dict[str, _Active] = {}
        self._last_t: float | None = None  # everything before this instant is attributed
        self._window_start: float | None = None
        self._closed_seconds = 0.0

    @classmethod
    def for_price(cls, price: HardwarePrice) -> HardwareMeter:
        return cls(price.prefill_token_weight, price.decode_token_weight)

    @property
    def busy_seconds(self) -> float:
        """Length of every busy window so far, including the open one up to the last event."""
        with self._lock:
            open_part = 0.0
            if self._window_start is not None and self._last_t is not None:
                open_part = self._last_t - self._window_start
            return self._closed_seconds + open_part

    @property
    def num_active(self) -> int:
        return len(self._active)

    def add(self, request_id: str, arrival_time: float) -> None:
        """A request arrived (idempotent)."""
        with self._lock:
            self._add_locked(request_id, arrival_time)

    def step(self, start: float, end: float, work: Mapping[str, tuple[int, int]]) -> None:
        """Attribute one step's wall time ``[start, end]`` by ``work[rid] = (prefill, decode)``."""
        if end < start:
            raise ValueError(f"step ends ({end}) before it starts ({start})")
        with self._lock:
            for rid in work:
                self._add_locked(rid, start)  # a request we were not told about: charge from here
            if self._last_t is None:
                return
            self._spread_idle(start)
            begin = max(start, self._last_t)
            duration = end - begin
            weights = {
                rid: (self.prefill_weight * p, self.decode_weight * d)
                for rid, (p, d) in work.items()
            }
            total = sum(p + d for p, d in weights.values())
            if duration > 0 and total > 0:
                for rid, (wp, wd) in weights.items():
                    att = self._active[rid].attribution
                    att.prefill_seconds += duration * wp / total
                    att.decode_seconds += duration * wd / total
            elif duration > 0:
                self._spread_idle(end)  # a step that did no token work is overhead like idle time
            self._last_t = max(self._last_t, end)

    def finish(self, request_id: str, finish_time: float) -> Attribution:
        """The request ended at ``finish_time``: close its account and return its seconds."""
        with self._lock:
            entry = self._active.get(request_id)
            if entry is None:
                return Attribution()  # never arrived here, so it used no machine time
            self._spread_idle(finish_time)
            del self._active[request_id]
            if not self._active:
                self._close_window()
            return entry.attribution

    # --- internals (lock held) ---

    def _add_locked(self, request_id: str, arrival: float) -> None:
        if request_id in self._active:
            return
        if not self._active:
            # A new busy window. Never reopen time already charged to an earlier window.
            start = arrival if self._last_t is None else max(arrival, self._last_t)
            self._window_start = start
            self._last_t = start
        self._active[request_id] = _Active(arrival, Attribution())

    def _close_window(self) -> None:
        if self._window_start is not None and self._last_t is not None:
            self._closed_seconds += self._last_t - self._window_start
        self._window_start = None

    def _spread_idle(self, until: float) -> None:
        """Charge ``[last_t, until]`` equally to the requests in flight in each part of it."""
        last = self._last_t
        if last is None or until <= last or not self._active:
            return
        # Requests that arrived inside the gap share only the part after their arrival.
        cuts = sorted({max(e.arrival, last) for e in self._active.values()} | {until})
        cuts = [c for c in cuts if c <= until]
        for lo, hi in zip(cuts, cuts[1:], strict=False):
            present = [e for e in self._active.values() if max(e.arrival, last) <= lo]
            for e in present:
                e.attribution.idle_seconds += (hi - lo) / len(present)
        first_cut = cuts[0]
        if first_cut > last:
            # No request was in flight in [last, first_cut]: give it to the earliest arrivals so
            # the open window's time stays fully charged.
            early = [e for e in self._active.values() if max(e.arrival, last) == first_cut]
            for e in early:
                e.attribution.idle_seconds += (first_cut - last) / len(early)
        self._last_t = until


def hardware_cost(attribution: Attribution, price: HardwarePrice) -> CostBreakdown:
    """Convert attributed seconds to USD, split into input (prefill) and output (decode)."""
    rate = price.usd_per_second
    worked = attribution.prefill_seconds + attribution.decode_seconds
    prefill_share = attribution.prefill_seconds / worked if worked > 0 else 1.0
    idle = attribution.idle_seconds
    return CostBreakdown(
        input_usd=(attribution.prefill_seconds + idle * prefill_share) * rate,
        cached_input_usd=0.0,  # prefix-cache hits run no compute
        output_usd=(attribution.decode_seconds + idle * (1.0 - prefill_share)) * rate,
    )


def request_cost(
    price: ModelPrice | None,
    *,
    prompt_tokens: int,
    cached_tokens: int,
    completion_tokens: int,
    completed: bool,
    computed_prefill_tokens: int | None = None,
    attribution: Attribution | None = None,
) -> CostBreakdown | None:
    """The cost of one request under ``price`` (None when the model is not priced).

    A request that did not complete (aborted, failed) pays list price for what it computed: the
    prompt tokens it prefilled (cache hits at the cached rate) and the tokens it generated.
    """
    if price is None:
        return None
    if isinstance(price, HardwarePrice):
        return hardware_cost(attribution or Attribution(), price)
    assert isinstance(price, ListPrice)
    cached = max(0, min(cached_tokens, prompt_tokens))
    billed_input = prompt_tokens
    if not completed and computed_prefill_tokens is not None:
        billed_input = min(prompt_tokens, cached + max(0, computed_prefill_tokens))
        cached = min(cached, billed_input)
    return price.cost(billed_input, cached, completion_tokens)


def price_record(record: TraceRecord, price: ModelPrice | None, *,
                 attribution: Attribution | None = None,
                 computed_prefill_tokens: int | None = None) -> None:
    """Fill a ledger row's cost columns from its tokens and status (every writer uses this).

    ``attribution`` is the machine time the engine gave the request (hardware pricing; None
    where no engine ran it here, as in the router); ``computed_prefill_tokens`` bounds what an
    unfinished request pays for its prompt (see ``request_cost``).
    """
    record.cost_partial = record.status != "ok"
    if attribution is not None:
        record.hardware_seconds = attribution.seconds
    cost = request_cost(price, prompt_tokens=record.prompt_tokens,
                        cached_tokens=record.cached_tokens,
                        completion_tokens=record.completion_tokens,
                        completed=record.status == "ok",
                        computed_prefill_tokens=computed_prefill_tokens, attribution=attribution)
    if cost is None or price is None:
        return
    record.cost_mode = price.mode
    record.cost_usd, record.input_cost_usd = cost.total_usd, cost.input_usd
    record.cached_input_cost_usd, record.output_cost_usd = cost.cached_input_usd, cost.output_usd


class CostCounters:
    """Prometheus counters of cost and ledger rows, by model (on the server's registry)."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.cost = Counter("llmserve:request_cost_usd_total",
                            "Cost of served requests in USD, by model and kind (input/output).",
                            ["model_name", "kind"], registry=registry)
        self.rows = Counter("llmserve:trace_rows_total", "Trace-ledger rows written, by status.",
                            ["model_name", "status"], registry=registry)
        self.dropped = Counter("llmserve:trace_rows_dropped_total",
                               "Trace rows dropped because the ledger queue was full.",
                               registry=registry)

    def observe(self, record: TraceRecord) -> None:
        """Count one written row and its cost."""
        model = record.model or ""
        self.rows.labels(model, record.status).inc()
        if record.cost_usd is not None:
            self.cost.labels(model, "input").inc(record.input_cost_usd or 0.0)
            self.cost.labels(model, "output").inc(record.output_cost_usd or 0.0)
