"""The live canary watchdog rolls a failing candidate back by itself, naming owner and rule."""

from __future__ import annotations

import asyncio

import httpx
from fake_openai_backend import Behaviour
from routing_helpers import backends, model_config, router_config, running_router

WATCHDOG = {"window_s": 30, "interval_s": 0.1,
            "rules": {"min_samples": 10, "min_samples_rollback": 8, "min_baseline_samples": 8}}


async def _wave(client: httpx.AsyncClient, start: int, n: int) -> list[httpx.Response]:
    return await asyncio.gather(*(client.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "user": f"user-{i}"})
        for i in range(start, start + n)))


async def test_candidate_that_starts_failing_is_rolled_back_automatically(tmp_path):
    canary = Behaviour("v2")
    async with backends(Behaviour("v1"), canary) as (u1, u2):
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 50},
                                                  watchdog=WATCHDOG)})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                replies = await _wave(client, 0, 40)
                assert all(r.status_code == 200 for r in replies)
                await asyncio.sleep(0.3)  # a few watchdog rounds over a healthy canary
                assert router.models["chat"].canary_weight == 50
                assert router.watchdog.last_decisions["chat"].action != "rollback"

                canary.fail = True
                replies = await _wave(client, 40, 60)
                assert any(r.status_code == 500 for r in replies)
                for _ in range(50):
                    if router.models["chat"].canary_weight == 0:
                        break
                    await asyncio.sleep(0.05)
                assert router.models["chat"].canary_weight == 0
                replies = await _wave(client, 100, 30)
                assert {r.headers["x-llmserve-version"] for r in replies} == {"v1"}
                assert all(r.status_code == 200 for r in replies)
        [event] = router.events.recent(kind="rollback")
        assert event["actor"] == "watchdog" and event["owner"] == "v2-team@example.com"
        assert "error_rate" in event["reason"]
        assert event["detail"]["evidence"]["action"] == "rollback"


async def test_dead_canary_falls_back_to_primary_and_is_rolled_back(tmp_path):
    async with backends(Behaviour("v1")) as (u1,):
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": ["http://127.0.0.1:9"]}, "v1",
                                                  canary={"deployment": "v2", "weight": 50},
                                                  watchdog=WATCHDOG)})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                replies = await _wave(client, 0, 60)
                # Users of the canary cohort are served by the primary instead of failing.
                assert all(r.status_code == 200 for r in replies)
                assert {r.headers["x-llmserve-version"] for r in replies} == {"v1"}
                for _ in range(50):
                    if router.models["chat"].canary_weight == 0:
                        break
                    await asyncio.sleep(0.05)
                assert router.models["chat"].canary_weight == 0
