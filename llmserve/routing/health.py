"""Health checks: eject replicas that fail, readmit them once they answer again.

Two signals feed one state machine per replica:

- active probes (``GET <url><path>`` every ``interval_s``): ``unhealthy_threshold`` failures in a
  row eject, ``healthy_threshold`` successes in a row readmit;
- passive reports from the proxy: a connection that cannot even be opened ejects at once, since
  waiting for the next probe would send more requests into a dead socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import httpx

from llmserve.routing.backends import ReplicaState
from llmserve.routing.config import HealthConfig

log = logging.getLogger("llmserve.router")


class HealthMonitor:
    """Owns the probe loop and the eject/readmit decisions."""

    def __init__(self, client: httpx.AsyncClient, replicas: Callable[[], list[ReplicaState]],
                 config: HealthConfig, on_change: Callable[[ReplicaState, str], None]) -> None:
        self._client = client
        self._replicas = replicas
        self.config = config
        self._on_change = on_change  # (replica, "eject" | "readmit") -> records an event
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await self.probe_all()
            await asyncio.sleep(self.config.interval_s)

    async def probe_all(self) -> None:
        """Probe every replica once, concurrently."""
        replicas = self._replicas()
        if replicas:
            await asyncio.gather(*(self._probe(r) for r in replicas))

    async def _probe(self, replica: ReplicaState) -> None:
        headers = {"authorization": f"Bearer {replica.api_key}"} if replica.api_key else None
        try:
            resp = await self._client.get(replica.url + self.config.path, headers=headers,
                                          timeout=self.config.timeout_s)
            ok = resp.status_code < 500
            reason = f"health check answered HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            ok, reason = False, f"health check failed: {type(exc).__name__}"
        if ok:
            self.success(replica)
        else:
            self.failure(replica, reason)

    def success(self, replica: ReplicaState) -> None:
        replica.consecutive_failures = 0
        replica.consecutive_successes += 1
        if not replica.healthy and replica.consecutive_successes >= self.config.healthy_threshold:
            replica.healthy = True
            replica.last_error = None
            log.info("readmitted replica %s", replica.url)
            self._on_change(replica, "readmit")

    def failure(self, replica: ReplicaState, reason: str, immediate: bool = False) -> None:
        """Count a failure; eject at the threshold, or at once for a refused connection."""
        replica.consecutive_successes = 0
        replica.consecutive_failures += 1
        replica.last_error = reason
        if replica.healthy and (immediate or
                                replica.consecutive_failures >= self.config.unhealthy_threshold):
            replica.healthy = False
            log.warning("ejected replica %s: %s", replica.url, reason)
            self._on_change(replica, "eject")
