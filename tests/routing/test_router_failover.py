"""Replica failures: retries before the first byte, ejection and readmission by health checks."""

from __future__ import annotations

import asyncio
import json

import httpx
from fake_openai_backend import Behaviour
from routing_helpers import backends, model_config, router_config, running_router, spawn_backend


def _body(i: int, stream: bool = False) -> dict:
    return {"model": "chat", "messages": [{"role": "user", "content": f"q{i}"}], "stream": stream}


def _complete(resp: httpx.Response, stream: bool) -> bool:
    if resp.status_code != 200:
        return False
    if not stream:
        return resp.json()["choices"][0]["message"]["content"] == "hello from v1"
    return resp.text.rstrip().endswith("data: [DONE]") and '"error"' not in resp.text


async def test_killing_a_replica_mid_run_loses_no_request_that_had_not_started_streaming(tmp_path):
    procs = [spawn_backend("v1", latency=0.4) for _ in range(2)]
    try:
        urls = [u for _, u in procs]
        cfg = router_config({"chat": model_config({"v1": urls}, "v1", policy="round_robin")},
                            health={"interval_s": 5, "unhealthy_threshold": 1})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                for i in range(4):  # warm both replicas up
                    assert (await client.post("/v1/chat/completions", json=_body(i))).status_code == 200
                jobs = [asyncio.create_task(client.post("/v1/chat/completions", json=_body(i, i % 2 == 0)))
                        for i in range(30)]
                await asyncio.sleep(0.15)  # every request is now waiting on a replica
                procs[0][0].kill()
                replies = await asyncio.gather(*jobs)
                lost = [i for i, r in enumerate(replies) if not _complete(r, i % 2 == 0)]
                assert lost == [], [replies[i].text for i in lost]
                after = await asyncio.gather(*(client.post("/v1/chat/completions", json=_body(i))
                                               for i in range(10)))
                assert all(_complete(r, False) for r in after)
            dead = router.registry.get(urls[0], None)
            assert not dead.healthy and dead.outstanding == 0
            assert router.registry.get(urls[1], None).outstanding == 0
            assert [e["detail"]["url"] for e in router.events.recent(kind="eject")] == [urls[0]]
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()


async def test_failing_health_check_ejects_and_recovery_readmits(tmp_path):
    sick = Behaviour("v1", health_status=500)
    async with backends(sick, Behaviour("v1")) as (u_sick, u_ok):
        cfg = router_config({"chat": model_config({"v1": [u_sick, u_ok]}, "v1", policy="round_robin")})
        async with running_router(cfg, tmp_path) as (router, url):
            state = router.registry.get(u_sick, None)
            for _ in range(50):
                if not state.healthy:
                    break
                await asyncio.sleep(0.05)
            assert not state.healthy
            async with httpx.AsyncClient(base_url=url) as client:
                before = len(sick.received)
                for i in range(6):
                    assert (await client.post("/v1/chat/completions", json=_body(i))).status_code == 200
                assert len(sick.received) == before  # no traffic to an ejected replica
                sick.health_status = 200
                for _ in range(50):
                    if state.healthy:
                        break
                    await asyncio.sleep(0.05)
                assert state.healthy
                for i in range(6):
                    await client.post("/v1/chat/completions", json=_body(i))
                assert len(sick.received) == before + 3  # round robin includes it again
        kinds = [e["kind"] for e in router.events.recent()]
        assert kinds.index("eject") < kinds.index("readmit")


async def test_unreachable_then_ejected_replica_gives_error_envelopes(tmp_path):
    cfg = router_config({"chat": model_config({"v1": ["http://127.0.0.1:9"]}, "v1")},
                        health={"interval_s": 30})
    async with running_router(cfg, tmp_path) as (router, url):
        async with httpx.AsyncClient(base_url=url) as client:
            # The first request races the startup probe: either it finds the port closed
            # itself (502) or the probe already ejected the replica (503).
            r = await client.post("/v1/chat/completions", json=_body(0))
            assert (r.status_code, r.json()["error"]["code"]) in {
                (502, "upstream_unreachable"), (503, "no_healthy_replica")}
            r = await client.post("/v1/chat/completions", json=_body(1))
            assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_replica"
            assert r.json()["error"]["type"] == "server_error" and r.headers["x-trace-id"]


async def test_client_leaving_mid_stream_frees_the_replica_and_records_an_abort(tmp_path):
    slow = Behaviour("v1", text=" ".join(["w"] * 20), token_delay=0.1)
    async with backends(slow) as (u1,):
        cfg = router_config({"chat": model_config({"v1": [u1]}, "v1")})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                async with client.stream("POST", "/v1/chat/completions",
                                         json=_body(0, stream=True)) as resp:
                    async for _ in resp.aiter_raw():
                        break  # read one chunk, then hang up
            replica = router.registry.get(u1, None)
            for _ in range(100):
                if replica.outstanding == 0 and router.accounts.counts:
                    break
                await asyncio.sleep(0.02)
            assert replica.outstanding == 0
            assert router.accounts.counts[("chat", "v1", "primary", "aborted")] == 1


async def _replica_that_drops_its_first_request() -> tuple[asyncio.Server, list[str]]:
    """A minimal HTTP replica: it closes the connection of the first POST without answering
    (as a replica closing a kept-alive connection the router reuses does), then answers."""
    seen: list[str] = []
    answer = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "chat",
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "hello from v1"}}]}).encode()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n") if not reader.at_eof() else b""
            if not head:
                break
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            method = head.split(b" ", 1)[0].decode()
            seen.append(method)
            if method == "POST" and seen.count("POST") == 1:
                break  # hang up with nothing written
            body = answer if method == "POST" else b"{}"
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


async def test_a_broken_connection_to_the_only_replica_is_tried_once_more_and_does_not_eject(tmp_path):
    server, seen = await _replica_that_drops_its_first_request()
    port = server.sockets[0].getsockname()[1]
    async with server:
        replica_url = f"http://127.0.0.1:{port}"
        cfg = router_config({"chat": model_config({"v1": [replica_url]}, "v1")},
                            health={"interval_s": 30, "unhealthy_threshold": 1})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                r = await client.post("/v1/chat/completions", json=_body(0))
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == "hello from v1"
            assert seen.count("POST") == 2
            replica = router.registry.get(replica_url, None)
            assert replica.healthy and replica.outstanding == 0
            assert router.events.recent(kind="eject") == []
