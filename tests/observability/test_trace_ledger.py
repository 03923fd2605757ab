"""The SQLite trace ledger: WAL mode, writer thread, bounded queue, commit futures, queries."""

from __future__ import annotations

import io
import json
import sqlite3
import threading

import pytest

from llmserve.observability.ledger import (
    TraceLedger,
    TraceRecord,
    default_trace_db_path,
    export_jsonl,
    find_row,
    query_rows,
)


def _record(i: int, **kw) -> TraceRecord:
    return TraceRecord(trace_id=f"{i:032x}", request_id=f"req-{i}", start_time=1000.0 + i, **kw)


def test_committed_row_is_visible_to_another_connection_in_wal_mode(tmp_path):
    db = tmp_path / "t.db"
    with TraceLedger(db) as ledger:
        row_id = ledger.submit(_record(1, model="m", prompt_tokens=5, extra={"k": "v"})).result(10)
        conn = sqlite3.connect(db)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT request_id, prompt_tokens FROM traces WHERE id = ?",
                            (row_id,)).fetchone() == ("req-1", 5)
        conn.close()
    row = find_row(db, request_id="req-1")
    assert row["extra"] == {"k": "v"} and row["model"] == "m" and row["cost_partial"] is False


async def test_async_write_resolves_after_commit(tmp_path):
    db = tmp_path / "t.db"
    with TraceLedger(db) as ledger:
        await ledger.write(_record(2, status="aborted", cost_partial=True))
        assert find_row(db, trace_id=f"{2:032x}")["status"] == "aborted"


def test_rows_from_many_threads_are_all_written_once(tmp_path):
    db = tmp_path / "t.db"
    with TraceLedger(db, max_queue=64) as ledger:
        def produce(base: int) -> None:
            for i in range(50):
                ledger.submit(_record(base + i), timeout=10)

        threads = [threading.Thread(target=produce, args=(k * 1000,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        ledger.flush()
        assert ledger.rows_written == 200
    ids = [r["request_id"] for r in query_rows(db)]
    assert len(ids) == len(set(ids)) == 200


def test_full_queue_refuses_instead_of_growing_without_bound(tmp_path):
    db = tmp_path / "t.db"
    ledger = TraceLedger(db, max_queue=2)
    blocker = sqlite3.connect(db, timeout=30)
    blocker.execute("BEGIN IMMEDIATE")  # the writer thread now waits on the database lock
    futures = []
    with pytest.raises(RuntimeError, match="queue full"):
        for i in range(10):
            futures.append(ledger.submit(_record(i), timeout=0.05))
    blocker.rollback()
    blocker.close()
    ledger.flush()
    assert all(f.done() for f in futures)
    ledger.close()
    assert len(query_rows(db)) == len(futures)


def test_query_time_range_is_half_open_and_jsonl_export_matches(tmp_path):
    db = tmp_path / "t.db"
    with TraceLedger(db) as ledger:
        for i in range(5):
            ledger.submit(_record(i))
    rows = query_rows(db, since=1001.0, until=1003.0)
    assert [r["request_id"] for r in rows] == ["req-1", "req-2"]
    out = io.StringIO()
    assert export_jsonl(db, out, since=1001.0) == 4
    first = json.loads(out.getvalue().splitlines()[0])
    assert first["request_id"] == "req-1" and first["start_time"] == 1001.0


def test_user_hash_key_is_stable_for_one_ledger_and_differs_between_ledgers(tmp_path):
    with TraceLedger(tmp_path / "a.db") as a:
        key = a.user_hash_key
    with TraceLedger(tmp_path / "a.db") as again, TraceLedger(tmp_path / "b.db") as b:
        assert again.user_hash_key == key
        assert b.user_hash_key != key
        assert len(key) == 32


def test_bad_status_and_missing_database_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="status must be one of"):
        _record(1, status="weird")
    with pytest.raises(ValueError, match="no trace ledger"):
        query_rows(tmp_path / "missing.db")


def test_database_with_another_schema_version_is_refused(tmp_path):
    db = tmp_path / "t.db"
    TraceLedger(db).close()
    conn = sqlite3.connect(db)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema version 99"):
        TraceLedger(db)


def test_default_path_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LLMSERVE_TRACE_DB", str(tmp_path / "x.db"))
    assert default_trace_db_path() == str(tmp_path / "x.db")
    monkeypatch.delenv("LLMSERVE_TRACE_DB")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_trace_db_path() == str(tmp_path / "llmserve" / "traces.db")
