"""W3C traceparent parsing/formatting, user hashing, and gen_ai.* span attributes."""

from __future__ import annotations

import pytest

from llmserve.observability.ledger import TraceRecord
from llmserve.observability.tracing import (
    context_from_headers,
    format_traceparent,
    hash_user,
    otlp_exporter,
    parse_traceparent,
    span_attributes,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_valid_traceparent_is_continued_with_a_new_server_span():
    ctx = context_from_headers({"traceparent": f"00-{TRACE}-{PARENT}-01"})
    assert ctx.trace_id == TRACE and ctx.parent_span_id == PARENT
    assert ctx.span_id != PARENT and len(ctx.span_id) == 16
    assert ctx.traceparent == f"00-{TRACE}-{ctx.span_id}-01"


@pytest.mark.parametrize("header", [
    None, "", "garbage", f"00-{'0' * 32}-{PARENT}-01", f"00-{TRACE}-{'0' * 16}-01",
    f"ff-{TRACE}-{PARENT}-01", f"00-{TRACE.upper()}-{PARENT}-01", f"00-{TRACE}-{PARENT}-01-extra",
])
def test_invalid_traceparent_starts_a_new_trace(header):
    assert parse_traceparent(header) is None
    ctx = context_from_headers({"traceparent": header} if header is not None else {})
    assert ctx.parent_span_id is None and len(ctx.trace_id) == 32 and ctx.trace_id != "0" * 32


def test_future_traceparent_version_may_carry_extra_fields():
    assert parse_traceparent(f"01-{TRACE}-{PARENT}-00-more") == (TRACE, PARENT, "00")


def test_format_traceparent_rejects_bad_ids():
    with pytest.raises(ValueError, match="trace id"):
        format_traceparent("xyz", PARENT)
    with pytest.raises(ValueError, match="span id"):
        format_traceparent(TRACE, "0" * 16)


def test_user_hash_is_keyed_stable_and_never_the_raw_id():
    key = b"k" * 32
    h = hash_user("alice@example.com", key)
    assert h == hash_user("alice@example.com", key) and len(h) == 32
    assert "alice" not in h
    assert h != hash_user("alice@example.com", b"other-key")
    assert h != hash_user("bob", key)
    assert hash_user(None, key) is None and hash_user("", key) is None


def _row(**kw) -> TraceRecord:
    base = dict(trace_id=TRACE, span_id="1" * 16, parent_span_id=PARENT, request_id="cmpl-1",
                start_time=100.0, end_time=101.5, endpoint="/v1/chat/completions", model="tiny",
                prompt_tokens=10, cached_tokens=4, completion_tokens=7, finish_reason="stop")
    return TraceRecord(**{**base, **kw})


def test_span_attributes_use_gen_ai_semantic_names():
    attrs = span_attributes(_row(prompt_version="v3", cost_usd=0.25))
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "tiny"
    assert attrs["gen_ai.usage.input_tokens"] == 10
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
    assert attrs["llmserve.prompt_version"] == "v3"
    assert "error.type" not in attrs and None not in attrs.values()


def test_otlp_span_carries_the_rows_trace_and_span_ids():
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    memory = InMemorySpanExporter()
    exporter = otlp_exporter("http://127.0.0.1:4318", span_processor=SimpleSpanProcessor(memory))
    exporter.emit(_row(status="error", error_type="EngineDeadError"))
    (span,) = memory.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE
    assert format(span.context.span_id, "016x") == "1" * 16
    assert format(span.parent.span_id, "016x") == PARENT
    assert span.name == "chat tiny"
    assert span.attributes["error.type"] == "EngineDeadError"
    assert (span.end_time - span.start_time) == pytest.approx(1.5e9, rel=1e-6)
