"""Errors an AsyncEngine raises to its callers (re-exported by `async_engine`)."""

from __future__ import annotations


class QueueFullError(RuntimeError):
    """Raised by `add_request` when `max_queued_requests` requests are already waiting."""

    def __init__(self, num_waiting: int, limit: int, retry_after: float = 1.0) -> None:
        super().__init__(
            f"server overloaded: {num_waiting} requests waiting (limit {limit}); retry later"
        )
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The step loop died (or was stopped); no request can be served any more."""
