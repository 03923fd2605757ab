"""End to end on loopback: two real `llmserve serve` processes with different checkpoints as
versions behind one router (canary, shadow, gate, replica death and automatic rollback)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
from routing_helpers import model_config, router_config, running_router

from llmserve.cli import main

PROMPT = [{"role": "user", "content": "tell me a story"}]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two llmserve servers, checkpoints of different seeds, both serving the name "chat"."""
    from llmserve.models.random_checkpoint import build_random_checkpoint
    from llmserve.models.version import compute_model_version

    root = tmp_path_factory.mktemp("e2e")
    procs, out = [], []
    try:
        for seed in (1, 2):
            ckpt = build_random_checkpoint(root / f"ckpt-{seed}", "llama", seed=seed)
            port = _free_port()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "llmserve.cli", "serve", "--model", str(ckpt), "--port",
                 str(port), "--served-model-name", "chat", "--trace-db", str(root / f"s{seed}.db"),
                 "--num-kv-blocks", "128", "--max-num-seqs", "16", "--max-model-len", "256",
                 "--log-level", "warning"], env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            out.append((procs[-1], f"http://127.0.0.1:{port}", compute_model_version(ckpt)))
        deadline = time.monotonic() + 120
        for proc, url, _ in out:
            while True:
                assert proc.poll() is None, "llmserve serve exited during start-up"
                assert time.monotonic() < deadline, "llmserve serve did not come up"
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
        yield out
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def _config(servers, **model) -> dict:
    (_, u1, mv1), (_, u2, mv2) = servers
    cfg = model_config({"v1": [u1], "v2": [u2]}, "v1", **model)
    cfg["deployments"]["v1"]["model_version"] = mv1
    cfg["deployments"]["v2"]["model_version"] = mv2
    return cfg


def _ask(user: str, stream: bool = False) -> dict:
    return {"model": "chat", "messages": PROMPT, "max_tokens": 3, "temperature": 0,
            "user": user, "stream": stream, "metadata": {"prompt_version": "story-v1"}}


async def test_canary_share_sticky_users_and_shadow_never_returned(servers, tmp_path, capsys):
    cfg = router_config({"chat": _config(servers, canary={"deployment": "v2", "weight": 20},
                                         shadow={"deployment": "v2", "percent": 10})},
                        trace_db="router.db")
    async with running_router(cfg, tmp_path) as (router, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            pinned = {}
            for v in ("v1", "v2"):
                r = await client.post("/v1/chat/completions", json=_ask("probe"),
                                      headers={"x-llmserve-version": v})
                pinned[v] = r.json()["choices"][0]["message"]["content"]
            assert pinned["v1"] != pinned["v2"], "the two checkpoints should answer differently"
            sem = asyncio.Semaphore(8)

            async def one(i: int) -> tuple[str, str]:
                async with sem:
                    r = await client.post("/v1/chat/completions", json=_ask(f"user-{i}"))
                assert r.status_code == 200, r.text
                return r.headers["x-llmserve-version"], r.json()["choices"][0]["message"]["content"]

            first = await asyncio.gather(*(one(i) for i in range(400)))
            share = sum(v == "v2" for v, _ in first) / 400
            assert 0.15 <= share <= 0.25, share
            # Shadow answers (from v2) are never what a primary-cohort client receives.
            assert all(text == pinned[v] for v, text in first)
            again = await asyncio.gather(*(one(i) for i in range(0, 400, 8)))
            assert [v for v, _ in again] == [v for v, _ in first[::8]]
        await router.models["chat"].mirror.drain()
        router.recorder.flush()
    conn = sqlite3.connect(tmp_path / "router.db")
    routes = dict(conn.execute("SELECT route, count(*) FROM traces GROUP BY route").fetchall())
    shadows = routes.get("shadow", 0)
    assert shadows > 0 and routes["canary"] > 0 and routes["primary"] > 0
    comps = conn.execute("SELECT exact_match, shadow_model_version FROM router_shadow_comparisons"
                         ).fetchall()
    assert len(comps) == shadows and {c[0] for c in comps} == {0}
    assert {c[1] for c in comps} == {servers[1][2]}
    code = main(["gate", "--trace-db", str(tmp_path / "router.db"), "--baseline", "v1",
                 "--candidate", "v2", "--format", "json"])
    decision = json.loads(capsys.readouterr().out)
    assert decision["owner"] == "v2-team@example.com" and decision["auditable"] is True
    # v2 answers differently from v1 on every shadowed request: the gate must not promote it.
    assert code != 0 and decision["action"] != "promote"


async def test_killed_canary_replica_loses_no_request_and_is_rolled_back(servers, tmp_path):
    watchdog = {"window_s": 60, "interval_s": 0.2,
                "rules": {"min_samples_rollback": 5, "min_baseline_samples": 5}}
    cfg = router_config({"chat": _config(servers, canary={"deployment": "v2", "weight": 50},
                                         watchdog=watchdog)})
    async with running_router(cfg, tmp_path) as (router, url):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            sem = asyncio.Semaphore(8)
            done = 0

            async def one(i: int) -> httpx.Response:
                nonlocal done
                async with sem:
                    reply = await client.post("/v1/chat/completions",
                                              json=_ask(f"k{i}", i % 3 == 0))
                done += 1
                return reply

            jobs = [asyncio.create_task(one(i)) for i in range(80)]
            # Kill by progress, not after a fixed time: fast servers can answer all 80 before a
            # timer fires, and then the canary never fails.
            for _ in range(600):
                if done >= 10:
                    break
                await asyncio.sleep(0.01)
            servers[1][0].kill()  # the canary's only replica dies mid-run
            replies = await asyncio.gather(*jobs)
            # Non-streamed requests and streams that had not started are retried elsewhere;
            # only a stream already flowing from the dead replica may end with an error event.
            for i, r in enumerate(replies):
                assert r.status_code == 200, r.text
                if i % 3 != 0:
                    assert r.json()["choices"][0]["message"]["content"] is not None
            for _ in range(100):
                if router.models["chat"].canary_weight == 0:
                    break
                await asyncio.sleep(0.05)
            assert router.models["chat"].canary_weight == 0
            later = await asyncio.gather(*(one(i) for i in range(100, 120)))
            assert {r.headers["x-llmserve-version"] for r in later} == {"v1"}
    [event] = router.events.recent(kind="rollback")
    assert event["actor"] == "watchdog" and event["owner"] == "v2-team@example.com"
