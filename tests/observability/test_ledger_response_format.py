"""The ledger's response_format and num_tool_calls columns: recording, migration, report split."""

from __future__ import annotations

import json
import sqlite3

import pytest

from llmserve.cli import main as cli_main
from llmserve.observability.ledger import TraceLedger, TraceRecord, query_rows
from llmserve.observability.ledger_schema import COLUMNS, Table
from llmserve.observability.recorder import TraceRecorder
from llmserve.observability.report import aggregate, render_csv
from llmserve.outputs import CompletionOutput, RequestOutput

NEW = ("response_format", "num_tool_calls")


def _output(rid: str, *texts: str) -> RequestOutput:
    outs = [CompletionOutput(i, t, [1, 2], finish_reason="stop") for i, t in enumerate(texts)]
    return RequestOutput(rid, None, [1, 2, 3], outs, True, num_cached_tokens=0)


def _finish(rec: TraceRecorder, out: RequestOutput) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2 * len(out.outputs), "total_tokens": 0,
             "cached_tokens": 0}
    rec.on_finished(out, usage, {"arrival_time": 0.0, "finished_time": 1.0, "e2e": 1.0})


def test_recorder_stores_the_format_and_counts_tool_calls_in_every_completion(tmp_path):
    rec = TraceRecorder(TraceLedger(tmp_path / "t.db"), model_name="m")
    counted: list[str] = []

    def counter(text: str) -> int:
        counted.append(text)
        return text.count("<tool_call>")

    rec.on_request_added("tools", {"arrival_time": 0.0, "response_format": "tools_required",
                                   "tool_call_counter": counter})
    rec.on_request_added("plain", {"arrival_time": 0.0})
    rec.on_request_added("broken", {"arrival_time": 0.0, "response_format": "json_schema",
                                    "tool_call_counter": lambda text: 1 / 0})
    _finish(rec, _output("tools", "<tool_call>a</tool_call><tool_call>b</tool_call>",
                         "<tool_call>c</tool_call>"))
    _finish(rec, _output("plain", "hello"))
    _finish(rec, _output("broken", "{}"))
    rec.close()
    rows = {r["request_id"]: r for r in query_rows(tmp_path / "t.db")}
    assert counted == ["<tool_call>a</tool_call><tool_call>b</tool_call>", "<tool_call>c</tool_call>"]
    assert (rows["tools"]["response_format"], rows["tools"]["num_tool_calls"]) == ("tools_required", 3)
    assert (rows["plain"]["response_format"], rows["plain"]["num_tool_calls"]) == (None, 0)
    # A counter that raises costs the count, never the billing row.
    assert rows["broken"]["status"] == "ok" and rows["broken"]["num_tool_calls"] is None
    assert rows["broken"]["response_format"] == "json_schema"


def test_an_older_ledger_file_gains_the_new_columns_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.db"
    with TraceLedger(db) as ledger:
        ledger.submit(TraceRecord(trace_id="a" * 32, request_id="old", start_time=1.0)).result(10)
    conn = sqlite3.connect(db)  # rebuild the table as an older llmserve wrote it
    old_cols = [c for c in COLUMNS if c not in NEW]
    conn.executescript(f"""
        CREATE TABLE t2 AS SELECT id, {', '.join(old_cols)} FROM traces;
        DROP TABLE traces; ALTER TABLE t2 RENAME TO traces;""")
    conn.close()
    with TraceLedger(db) as ledger:
        ledger.submit(TraceRecord(trace_id="b" * 32, request_id="new", start_time=2.0,
                                  response_format="json_object", num_tool_calls=0)).result(10)
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(traces)")}
    assert set(NEW) <= cols
    old, new = query_rows(db)
    assert (old["request_id"], old["response_format"], old["num_tool_calls"]) == ("old", None, None)
    assert (new["request_id"], new["response_format"]) == ("new", "json_object")


def test_other_tables_share_the_single_writer_and_must_be_declared(tmp_path):
    notes = Table("notes", "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)",
                  ("body",))
    with TraceLedger(tmp_path / "t.db", tables=[notes]) as ledger:
        assert ledger.submit_row("notes", {"body": "hi"}).result(10) == 1
        trace = ledger.submit(TraceRecord(trace_id="c" * 32, request_id="r", start_time=1.0))
        assert trace.result(10) == 1 and ledger.rows_written == 1
        with pytest.raises(ValueError, match="not declared"):
            ledger.submit_row("router_events", {"kind": "x"})
        with pytest.raises(ValueError, match="not declared"):
            ledger.submit_row("traces", {"trace_id": "x"})
    conn = sqlite3.connect(tmp_path / "t.db")
    assert conn.execute("SELECT body FROM notes").fetchall() == [("hi",)]


def _rows() -> list[dict]:
    # (response_format, cost, prompt, completion, tool calls)
    fixed = [("text", 0.002, 100, 10, 0), ("json_schema", 0.004, 200, 20, 0),
             ("json_schema", 0.006, 300, 30, 0), ("tools_required", 0.01, 400, 40, 2),
             (None, 0.001, 50, 5, None)]
    return [{"request_id": f"r{i}", "start_time": 1714521600.0 + i, "status": "ok",
             "model": "m", "response_format": fmt, "cost_usd": cost, "input_cost_usd": cost / 2,
             "output_cost_usd": cost / 2, "prompt_tokens": p, "completion_tokens": c,
             "num_tool_calls": calls} for i, (fmt, cost, p, c, calls) in enumerate(fixed)]


def test_report_splits_cost_by_response_format():
    report = aggregate(_rows(), ["response_format"])
    groups = {g["response_format"]: g for g in report["groups"]}
    assert list(groups) == ["json_schema", "text", "tools_required", None]  # missing last
    assert groups["json_schema"]["requests"] == 2
    assert groups["json_schema"]["total_cost_usd"] == pytest.approx(0.01)
    assert groups["json_schema"]["cost_per_1m_blended"] == pytest.approx(0.01 / 550 * 1e6)
    assert groups["tools_required"]["tool_calls"] == 2 and report["total"]["tool_calls"] == 2
    header = render_csv(report).splitlines()[0].split(",")
    assert header[0] == "response_format" and "tool_calls" in header


def test_report_command_groups_by_response_format(tmp_path):
    db = tmp_path / "t.db"
    with TraceLedger(db) as ledger:
        for i, fmt in enumerate(["text", "regex", "regex"]):
            ledger.submit(TraceRecord(trace_id=f"{i:032x}", request_id=f"r{i}",
                                      start_time=1714521600.0 + i, response_format=fmt,
                                      cost_usd=1.0, num_tool_calls=0))
    out = tmp_path / "r.json"
    argv = ["report", "--trace-db", str(db), "--by", "model,response_format", "--format", "json",
            "-o", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert [(g["response_format"], g["requests"]) for g in data["groups"]] == [("regex", 2),
                                                                               ("text", 1)]
