"""Accounts.settle: the one settling of a finished router request, client or shadow."""

from __future__ import annotations

import time

import httpx
import pytest

from llmserve.observability.cost import price_record
from llmserve.observability.ledger import TraceRecord, query_rows
from llmserve.observability.pricing import ListPrice
from llmserve.observability.tracing import context_from_headers
from llmserve.routing.accounting import Accounts
from llmserve.routing.backends import Capture, ReplicaState
from llmserve.routing.config import Deployment
from llmserve.routing.records import RequestInfo, RouterRecorder
from llmserve.routing.upstream import Opened
from llmserve.routing.watchdog import SampleWindow

PRICE = ListPrice(input_per_1m=2.0, output_per_1m=8.0, cached_input_per_1m=0.5)
DEP = Deployment("v1", "team-a", (), model_version="mv1", pricing=PRICE)


def _info(route: str = "primary") -> RequestInfo:
    return RequestInfo(trace=context_from_headers({}), request_id=f"req-{route}",
                       start_wall=time.time(), start=time.perf_counter(), endpoint="/v1/completions",
                       model="chat", user=None, prompt_version="p1", stream=False, route=route)


def _opened(replica: ReplicaState, status: int = 200) -> Opened:
    cap = Capture(start=time.perf_counter(), streaming=False, status_code=status, end=time.perf_counter(),
                  prompt_tokens=1000, cached_tokens=400, completion_tokens=100)
    replica.outstanding += 1
    return Opened(replica, httpx.Response(status), cap, body=b"{}")


@pytest.fixture
def accounts(tmp_path):
    acc = Accounts(RouterRecorder(str(tmp_path / "t.db")), SampleWindow())
    yield acc
    acc.recorder.close()


def test_settle_releases_counts_prices_records_and_samples(accounts):
    replica = ReplicaState("http://r1")
    record, cap = accounts.settle(_info(), _opened(replica), DEP, "ok", None, watched=True)
    assert (replica.outstanding, replica.served) == (0, 1)
    assert accounts.counts == {("chat", "v1", "primary", "ok"): 1}
    # The server's pricing rule: 600 uncached at $2/M, 400 cached at $0.5/M, 100 out at $8/M.
    assert record.cost_usd == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    assert record.cost_mode == "list" and record.cost_partial is False
    assert record.extra == {"deployment": "v1", "owner": "team-a"}
    (sample,) = accounts.window.recent("chat", "v1", 60)
    assert sample.cost_usd == record.cost_usd and sample.owner == "team-a"
    accounts.recorder.flush()
    (row,) = query_rows(accounts.recorder.path)
    assert row["request_id"] == "req-primary" and row["cost_usd"] == pytest.approx(record.cost_usd)


def test_a_shadow_or_unanswered_request_is_settled_the_same_way_without_a_sample(accounts):
    accounts.settle(_info("shadow"), None, DEP, "error", "no_healthy_replica", watched=False)
    assert accounts.counts == {("chat", "v1", "shadow", "error"): 1}
    assert accounts.window.recent("chat", "v1", 60) == []
    accounts.recorder.flush()
    (row,) = query_rows(accounts.recorder.path)
    assert (row["route"], row["error_type"], row["cost_partial"]) == ("shadow", "no_healthy_replica", True)


def test_router_and_server_rows_share_one_pricing_rule():
    record = TraceRecord(trace_id="a" * 32, request_id="r", start_time=0.0, status="aborted",
                         prompt_tokens=1000, cached_tokens=400, completion_tokens=100)
    price_record(record, PRICE)
    assert record.cost_partial is True and record.hardware_seconds is None
    assert record.cost_usd == pytest.approx((600 * 2 + 400 * 0.5 + 100 * 8) / 1e6)
    unpriced = TraceRecord(trace_id="b" * 32, request_id="s", start_time=0.0)
    price_record(unpriced, None)
    assert unpriced.cost_usd is None and unpriced.cost_mode is None
