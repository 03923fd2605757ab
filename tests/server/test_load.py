"""Disconnects free everything; overload is refused fast with 429 while admitted work finishes."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from live_server import live_server, validate

CHAT = [{"role": "user", "content": "Tell me a long story"}]


async def _wait_until(condition, timeout: float = 15.0, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(poll)


async def _stream_then_drop(client: httpx.AsyncClient, index: int) -> int:
    body = {"messages": CHAT, "max_tokens": 300, "ignore_eos": True, "stream": True,
            "temperature": 1.0, "seed": index}
    seen = 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                seen += 1
            if seen >= 3:
                break  # leaving the block closes the connection mid-stream
    return seen


async def test_disconnect_storm_frees_kv_cache_and_server_recovers(server):
    aborted = server.metric("llmserve:request_success_total", finished_reason="abort")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60,
                                 limits=httpx.Limits(max_connections=100)) as client:
        seen = await asyncio.gather(*(_stream_then_drop(client, i) for i in range(50)))
        assert all(s >= 3 for s in seen)
        await _wait_until(lambda: server.engine.num_unfinished == 0)
        await _wait_until(lambda: server.metric("llmserve:kv_cache_usage_perc") == 0.0)
        # Freed because they were aborted, not because they ran to the end.
        assert server.metric("llmserve:request_success_total",
                             finished_reason="abort") == aborted + 50
        assert server.metric("llmserve:num_requests_running") == 0
        response = await client.post("/v1/chat/completions",
                                     json={"messages": CHAT, "max_tokens": 4})
        assert response.status_code == 200
        validate("CreateChatCompletionResponse", response.json())


async def test_non_streaming_client_disconnect_aborts_its_request(server):
    before = server.metric("llmserve:request_success_total", finished_reason="abort")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        # The client leaves as soon as the engine runs the request, not after a fixed time: a
        # fast engine could otherwise finish all 480 tokens before the server saw it leave.
        post = asyncio.create_task(client.post(
            "/v1/completions", json={"prompt": "Hello", "max_tokens": 480, "ignore_eos": True}))
        await _wait_until(lambda: server.engine.num_unfinished == 1, poll=0.002)
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await post
    await _wait_until(lambda: server.metric("llmserve:request_success_total",
                                            finished_reason="abort") == before + 1)
    await _wait_until(lambda: server.engine.num_unfinished == 0)


async def _timed_chat(client: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
    start = time.monotonic()
    response = await client.post("/v1/chat/completions", json={
        "messages": CHAT, "max_tokens": 48, "ignore_eos": True})
    return response.status_code, time.monotonic() - start, response


async def test_overload_rejects_excess_requests_fast_with_429(checkpoint):
    with live_server(checkpoint, max_queued_requests=2, max_num_seqs=2) as live:
        async with httpx.AsyncClient(base_url=live.base_url, timeout=120) as client:
            results = await asyncio.gather(*(_timed_chat(client) for _ in range(16)))
        statuses = [status for status, _, _ in results]
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 2 and statuses.count(429) >= 6, statuses
        slowest_ok = max(t for s, t, _ in results if s == 200)
        for status, elapsed, response in results:
            if status == 429:
                assert int(response.headers["retry-after"]) >= 1
                body = response.json()
                validate("ErrorResponse", body)
                assert body["error"]["type"] == "rate_limit_error"
                assert elapsed < min(1.0, slowest_ok)
            else:
                assert response.json()["usage"]["completion_tokens"] == 48
