"""Live canary watchdog: the release gate's rules on a sliding window of the router's requests.

Every ``interval_s`` the watchdog compares the canary's requests of the last ``window_s`` seconds
with the primary's over the same window. When the gate says rollback, the canary's weight goes
to 0 and an event names the owner and the failing rules. The watchdog never promotes: promotion
is a decision for the gate on the full ledger, or for a person.

The router hands the watchdog what it needs as callables: the live models, its ``rollback``, and
where to report a failed check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from llmserve.routing.gate import ROLLBACK, Decision, TraceSample, decide
from llmserve.routing.state import ModelState

log = logging.getLogger("llmserve.router")
_MAX_SAMPLES = 50_000  # per deployment: bounds memory under heavy traffic


class SampleWindow:
    """Recent samples per (model, deployment), with their arrival time."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._data: dict[tuple[str, str], deque[tuple[float, TraceSample]]] = {}

    def add(self, model: str, deployment: str, sample: TraceSample) -> None:
        key = (model, deployment)
        dq = self._data.get(key)
        if dq is None:
            dq = self._data[key] = deque(maxlen=_MAX_SAMPLES)
        dq.append((self._clock(), sample))

    def recent(self, model: str, deployment: str, window_s: float) -> list[TraceSample]:
        dq = self._data.get((model, deployment))
        if not dq:
            return []
        cutoff = self._clock() - window_s
        while dq and dq[0][0] < cutoff:
            dq.popleft()
        return [s for _, s in dq]

    def clear(self, model: str, deployment: str) -> None:
        self._data.pop((model, deployment), None)


class CanaryWatchdog:
    """Checks every live canary on a timer and rolls back broken ones."""

    def __init__(self, window: SampleWindow, models: Callable[[], Mapping[str, ModelState]],
                 rollback: Callable[..., Any], on_error: Callable[[Exception], None]) -> None:
        self.window = window
        self._models = models
        self._rollback = rollback  # (model, reason=, actor=, evidence=) like Router.rollback
        self._on_error = on_error
        self._task: asyncio.Task | None = None
        self.last_decisions: dict[str, Decision] = {}

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="router-watchdog")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def _interval(self) -> float:
        intervals = [m.route.watchdog.interval_s for m in self._models().values()
                     if m.route.watchdog is not None and m.route.watchdog.enabled]
        return min(intervals, default=1.0)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            try:
                self.check_all()
            except Exception as exc:  # keep watching even if one check blows up
                log.exception("canary watchdog check failed")
                self._on_error(exc)

    def check_all(self) -> list[Decision]:
        """Evaluate every model with a live canary; roll back the broken ones."""
        out = []
        for name, state in list(self._models().items()):
            wd = state.route.watchdog
            if wd is None or not wd.enabled or state.canary is None or state.canary_weight <= 0:
                continue
            decision = decide(
                self.window.recent(name, state.primary, wd.window_s),
                self.window.recent(name, state.canary, wd.window_s),
                rules=wd.rules, baseline_name=state.primary, candidate_name=state.canary,
                owner=state.route.deployments[state.canary].owner,
            )
            self.last_decisions[name] = decision
            out.append(decision)
            if decision.action == ROLLBACK:
                reason = "live canary failed the gate: " + "; ".join(decision.reasons)
                self._rollback(name, reason=reason, actor="watchdog",
                                      evidence=decision.to_dict())
        return out
