"""The trace ledger behind the OpenAI server: rows, headers, prompt versions, cost, metrics."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx
import pytest
from ledger_server import traced_server

from llmserve.models.version import compute_model_version
from llmserve.observability.ledger import find_row, query_rows

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
USD_PER_HOUR = 36.0


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("traced")
    pricing = tmp / "pricing.toml"
    pricing.write_text(f'[models."*"]\nmode = "hardware"\nusd_per_hour = {USD_PER_HOUR}\n')
    # The engine in its own process, as `llmserve serve` runs it: step stats and outputs cross
    # the process boundary before they are priced.
    with traced_server(tiny_checkpoint, tmp / "t.db", pricing=str(pricing),
                       engine_process=True) as live:
        yield live


def _chat(server, headers=None, **body):
    payload = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hello there"}],
               "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(server.base_url + "/v1/chat/completions", json=payload,
                      headers=headers or {}, timeout=60)


def test_row_is_committed_before_the_response_completes(server, tiny_checkpoint):
    resp = _chat(server, headers={"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
                                  "X-Prompt-Version": "greeting-v2"}, user="alice@example.com")
    assert resp.status_code == 200
    assert resp.headers["x-trace-id"] == TRACE
    assert resp.headers["traceparent"].startswith(f"00-{TRACE}-")
    row = find_row(server.db, request_id=resp.json()["id"])  # no flush: already durable
    assert row is not None and row["trace_id"] == TRACE
    assert row["parent_span_id"] == "00f067aa0ba902b7"
    assert row["span_id"] == resp.headers["traceparent"].split("-")[2]
    usage = resp.json()["usage"]
    assert (row["prompt_tokens"], row["completion_tokens"]) == (usage["prompt_tokens"],
                                                                usage["completion_tokens"])
    assert row["prompt_version"] == "greeting-v2"
    assert row["status"] == "ok" and row["finish_reason"] in ("stop", "length")
    assert row["model"] == "tiny-llama" and row["endpoint"] == "/v1/chat/completions"
    assert row["model_version"] == compute_model_version(tiny_checkpoint)
    assert row["chat_template_hash"] == server.engine.tokenizer.chat_template_hash
    assert row["user_hash"] and "alice" not in row["user_hash"] and len(row["user_hash"]) == 32
    assert row["prompt_text"] is None and row["completion_text"] is None
    assert row["cost_mode"] == "hardware" and row["cost_usd"] > 0
    assert row["ttft"] > 0 and row["e2e_latency"] >= row["ttft"]
    raw = sqlite3.connect(server.db).execute("SELECT * FROM traces").fetchall()
    assert "alice@example.com" not in json.dumps(raw)


def test_metadata_prompt_version_wins_over_the_header(server):
    resp = httpx.post(server.base_url + "/v1/completions", timeout=60,
                      headers={"X-Prompt-Version": "from-header"},
                      json={"model": "tiny-llama", "prompt": "one two", "max_tokens": 3,
                            "metadata": {"prompt_version": "from-metadata"}})
    assert resp.status_code == 200
    row = find_row(server.db, trace_id=resp.headers["x-trace-id"])
    assert row["prompt_version"] == "from-metadata" and row["endpoint"] == "/v1/completions"
    assert row["chat_template_hash"] is None


def test_streamed_response_row_exists_when_the_stream_ends(server):
    payload = {"model": "tiny-llama", "messages": [{"role": "user", "content": "stream me"}],
               "max_tokens": 5, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", json=payload,
                      timeout=60) as resp:
        lines = [line for line in resp.iter_lines() if line.startswith("data:")]
        trace_id = resp.headers["x-trace-id"]
    assert lines[-1] == "data: [DONE]"
    row = find_row(server.db, trace_id=trace_id)
    assert row is not None and row["status"] == "ok" and row["completion_tokens"] >= 1


def test_refused_request_gets_an_error_row(server):
    resp = _chat(server, temperature=-1, user="bob", metadata={"prompt_version": "p9"})
    assert resp.status_code == 400
    row = find_row(server.db, trace_id=resp.headers["x-trace-id"])
    assert row["status"] == "error" and row["http_status"] == 400
    assert row["error_type"] and row["prompt_version"] == "p9" and row["user_hash"]
    assert row["cost_usd"] == 0.0 and row["cost_partial"] is True and row["prompt_tokens"] == 0


def test_metrics_expose_cost_counters_by_model(server):
    _chat(server)
    text = httpx.get(server.base_url + "/metrics").text
    lines = [line for line in text.splitlines()
             if line.startswith('llmserve:request_cost_usd_total{') and 'model_name="tiny-llama"' in line]
    assert {('kind="input"' in line) for line in lines} == {True, False}
    assert sum(float(line.rsplit(" ", 1)[1]) for line in lines) > 0


async def test_hardware_cost_of_concurrent_requests_sums_to_the_busy_time(server):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
        before = server.recorder.meter.busy_seconds
        start_id = max(r["id"] for r in query_rows(server.db))
        prompts = ["a", "a b c d e f g h " * 6, "one two three", "x y " * 20]
        await asyncio.gather(*(
            client.post("/v1/completions", json={"model": "tiny-llama", "prompt": p,
                                                 "max_tokens": 2 + 5 * i, "ignore_eos": True})
            for i, p in enumerate(prompts)))
    assert server.recorder.meter.num_active == 0
    rows = [r for r in query_rows(server.db) if r["id"] > start_id]
    busy = server.recorder.meter.busy_seconds - before
    assert len(rows) == 4 and len({r["completion_tokens"] for r in rows}) == 4
    assert sum(r["hardware_seconds"] for r in rows) == pytest.approx(busy, rel=1e-3)
    assert sum(r["cost_usd"] for r in rows) == pytest.approx(busy * USD_PER_HOUR / 3600, rel=1e-3)


def test_response_waits_for_a_slow_commit(server):
    ledger = server.recorder.ledger
    original = ledger._write_batch

    def slow(batch):
        import time

        time.sleep(0.5)  # a disk far behind: the response must still not end before the commit
        original(batch)

    ledger._write_batch = slow
    try:
        resp = _chat(server)
    finally:
        del ledger._write_batch
    assert resp.status_code == 200
    assert find_row(server.db, request_id=resp.json()["id"]) is not None


def test_client_disconnect_mid_stream_records_an_aborted_row_with_its_cost(server):
    payload = {"model": "tiny-llama", "prompt": "keep going", "max_tokens": 200,
               "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base_url + "/v1/completions", json=payload,
                      timeout=60) as resp:
        trace_id = resp.headers["x-trace-id"]
        for line in resp.iter_lines():
            if line.startswith("data:"):
                break  # hang up after the first chunk
    row = None
    for _ in range(200):
        row = find_row(server.db, trace_id=trace_id)
        if row is not None:
            break
        import time

        time.sleep(0.05)
    assert row is not None and row["status"] == "aborted" and row["cost_partial"] is True
    assert row["completion_tokens"] < 200 and row["cost_usd"] > 0


def test_log_prompts_stores_prompt_and_completion_text(tiny_checkpoint, tmp_path):
    with traced_server(tiny_checkpoint, tmp_path / "t.db", log_prompts=True) as live:
        resp = _chat(live)
    row = find_row(live.db, request_id=resp.json()["id"])
    assert "hello there" in row["prompt_text"]
    assert row["completion_text"] == resp.json()["choices"][0]["message"]["content"]
    assert row["cost_usd"] is None and row["cost_mode"] is None  # no pricing file: not priced


def test_each_prompt_of_a_batched_completion_gets_a_row_in_the_same_trace(server):
    resp = httpx.post(server.base_url + "/v1/completions", timeout=60,
                      json={"model": "tiny-llama", "prompt": ["first", "second one"], "max_tokens": 2})
    assert resp.status_code == 200
    trace_id = resp.headers["x-trace-id"]
    rows = [r for r in query_rows(server.db) if r["trace_id"] == trace_id]
    assert len(rows) == 2 and len({r["request_id"] for r in rows}) == 2
    assert sum(r["prompt_tokens"] for r in rows) == resp.json()["usage"]["prompt_tokens"]


def test_serve_rejects_a_bad_pricing_file_before_loading_the_model(tmp_path, capsys):
    from llmserve.cli import main as cli_main

    bad = tmp_path / "p.toml"
    bad.write_text('[models.m]\nmode = "list"\n')
    argv = ["serve", "--model", str(tmp_path / "no-such-model"), "--trace-db", str(tmp_path / "t.db")]
    assert cli_main([*argv, "--pricing", str(bad)]) == 2
    assert "missing input_per_1m" in capsys.readouterr().err
    assert cli_main(["serve", "--trace-db", "off", "--log-prompts"]) == 2
    assert "need the trace ledger" in capsys.readouterr().err


def test_engine_failure_mid_request_records_an_error_row(tiny_checkpoint, tmp_path):
    with traced_server(tiny_checkpoint, tmp_path / "t.db") as live:
        inner = live.engine.engine
        real_step, calls = inner.step, []

        def failing_step():
            calls.append(1)
            if len(calls) > 2:  # after the prefill and a decode step
                raise RuntimeError("device lost")
            return real_step()

        inner.step = failing_step
        resp = httpx.post(live.base_url + "/v1/completions", timeout=60,
                          json={"model": "tiny-llama", "prompt": "go", "max_tokens": 50,
                                "ignore_eos": True})
        assert resp.status_code == 503
        row = find_row(live.db, trace_id=resp.headers["x-trace-id"])
    assert row["status"] == "error" and row["error_type"] == "RuntimeError"
    assert row["cost_partial"] is True and row["hardware_seconds"] > 0 and row["prompt_tokens"] > 0
