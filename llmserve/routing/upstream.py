"""Talking to replicas: pick one, retry what never reached the client, hand back the response.

A request is retried on another replica when its attempt fails before the router has sent the
client a single byte: the connection could not be opened, the replica died before answering, it
answered 502/503/504, or (streaming) it died before its first chunk. The router reads the first
chunk before it commits to a response, so "not started streaming" is exactly "nothing sent".
A connection that broke after it was opened gets its replica one more attempt when no other
replica is left: replicas close idle kept-alive connections on their own clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from llmserve.routing.backends import MODEL_VERSION_HEADER, Capture, ReplicaState
from llmserve.routing.policies import Policy
from llmserve.routing.records import RequestInfo

_RETRY_STATUS = (502, 503, 504)
# Transport failures that prove the replica did not produce an answer for us. A read timeout is
# not among them: the replica may still be working, and a retry would double the wait.
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError,
             httpx.RemoteProtocolError, httpx.PoolTimeout)
# An opened connection that broke: the replica may have died, or it closed a kept-alive
# connection on its own clock just as the router reused it. The second says nothing about its
# health, so such a replica gets one more attempt (on a new connection) before it counts.
BROKEN_CONNECTION = (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)


class UpstreamError(Exception):
    """No replica produced a response; nothing was sent to the client."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Opened:
    """An upstream response the router has committed to (its replica's load stays counted)."""

    replica: ReplicaState
    response: httpx.Response
    capture: Capture
    first: bytes | None = None  # streaming: the first chunk, already read
    chunks: Any = None  # streaming: the iterator the first chunk came from
    body: bytes | None = None  # otherwise: the whole body
    released: bool = False

    def release(self) -> None:
        """Count the request as done on its replica (idempotent)."""
        if not self.released:
            self.released = True
            self.replica.outstanding -= 1
            self.replica.served += 1


def upstream_headers(info: RequestInfo, replica: ReplicaState,
                     client_headers: Mapping[str, str]) -> dict[str, str]:
    """Headers for the replica: trace context, route, prompt version and credentials."""
    headers = {"content-type": "application/json", "accept-encoding": "identity",
               "traceparent": info.trace.traceparent, "x-request-id": info.request_id,
               "x-llmserve-route": info.route}
    if info.parent_trace_id:
        headers["x-parent-trace-id"] = info.parent_trace_id
    auth = f"Bearer {replica.api_key}" if replica.api_key else client_headers.get("authorization")
    if auth:
        headers["authorization"] = auth
    if info.prompt_version:
        headers["x-prompt-version"] = info.prompt_version
    return headers


@dataclass
class Upstream:
    """Sends requests to replicas over the router's client.

    The router's live settings and its health monitor come in as callables (as they do for
    ``HealthMonitor``), so a config reload is seen at once and nothing here reaches into the
    router.
    """

    client: httpx.AsyncClient
    timeout: Callable[[], httpx.Timeout]
    max_attempts: Callable[[], int]
    report_failure: Callable[[ReplicaState, str, bool], None]  # (replica, reason, eject now)

    async def open(self, pool: tuple[Policy, list[ReplicaState]], deployment: str, body: bytes,
                   client_headers: Mapping[str, str], key: str | None, info: RequestInfo,
                   keep_text: bool = False) -> Opened:
        """Try replicas of ``deployment`` (its ``pool``: policy and replicas) until one answers.

        Raises:
            UpstreamError: no healthy replica (503), or every attempt failed (502).
        """
        policy, replicas = pool
        tried: set[str] = set()
        broke_once: set[str] = set()  # replicas whose connection broke once for this request
        again: ReplicaState | None = None
        last = "no healthy replica"
        for _ in range(self.max_attempts()):
            # Another replica first; the one whose connection just broke if none is left.
            replica = policy.pick(replicas, key, tried) or again
            again = None
            if replica is None:
                break
            tried.add(replica.url)
            replica.outstanding += 1
            headers = upstream_headers(info, replica, client_headers)
            try:
                return await self._attempt(replica, body, headers, info, keep_text)
            except RETRYABLE as exc:
                replica.outstanding -= 1
                last = f"{replica.url}: {type(exc).__name__}"
                if isinstance(exc, BROKEN_CONNECTION) and replica.url not in broke_once:
                    broke_once.add(replica.url)
                    again = replica
                else:
                    self.report_failure(replica, last, isinstance(exc, httpx.ConnectError))
            except UpstreamError as exc:
                replica.outstanding -= 1
                last = f"{replica.url}: {exc.message}"
            except BaseException:
                replica.outstanding -= 1
                raise
        if not tried:
            raise UpstreamError(503, f"no healthy replica for deployment {deployment!r}",
                                "no_healthy_replica")
        raise UpstreamError(502, f"every attempt failed for deployment {deployment!r} ({last})",
                            "upstream_unreachable")

    async def _attempt(self, replica: ReplicaState, body: bytes, headers: dict[str, str],
                       info: RequestInfo, keep_text: bool) -> Opened:
        req = self.client.build_request("POST", replica.url + info.endpoint, content=body,
                                        headers=headers, timeout=self.timeout())
        resp = await self.client.send(req, stream=True)
        try:
            cap = Capture(start=info.start, streaming=info.stream, keep_text=keep_text,
                          status_code=resp.status_code,
                          model_version=resp.headers.get(MODEL_VERSION_HEADER))
            if resp.status_code in _RETRY_STATUS:
                await resp.aread()
                raise UpstreamError(502, f"replica answered HTTP {resp.status_code}",
                                    "upstream_error")
            is_sse = resp.headers.get("content-type", "").startswith("text/event-stream")
            if info.stream and resp.status_code == 200 and is_sse:
                chunks = resp.aiter_raw()
                first = await anext(chunks, b"")
                return Opened(replica, resp, cap, first=first, chunks=chunks)
            data = await resp.aread()
            await resp.aclose()
            return Opened(replica, resp, cap, body=data)
        except BaseException:
            await resp.aclose()
            raise


async def read_all(opened: Opened) -> tuple[str, str | None]:
    """Read a response to its end into its capture; returns (status, error_type)."""
    cap = opened.capture
    try:
        if opened.body is not None:
            cap.feed_body(opened.body)
        else:
            if opened.first:
                cap.feed_stream(opened.first)
            async for chunk in opened.chunks:
                cap.feed_stream(chunk)
    except httpx.HTTPError:
        return "error", "upstream_disconnected"
    finally:
        cap.end = time.perf_counter()
        await opened.response.aclose()
    if opened.response.status_code >= 400 or cap.error_type:
        return "error", cap.error_type or f"http_{opened.response.status_code}"
    return "ok", None
