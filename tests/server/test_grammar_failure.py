"""A request whose grammar fails to compile (or times out) after it was accepted gets a clear
400 naming the cause, streamed or not; a request the server itself aborts still gets its 503."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import live_server, sse_events

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20,
        "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}


@pytest.fixture(scope="module")
def live(checkpoint):
    with live_server(checkpoint) as server:  # the engine in a thread: its backend is reachable
        backend = server.engine.engine.structured.backend
        compile_ = backend.compile

        def refuse(spec):
            raise ValueError("the backend refused this schema")

        backend.compile = refuse
        yield server
        backend.compile = compile_


def test_a_failed_compile_is_a_400_naming_the_cause(live):
    reply = httpx.post(live.api_url + "/chat/completions", json=BODY, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_grammar"
    assert "could not be compiled" in error["message"]
    assert "the backend refused this schema" in error["message"]


def test_a_streamed_failed_compile_ends_with_the_same_error_event(live):
    events = sse_events(live.api_url, "/chat/completions", {**BODY, "stream": True})
    assert events[-1] == (None, "[DONE]")
    name, data = events[-2]
    assert name == "error"
    error = json.loads(data)["error"]
    assert error["code"] == "invalid_grammar" and "could not be compiled" in error["message"]


def test_the_engine_frees_everything_after_the_failure(live):
    httpx.post(live.api_url + "/chat/completions", json=BODY, timeout=60)
    engine = live.engine.engine
    assert not engine.structured.waiting
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    free = {k: v for k, v in BODY.items() if k != "response_format"}
    reply = httpx.post(live.api_url + "/chat/completions", json=free, timeout=60)
    assert reply.status_code == 200  # the server goes on serving
