"""An AsyncEngine's observers: registry, safe calls, and what one delivered output means for them.

The hooks and their arguments are documented on `AsyncEngine`; everything here runs on the event
loop thread of the request concerned.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmserve.engine.request_stream import RequestStream
    from llmserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

HOOKS = ("on_request_added", "on_first_token", "on_token", "on_finished", "on_step")


class Hooks:
    """Observer methods by hook name; a hook that raises is logged and otherwise ignored."""

    def __init__(self) -> None:
        self._fns: dict[str, list] = {name: [] for name in HOOKS}

    def add(self, observer: object) -> None:
        """Register every `on_*` method of `observer` named in HOOKS."""
        for name in HOOKS:
            fn = getattr(observer, name, None)
            if callable(fn):
                self._fns[name].append(fn)

    def wanted(self, name: str) -> bool:
        """Whether any observer has hook `name` (to skip building its arguments)."""
        return bool(self._fns[name])

    def call(self, name: str, *args: Any) -> None:
        for fn in self._fns[name]:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - an observer must never break serving
                logger.exception("observer hook %s failed", name)

    def observe(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        """Call the token and finish hooks for `out`, about to be handed to `stream`'s
        consumer at `now`; updates the stream's token timing."""
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new = num_tokens - stream.num_tokens_seen
        if new > 0:
            if stream.first_token_time is None:
                stream.first_token_time = now
                self.call("on_first_token", stream.request_id, now - stream.arrival_time)
            elif self._fns["on_token"]:
                self.call("on_token", stream.request_id, new, now - stream.last_token_time)
            stream.last_token_time = now
            stream.num_tokens_seen = num_tokens
        if out.finished and self._fns["on_finished"]:
            self.call("on_finished", out, usage(out), timings(stream, out, now))


def usage(out: RequestOutput) -> dict:
    """OpenAI-style token usage of a final output (with the prefix-cache hit)."""
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "cached_tokens": out.num_cached_tokens}


def timings(stream: RequestStream, out: RequestOutput, now: float) -> dict:
    """A finished request's latencies in seconds, as `on_finished` reports them."""
    arrival = stream.arrival_time
    metrics = out.metrics
    scheduled = metrics.first_scheduled_time if metrics is not None else None
    first = stream.first_token_time
    return {
        "arrival_time": arrival,
        "first_scheduled_time": scheduled,
        "first_token_time": first,
        "finished_time": now,
        "queue_time": None if scheduled is None else max(0.0, scheduled - arrival),
        "ttft": None if first is None else first - arrival,
        "e2e": now - arrival,
    }
