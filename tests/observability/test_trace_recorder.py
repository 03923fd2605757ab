"""TraceRecorder driven by synthetic engine hooks: cost, stale steps, shutdown rows."""

from __future__ import annotations

import pytest

from llmserve.engine.llm_engine import StepStats
from llmserve.observability.ledger import TraceLedger, query_rows
from llmserve.observability.pricing import parse_pricing
from llmserve.observability.recorder import TraceRecorder
from llmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


def _output(rid: str, finish: str, n_tokens: int, arrival: float, end: float) -> RequestOutput:
    metrics = RequestMetrics(arrival, arrival, arrival + 0.1, end, end)
    return RequestOutput(rid, None, [1, 2, 3, 4], [CompletionOutput(0, "x" * n_tokens,
                         list(range(n_tokens)), finish_reason=finish)], True, num_cached_tokens=0,
                         metrics=metrics, num_computed_prefill_tokens=4,
                         num_computed_decode_tokens=n_tokens)


def _finish(rec: TraceRecorder, out: RequestOutput, end: float) -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": len(out.outputs[0].token_ids),
             "total_tokens": 0, "cached_tokens": 0}
    timings = {"arrival_time": out.metrics.arrival_time, "finished_time": end, "ttft": 0.1,
               "queue_time": 0.0, "e2e": end - out.metrics.arrival_time}
    rec.on_finished(out, usage, timings)


@pytest.fixture
def recorder(tmp_path):
    pricing = parse_pricing({"models": {"m": {"mode": "hardware", "usd_per_hour": 3600.0}}})
    rec = TraceRecorder(TraceLedger(tmp_path / "t.db"), model_name="m", pricing=pricing)
    yield rec
    rec.ledger.close()


def test_a_repeated_step_object_is_counted_once(recorder):
    recorder.on_request_added("a", {"arrival_time": 0.0, "model": "m"})
    step = StepStats(0.0, 1.0, {"a": (4, 0)})
    recorder.on_step(step)
    recorder.on_step(step)  # the engine re-reports last_step after an empty step
    _finish(recorder, _output("a", "length", 3, 0.0, 1.0), 1.0)
    recorder.ledger.flush()
    (row,) = query_rows(recorder.ledger.path)
    assert row["hardware_seconds"] == pytest.approx(1.0)
    assert row["cost_usd"] == pytest.approx(1.0)  # $3600/h for one second
    assert row["tpot"] == pytest.approx((1.0 - 0.1) / 2)


def test_aborted_request_is_flagged_and_pays_for_its_compute(recorder):
    recorder.on_request_added("a", {"arrival_time": 0.0, "model": "m", "user": "u1"})
    recorder.on_request_added("b", {"arrival_time": 0.0, "model": "m"})
    recorder.on_step(StepStats(0.0, 2.0, {"a": (4, 0), "b": (4, 0)}))
    _finish(recorder, _output("b", "abort", 0, 0.0, 2.0), 2.0)
    _finish(recorder, _output("a", "stop", 1, 0.0, 2.0), 2.0)
    recorder.ledger.flush()
    rows = {r["request_id"]: r for r in query_rows(recorder.ledger.path)}
    assert rows["b"]["status"] == "aborted" and rows["b"]["cost_partial"] is True
    assert rows["b"]["cost_usd"] == pytest.approx(1.0)
    assert rows["a"]["status"] == "ok" and rows["a"]["cost_partial"] is False
    assert rows["a"]["user_hash"] and rows["a"]["user_hash"] != "u1"


def test_requests_unfinished_at_shutdown_get_error_rows(tmp_path):
    rec = TraceRecorder(TraceLedger(tmp_path / "t.db"), model_name="m")
    rec.on_request_added("a", {"arrival_time": 0.0, "model": "m", "prompt_token_ids": [1, 2, 3]})
    rec.on_step(StepStats(0.0, 0.5, {"a": (3, 0)}))
    rec.close()
    (row,) = query_rows(tmp_path / "t.db")
    assert row["status"] == "error" and row["error_type"] == "EngineStopped"
    assert row["prompt_tokens"] == 3 and row["hardware_seconds"] >= 0.5
    assert row["cost_partial"] is True
