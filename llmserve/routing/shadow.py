"""Shadow traffic: mirror a share of primary requests to another deployment, off the hot path.

After the primary response has been sent, the request is offered to a bounded queue; worker
tasks hand it to the replay the router gave the mirror (``shadow_replay.py``), which sends it to
the shadow deployment and records its trace (route ``shadow``, same trace id, the primary's span
as parent) plus the comparison with the primary's answer built here. When the queue is full the
job is dropped and counted: shadow work never waits on, or slows, a client.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from llmserve.observability.ledger import TraceRecord
from llmserve.routing.records import RequestInfo

log = logging.getLogger("llmserve.router")
_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass
class ShadowJob:
    """One primary request to replay against the shadow deployment."""

    model: str
    deployment: str
    body: bytes
    info: RequestInfo
    primary: TraceRecord
    primary_text: str


def token_agreement(a: str, b: str) -> float:
    """Share of positions where two outputs have the same word/punctuation token.

    Position-wise over the longer output, so a truncated or padded answer disagrees on its extra
    tokens. Two empty outputs agree fully.
    """
    ta, tb = _TOKEN.findall(a), _TOKEN.findall(b)
    longest = max(len(ta), len(tb))
    if longest == 0:
        return 1.0
    return sum(x == y for x, y in zip(ta, tb, strict=False)) / longest


def compare(job: ShadowJob, shadow: TraceRecord, shadow_text: str) -> dict[str, Any]:
    """The comparison row for a shadow response against its primary."""
    primary = job.primary
    ok = shadow.status == "ok"
    cost_delta = (shadow.cost_usd - primary.cost_usd
                  if shadow.cost_usd is not None and primary.cost_usd is not None else None)
    return {
        "trace_id": primary.trace_id, "created": shadow.end_time or shadow.start_time,
        "model": job.model, "primary_deployment": primary.extra.get("deployment"),
        "shadow_deployment": job.deployment, "primary_model_version": primary.model_version,
        "shadow_model_version": shadow.model_version, "shadow_status": shadow.status,
        "exact_match": int(ok and shadow_text == job.primary_text),
        "token_agreement": token_agreement(job.primary_text, shadow_text) if ok else 0.0,
        "length_delta": shadow.completion_tokens - primary.completion_tokens,
        "latency_delta": ((shadow.e2e_latency or 0.0) - (primary.e2e_latency or 0.0)),
        "cost_delta": cost_delta,
    }


class ShadowMirror:
    """A bounded queue of shadow jobs and the workers that run them."""

    def __init__(self, run: Callable[[ShadowJob], Awaitable[None]], percent: float,
                 queue_size: int, concurrency: int, rng: random.Random | None = None) -> None:
        self._run = run
        self.percent = percent
        self.queue_size, self.concurrency = queue_size, concurrency
        self._queue: asyncio.Queue[ShadowJob | None] = asyncio.Queue(maxsize=queue_size)
        self._workers: list[asyncio.Task] = []
        self._rng = rng or random.Random()
        self.offered = self.dropped = self.completed = self.failed = 0

    def sampled(self) -> bool:
        """Whether this primary request should be mirrored (``percent`` of them)."""
        return self.percent >= 100 or self._rng.random() * 100 < self.percent

    def offer(self, job: ShadowJob) -> bool:
        """Queue ``job`` without waiting; a full queue drops it (counted)."""
        if not self._workers:
            self.start()
        self.offered += 1
        try:
            self._queue.put_nowait(job)
            return True
        except asyncio.QueueFull:
            self.dropped += 1
            return False

    def start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._worker(), name=f"router-shadow-{i}")
                             for i in range(self.concurrency)]

    async def _worker(self) -> None:
        while True:
            job = await self._queue.get()
            try:
                if job is None:
                    return
                await self._run(job)
                self.completed += 1
            except asyncio.CancelledError:
                raise
            except Exception:  # a broken shadow must never take the router down
                self.failed += 1
                log.exception("shadow request to %s failed", job.deployment if job else "?")
            finally:
                self._queue.task_done()

    async def close(self, timeout: float = 5.0) -> None:
        """Let queued jobs finish (up to ``timeout``), then stop the workers."""
        if not self._workers:
            return
        for _ in self._workers:
            try:
                self._queue.put_nowait(None)
            except asyncio.QueueFull:
                break
        done, pending = await asyncio.wait(self._workers, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._workers = []

    async def drain(self) -> None:
        """Wait until every queued job has run (tests)."""
        await self._queue.join()

    def stats(self) -> dict[str, Any]:
        return {"percent": self.percent, "queued": self._queue.qsize(),
                "queue_size": self.queue_size, "offered": self.offered, "dropped": self.dropped,
                "completed": self.completed, "failed": self.failed}
