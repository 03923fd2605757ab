"""Routing events: promotions, rollbacks, weight changes, reloads, ejections.

Each event names the deployment's owner and why it happened. Events go to the log, to a bounded
in-memory list (``GET /admin/events``), to an optional JSON-lines file, and to the
``router_events`` table of the trace DB when one is configured.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

log = logging.getLogger("llmserve.router")
KINDS = ("promote", "rollback", "weight", "reload", "eject", "readmit", "override_cleared",
         "watchdog_error")


class EventLog:
    """Append-only record of what the router decided and who owns it."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None = None,
                 path: str | None = None, keep: int = 1000) -> None:
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._sink = sink  # e.g. the router's ledger writer (router_events table)
        self.path = path

    def record(self, kind: str, *, model: str | None = None, deployment: str | None = None,
               owner: str | None = None, actor: str = "router", reason: str = "",
               **detail: Any) -> dict[str, Any]:
        """Record one event and return it."""
        if kind not in KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        event = {"ts": time.time(), "kind": kind, "model": model, "deployment": deployment,
                 "owner": owner, "actor": actor, "reason": reason, "detail": detail}
        self._recent.append(event)
        level = logging.WARNING if kind in ("rollback", "eject", "watchdog_error") else logging.INFO
        log.log(level, "%s model=%s deployment=%s owner=%s actor=%s: %s", kind, model, deployment,
                owner or "UNKNOWN", actor, reason)
        if self.path:
            try:
                with open(self.path, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(event, sort_keys=True) + "\n")
            except OSError as exc:  # an unwritable log must not take routing down
                log.error("cannot append to events file %s: %s", self.path, exc)
        if self._sink is not None:
            self._sink(event)
        return event

    def recent(self, limit: int = 100, kind: str | None = None) -> list[dict[str, Any]]:
        events = [e for e in self._recent if kind is None or e["kind"] == kind]
        return events[-limit:] if limit > 0 else []
