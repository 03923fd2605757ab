"""Request accounting: the one place a finished router request is settled.

Client requests (``proxy.py``) and shadow replays (``shadow_replay.py``) both end here: the
replica's load is released, the request is counted for /metrics, its trace row goes to the
ledger and, for a model with a live-canary watchdog, a sample joins the watchdog's window.
"""

from __future__ import annotations

import time
from collections import Counter

from llmserve.observability.ledger import TraceRecord
from llmserve.routing.backends import Capture
from llmserve.routing.config import Deployment
from llmserve.routing.gate import TraceSample
from llmserve.routing.records import RequestInfo, RouterRecorder, build_record
from llmserve.routing.upstream import Opened
from llmserve.routing.watchdog import SampleWindow


def sample_of(record: TraceRecord) -> TraceSample:
    """What the watchdog keeps of a trace row."""
    return TraceSample(
        status=record.status, error_type=record.error_type, ttft=record.ttft, tpot=record.tpot,
        e2e_latency=record.e2e_latency, prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, cost_usd=record.cost_usd,
        model_version=record.model_version, prompt_version=record.prompt_version,
        owner=record.extra.get("owner"))


class Accounts:
    """Counters by (model, deployment, route, status), and the settling of finished requests."""

    def __init__(self, recorder: RouterRecorder, window: SampleWindow) -> None:
        self.recorder = recorder
        self.window = window
        self.counts: Counter[tuple[str, str, str, str]] = Counter()

    def settle(self, info: RequestInfo, opened: Opened | None, dep: Deployment, status: str,
               error_type: str | None, *, watched: bool) -> tuple[TraceRecord, Capture]:
        """Account for one finished request; returns its trace row and what was captured.

        ``opened`` is None when no replica answered; ``watched`` adds a watchdog sample.
        """
        if opened is not None:
            opened.release()
            cap = opened.capture
        else:
            cap = Capture(start=info.start, streaming=info.stream, end=time.perf_counter())
        record = build_record(info, cap, dep, status, error_type, self.recorder.user_key)
        self.counts[(info.model, dep.name, info.route, status)] += 1
        self.recorder.trace(record)
        if watched:
            self.window.add(info.model, dep.name, sample_of(record))
        return record, cap

    def canary_failed(self, model: str, deployment: str, error_type: str) -> None:
        """A canary attempt failed and its user was served by the primary: the watchdog still
        counts the failure against the canary."""
        self.window.add(model, deployment, TraceSample(status="error", error_type=error_type))
