"""Replica selection policies, canary buckets, SSE capture and config validation."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from llmserve.routing.backends import Capture, ReplicaState
from llmserve.routing.canary import assign, in_canary
from llmserve.routing.config import load_config, parse_config
from llmserve.routing.policies import (
    HashRing,
    LeastOutstanding,
    PrefixAffinity,
    RoundRobin,
    Session,
    prompt_text,
    routing_key,
)
from llmserve.routing.shadow import token_agreement

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _replicas(n: int) -> list[ReplicaState]:
    return [ReplicaState(url=f"http://r{i}") for i in range(n)]


def test_round_robin_cycles_healthy_replicas_and_skips_excluded():
    reps = _replicas(3)
    reps[1].healthy = False
    rr = RoundRobin()
    assert [rr.pick(reps, None, set()).url for _ in range(4)] == ["http://r0", "http://r2"] * 2
    assert rr.pick(reps, None, {"http://r0", "http://r2"}) is None


def test_least_outstanding_prefers_the_less_loaded_of_two():
    reps = _replicas(2)
    reps[0].outstanding = 5
    p2c = LeastOutstanding(random.Random(0))
    assert {p2c.pick(reps, None, set()).url for _ in range(20)} == {"http://r1"}
    reps = _replicas(8)
    for i, r in enumerate(reps):
        r.outstanding = i
    picks = Counter(p2c.pick(reps, None, set()).url for _ in range(2000))
    assert picks["http://r7"] == 0  # the most loaded replica never wins a pair
    assert picks["http://r0"] > picks["http://r6"]


def test_prefix_affinity_keeps_a_prefix_on_one_replica_and_moves_few_keys_on_removal():
    reps = _replicas(4)
    pol = PrefixAffinity()
    keys = [f"system prompt {i % 50}" for i in range(500)]
    first = {k: pol.pick(reps, k, set()).url for k in keys}
    assert all(pol.pick(reps, k, set()).url == first[k] for k in keys)
    assert len(set(first.values())) == 4
    reps[2].healthy = False
    moved = [k for k in keys if pol.pick(reps, k, set()).url != first[k]]
    assert moved and all(first[k] == "http://r2" for k in moved)  # only r2's keys move


def test_hash_ring_spreads_keys_roughly_evenly():
    ring = HashRing([f"http://r{i}" for i in range(4)])
    share = Counter(next(ring.walk(f"key-{i}")) for i in range(4000))
    assert all(600 < n < 1400 for n in share.values()), share


def test_session_policy_keys_on_user_and_prefix_on_prompt_head():
    body = {"model": "m", "user": "alice", "messages": [{"role": "system", "content": "x" * 500},
                                                        {"role": "user", "content": "q"}]}
    assert routing_key("session", body, 10) == "alice"
    assert routing_key("prefix_affinity", body, 10) == "system\nxxx"
    assert routing_key("round_robin", body, 10) is None
    assert prompt_text({"prompt": ["abcdef"]}, 3) == "abc"
    reps = _replicas(3)
    pol = Session()
    assert len({pol.pick(reps, "alice", set()).url for _ in range(10)}) == 1


def test_canary_assignment_is_sticky_monotone_in_weight_and_pinnable():
    users = [f"u{i}" for i in range(2000)]
    at10 = {u for u in users if in_canary("m", "v2", 10, u)}
    at20 = {u for u in users if in_canary("m", "v2", 20, u)}
    assert at10 <= at20  # raising the weight only adds users
    assert 0.17 < len(at20) / 2000 < 0.23
    assert not in_canary("m", "v2", 0, "u1") and in_canary("m", "v2", 100, "u1")
    assert assign("m", "v1", "v2", 0, "u1", "v2", {"v1", "v2"}) == ("v2", "canary")
    with pytest.raises(ValueError, match="unknown deployment"):
        assign("m", "v1", "v2", 0, "u1", "v3", {"v1", "v2"})


def test_capture_parses_split_sse_events_and_usage():
    cap = Capture(start=0.0, streaming=True, keep_text=True)
    stream = (b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n'
              b'data: {"choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}\n\n'
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\ndata: [DONE]\n\n')
    for i in range(0, len(stream), 7):  # events arrive cut at arbitrary points
        cap.feed_stream(stream[i:i + 7])
    assert cap.text == "Hello" and cap.finish_reason == "stop"
    assert (cap.prompt_tokens, cap.output_tokens, cap.token_events) == (3, 2, 2)
    assert cap.ttft is not None and cap.tpot is not None


def test_token_agreement_is_positional():
    assert token_agreement("a b c", "a b c") == 1.0
    assert token_agreement("a b c", "a x c") == pytest.approx(2 / 3)
    assert token_agreement("a b", "a b c d") == 0.5
    assert token_agreement("", "") == 1.0


def _cfg(**model) -> dict:
    base = {"primary": "v1", "deployments": {"v1": {"owner": "o", "replicas": ["http://a:1/v1/"]}}}
    return {"models": {"m": {**base, **model}}}


def test_config_validation_names_the_bad_path():
    cfg = parse_config(_cfg())
    assert cfg.models["m"].deployments["v1"].replicas[0].url == "http://a:1"
    cases = [
        (_cfg(polcy="round_robin"), "unknown key"),
        (_cfg(policy="random"), "policy"),
        (_cfg(primary="v9"), "unknown deployment 'v9'"),
        (_cfg(canary={"deployment": "v1", "weight": 5}), "must differ"),
        (_cfg(canary={"deployment": "v1", "weight": 500}), "weight"),
        (_cfg(shadow={"deployment": "v1", "percent": "all"}), "percent"),
        ({"models": {}}, "empty"),
        ({"models": {"m": {"primary": "v1", "deployments": {"v1": {"replicas": ["ftp://x"]}}}}},
         "http://"),
    ]
    for data, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_config(data)


def test_example_router_config_loads(monkeypatch):
    monkeypatch.setenv("LLMSERVE_ROUTER_ADMIN_TOKEN", "t")
    monkeypatch.setenv("LLMSERVE_BACKEND_KEY", "k")
    cfg = load_config(EXAMPLES / "router.yaml")
    chat = cfg.models["chat"]
    assert chat.canary and chat.shadow and chat.watchdog and cfg.admin_token == "t"
    assert all(d.owner for d in chat.deployments.values())
