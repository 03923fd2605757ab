"""Replaying a shadow job: send the primary's request to the shadow deployment, settle it and
record how its answer compares with the primary's.

The router builds one ``ShadowReplay`` and hands it the live models, its upstream, its accounts
and the ledger's comparison writer; each model's ``ShadowMirror`` calls it for every job.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from llmserve.observability.tracing import TraceContext, new_span_id
from llmserve.routing.accounting import Accounts
from llmserve.routing.records import RequestInfo
from llmserve.routing.shadow import ShadowJob, compare
from llmserve.routing.state import ModelState
from llmserve.routing.upstream import Opened, Upstream, UpstreamError, read_all


class ShadowReplay:
    """Runs shadow jobs against the deployments of the router's current generation."""

    def __init__(self, models: Callable[[], Mapping[str, ModelState]], upstream: Upstream,
                 accounts: Accounts,
                 save_comparison: Callable[[dict[str, Any]], Awaitable[Any] | None]) -> None:
        self._models = models
        self._upstream = upstream
        self._accounts = accounts
        self._save_comparison = save_comparison

    async def __call__(self, job: ShadowJob) -> None:
        """Replay ``job``; record its trace row and the comparison with the primary."""
        state = self._models().get(job.model)
        if state is None or job.deployment not in state.route.deployments:
            return  # a reload removed the shadow since the job was queued
        info = _shadow_info(job)
        opened: Opened | None = None
        try:
            opened = await self._upstream.open(state.pool(job.deployment), job.deployment,
                                               job.body, {}, None, info, keep_text=True)
            status, error_type = await read_all(opened)
        except UpstreamError as exc:
            status, error_type = "error", exc.code
        except BaseException:
            if opened is not None:
                opened.release()
            raise
        record, cap = self._accounts.settle(info, opened, state.deployment(job.deployment),
                                            status, error_type, watched=False)
        pending = self._save_comparison(compare(job, record, cap.text))
        if pending is not None:
            await pending


def _shadow_info(job: ShadowJob) -> RequestInfo:
    """The shadow request: same trace, a span of its own whose parent is the primary's span."""
    primary, src = job.primary, job.info
    trace = TraceContext(trace_id=primary.trace_id, span_id=new_span_id(),
                         parent_span_id=primary.span_id)
    return RequestInfo(trace=trace, request_id=f"{primary.request_id}-shadow",
                       start_wall=time.time(), start=time.perf_counter(), endpoint=src.endpoint,
                       model=job.model, user=src.user, prompt_version=src.prompt_version,
                       stream=src.stream, route="shadow", parent_trace_id=primary.trace_id)
