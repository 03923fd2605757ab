"""Config reload (admin endpoint, SIGHUP) keeps in-flight requests; CLI admin commands."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import yaml
from fake_openai_backend import Behaviour
from routing_helpers import backends, model_config, router_config, running_router

from llmserve.cli import main


def _body(i: int) -> dict:
    return {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": f"u{i}"}


def _write(path, cfg: dict) -> None:
    path.write_text(yaml.safe_dump(cfg))


async def _until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def test_admin_reload_keeps_in_flight_requests_and_applies_new_routing(tmp_path, admin):
    slow = Behaviour("v1", latency=0.8, text="old")
    async with backends(slow, Behaviour("v2", text="new")) as (u1, u2):
        path = tmp_path / "router.yaml"
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1")})
        _write(path, cfg)
        async with running_router(cfg, tmp_path, config_path=str(path)) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                inflight = [asyncio.create_task(client.post("/v1/chat/completions", json=_body(i)))
                            for i in range(10)]
                assert await _until(lambda: len(slow.received) == 10)
                cfg["models"]["chat"]["primary"] = "v2"
                _write(path, cfg)
                r = await client.post("/admin/reload", headers=admin, json={})
                assert r.status_code == 200 and r.json()["models"]["chat"]["primary"] == "v2"
                fresh = await client.post("/v1/chat/completions", json=_body(99))
                assert fresh.json()["choices"][0]["message"]["content"] == "new"
                old = await asyncio.gather(*inflight)
                assert [r.status_code for r in old] == [200] * 10
                assert {r.json()["choices"][0]["message"]["content"] for r in old} == {"old"}
                path.write_text("models: {chat: {primary: nope}}\n")
                r = await client.post("/admin/reload", headers=admin, json={})
                assert r.status_code == 400 and "deployments" in r.json()["error"]["message"]
                assert router.models["chat"].primary == "v2"  # the running config stays


async def test_rollback_survives_a_reload_until_the_file_changes_that_model(tmp_path, admin):
    async with backends(Behaviour("v1"), Behaviour("v2"), Behaviour("v1")) as (u1, u2, u1b):
        path = tmp_path / "router.yaml"
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 30})})
        _write(path, cfg)
        async with running_router(cfg, tmp_path, config_path=str(path)) as (router, url):
            router.rollback("chat", reason="test")
            cfg["models"]["chat"]["deployments"]["v1"]["replicas"].append(u1b)  # replicas only
            _write(path, cfg)
            router.reload()
            assert router.models["chat"].canary_weight == 0
            assert len(router.models["chat"].replicas["v1"]) == 2
            cfg["models"]["chat"]["canary"]["weight"] = 10  # the operator edits the routing
            _write(path, cfg)
            router.reload()
            assert router.models["chat"].canary_weight == 10
            assert [e["kind"] for e in router.events.recent()][-3:] == [
                "reload", "override_cleared", "reload"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_sighup_reload_in_a_real_router_process_and_cli_admin(tmp_path):
    slow = Behaviour("v1", latency=1.0, text="old")
    async with backends(slow, Behaviour("v2", text="new")) as (u1, u2):
        path = tmp_path / "router.yaml"
        port = _free_port()
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 0})},
                            port=port, events_file="events.jsonl")
        _write(path, cfg)
        proc = subprocess.Popen([sys.executable, "-m", "llmserve.cli", "router", "--config",
                                 str(path), "--log-level", "warning"],
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                for _ in range(200):
                    try:
                        if (await client.get("/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.05)
                inflight = [asyncio.create_task(client.post("/v1/chat/completions", json=_body(i)))
                            for i in range(8)]
                assert await _until(lambda: len(slow.received) == 8)
                cfg["models"]["chat"]["primary"] = "v2"
                cfg["models"]["chat"]["canary"]["deployment"] = "v1"
                _write(path, cfg)
                proc.send_signal(signal.SIGHUP)
                old = await asyncio.gather(*inflight)
                assert [r.status_code for r in old] == [200] * 8
                assert await _until(lambda: "reload" in (tmp_path / "events.jsonl").read_text()
                                    if (tmp_path / "events.jsonl").exists() else False)
                fresh = await client.post("/v1/chat/completions", json=_body(99))
                assert fresh.json()["choices"][0]["message"]["content"] == "new"
            code = await asyncio.to_thread(main, ["router", "--config", str(path), "promote",
                                                  "--model", "chat", "--reason", "gate passed"])
            assert code == 0
            code = await asyncio.to_thread(main, ["router", "--config", str(path), "rollback",
                                                  "--model", "chat"])
            assert code == 1  # nothing left to roll back after the promotion
            events = [json.loads(x) for x in (tmp_path / "events.jsonl").read_text().splitlines()]
            promote = [e for e in events if e["kind"] == "promote"]
            assert promote and promote[0]["actor"] == "cli" and promote[0]["deployment"] == "v1"
            assert promote[0]["owner"] == "v1-team@example.com"
        finally:
            proc.terminate()
            proc.wait(10)
