"""Canary cohorts through a real router on loopback: share, stickiness, pinning, admin."""

from __future__ import annotations

import asyncio
import sqlite3

import httpx
from fake_openai_backend import Behaviour
from routing_helpers import backends, model_config, router_config, running_router


def _chat(user: str | None = None, **extra) -> dict:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], **extra}
    if user is not None:
        body["user"] = user
    return body


async def test_20_percent_canary_lands_within_15_to_25_percent_and_is_sticky(tmp_path):
    async with backends(Behaviour("v1", text="one"), Behaviour("v2", text="two")) as (u1, u2):
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 20})})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                sem = asyncio.Semaphore(16)

                async def ask(i: int) -> str:
                    async with sem:
                        r = await client.post("/v1/chat/completions", json=_chat(f"user-{i}"))
                    assert r.status_code == 200, r.text
                    assert r.json()["choices"][0]["message"]["content"] == (
                        "two" if r.headers["x-llmserve-version"] == "v2" else "one")
                    return r.headers["x-llmserve-version"]

                first = await asyncio.gather(*(ask(i) for i in range(400)))
                share = first.count("v2") / 400
                assert 0.15 <= share <= 0.25, share
                again = await asyncio.gather(*(ask(i) for i in range(0, 400, 4)))
                assert again == first[::4]  # every user stays in its cohort


async def test_pin_header_overrides_cohort_and_unknown_pin_is_a_400(tmp_path):
    async with backends(Behaviour("v1"), Behaviour("v2")) as (u1, u2):
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 0})})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/v1/chat/completions", json=_chat("u"),
                                      headers={"x-llmserve-version": "v2"})
                assert r.headers["x-llmserve-version"] == "v2"
                assert r.headers["x-llmserve-route"] == "canary"
                r = await client.post("/v1/chat/completions", json=_chat("u"),
                                      headers={"x-llmserve-version": "v9"})
                assert r.status_code == 400
                assert "v9" in r.json()["error"]["message"]


async def test_admin_promote_and_rollback_need_the_token_and_are_recorded_with_owner(tmp_path, admin):
    async with backends(Behaviour("v1"), Behaviour("v2")) as (u1, u2):
        cfg = router_config({"chat": model_config({"v1": [u1], "v2": [u2]}, "v1",
                                                  canary={"deployment": "v2", "weight": 50})},
                            events_file="events.jsonl", trace_db="traces.db")
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/admin/rollback", json={"model": "chat"})
                assert r.status_code == 401
                r = await client.post("/admin/rollback", json={"model": "chat", "reason": "bad"},
                                      headers=admin)
                assert r.status_code == 200 and r.json()["owner"] == "v2-team@example.com"
                users = [f"u{i}" for i in range(40)]
                served = [(await client.post("/v1/chat/completions", json=_chat(u))).headers[
                    "x-llmserve-version"] for u in users]
                assert set(served) == {"v1"}
                r = await client.post("/admin/promote", json={"model": "chat"}, headers=admin)
                assert r.status_code == 200, r.text
                assert r.json()["deployment"] == "v2" and r.json()["owner"] == "v2-team@example.com"
                served = [(await client.post("/v1/chat/completions", json=_chat(u))).headers[
                    "x-llmserve-version"] for u in users]
                assert set(served) == {"v2"}
                r = await client.post("/admin/promote", json={"model": "chat"}, headers=admin)
                assert r.status_code == 400  # no canary left to promote
                events = (await client.get("/admin/events", headers=admin)).json()["events"]
            router.recorder.flush()
        kinds = [e["kind"] for e in events]
        assert kinds == ["rollback", "promote"]
        lines = (tmp_path / "events.jsonl").read_text().splitlines()
        assert len(lines) == 2 and '"owner": "v2-team@example.com"' in lines[0]
        conn = sqlite3.connect(tmp_path / "traces.db")
        rows = conn.execute("SELECT kind, deployment, owner, actor FROM router_events").fetchall()
        assert rows == [("rollback", "v2", "v2-team@example.com", "admin"),
                        ("promote", "v2", "v2-team@example.com", "admin")]
        routes = dict(conn.execute("SELECT route, count(*) FROM traces GROUP BY route").fetchall())
        assert routes == {"primary": 80}  # after the rollback nobody was sent to the canary


async def test_unknown_model_and_bad_json_get_the_openai_error_envelope(tmp_path):
    async with backends(Behaviour("v1")) as (u1,):
        cfg = router_config({"chat": model_config({"v1": [u1]}, "v1")})
        async with running_router(cfg, tmp_path) as (router, url):
            async with httpx.AsyncClient(base_url=url) as client:
                r = await client.post("/v1/chat/completions", json={"model": "nope", "messages": []})
                assert r.status_code == 404
                assert set(r.json()["error"]) == {"message", "type", "param", "code"}
                r = await client.post("/v1/chat/completions", content=b"{not json")
                assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
                models = (await client.get("/v1/models")).json()
                assert [m["id"] for m in models["data"]] == ["chat"]
