"""The trace ledger: one durable SQLite row per served request.

Writes go through a bounded queue to one writer thread, so a request handler never touches the
disk; ``TraceLedger.submit`` returns a future that resolves once the row is committed, which is
how a handler makes its row durable before sending the response's last byte. The database runs
in WAL mode with ``synchronous=FULL``: a committed row survives ``kill -9`` and power loss.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from llmserve.observability.ledger_schema import (
    COLUMNS,
    TRACES,
    Table,
    TraceRecord,
    create_schema,
    row_to_dict,
)

__all__ = ["COLUMNS", "Table", "TraceLedger", "TraceRecord", "connect", "default_trace_db_path",
           "export_jsonl", "find_row", "iter_rows", "query_rows"]

_STOP = object()
_BATCH = 256  # rows per transaction at most, so one commit does not hold readers up for long


def default_trace_db_path() -> str:
    """``$LLMSERVE_TRACE_DB``, else ``$XDG_STATE_HOME/llmserve/traces.db`` (~/.local/state)."""
    explicit = os.environ.get("LLMSERVE_TRACE_DB")
    if explicit:
        return explicit
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "llmserve", "traces.db")


def connect(path: str | Path, *, readonly: bool = False,
            tables: Sequence[Table] = ()) -> sqlite3.Connection:
    """Open the ledger database (WAL, FULL sync); read-only connections never create it."""
    p = Path(path)
    if readonly:
        if not p.is_file():
            raise ValueError(f"no trace ledger at {str(p)!r} (pass --trace-db PATH)")
        conn = sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(p), timeout=30, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        create_schema(conn, tuple(tables))
    conn.row_factory = sqlite3.Row
    return conn


class TraceLedger:
    """The ledger file's only writer: a bounded queue and one writer thread.

    Trace rows come in through ``submit``/``write``; components that keep a table of their own
    in the same file (the router's shadow comparisons and events) declare it in ``tables`` and
    hand rows over with ``submit_row``, so the file never has a second writer.
    """

    def __init__(self, path: str | Path, max_queue: int = 10_000,
                 tables: Sequence[Table] = ()) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.path = str(path)
        self._tables = {t.name: t for t in (TRACES, *tables)}
        self._conn = connect(self.path, tables=tables)
        (key,) = self._conn.execute("SELECT value FROM meta WHERE key = 'user_hash_key'").fetchone()
        self.user_hash_key: bytes = bytes.fromhex(key)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._closed = False
        self.rows_written = 0
        self.write_errors = 0
        self._thread = threading.Thread(target=self._run, name="trace-ledger-writer", daemon=True)
        self._thread.start()

    # --- producer side ---

    def submit(self, record: TraceRecord, timeout: float | None = 5.0) -> concurrent.futures.Future:
        """Queue ``record``; the returned future resolves (to the row id) once it is committed.

        Blocks only when the queue is full (the disk is far behind), for at most ``timeout``.
        """
        return self._put(TRACES, record.to_row(), timeout)

    def submit_row(self, table: str, row: dict[str, Any],
                   timeout: float | None = 5.0) -> concurrent.futures.Future:
        """Queue a row for a table declared in ``tables``; same contract as ``submit``."""
        if table not in self._tables or table == TRACES.name:
            raise ValueError(f"table {table!r} was not declared when this ledger was opened")
        return self._put(self._tables[table], row, timeout)

    def _put(self, table: Table, row: dict[str, Any],
             timeout: float | None) -> concurrent.futures.Future:
        if self._closed:
            raise RuntimeError("the trace ledger is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put((table, row, future), timeout=timeout)
        except queue.Full:
            raise RuntimeError(f"trace ledger queue full ({self._queue.maxsize} rows behind)") from None
        return future

    async def write(self, record: TraceRecord, timeout: float = 30.0) -> int:
        """Queue ``record`` and wait, without blocking the event loop, until it is committed."""
        try:
            future = self.submit(record, timeout=0)
        except RuntimeError:
            if self._closed:
                raise
            future = await asyncio.to_thread(self.submit, record, timeout)  # queue full: wait off-loop
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Block until every row queued so far is committed."""
        if self._closed:
            return
        marker: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((None, None, marker), timeout=timeout)
        marker.result(timeout=timeout)

    def close(self, timeout: float | None = 30.0) -> None:
        """Commit what is queued, stop the writer and close the database."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._conn.close()

    def __enter__(self) -> TraceLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- writer thread ---

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            self._write_batch([item for item in batch if item is not _STOP])
            if stop:
                return

    def _write_batch(self, batch: list[tuple[Table | None, dict | None,
                                             concurrent.futures.Future]]) -> None:
        rows = [(table, row) for table, row, _ in batch if table is not None]
        ids: list[int] = []
        error: BaseException | None = None
        if rows:
            try:
                with self._conn:  # one transaction, committed (and fsynced) on exit
                    for table, row in rows:
                        cur = self._conn.execute(table.insert_sql(),
                                                 [row.get(c) for c in table.columns])
                        ids.append(int(cur.lastrowid or 0))
                self.rows_written += sum(1 for table, _ in rows if table is TRACES)
            except sqlite3.Error as exc:
                self.write_errors += len(rows)
                error = exc
        results = iter(ids)
        for table, _, fut in batch:
            if fut.set_running_or_notify_cancel():
                if table is None:
                    fut.set_result(None)
                elif error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(next(results))
            elif table is not None and error is None:
                next(results)  # keep ids aligned with the rows after a cancelled future


def _time_filter(since: float | None, until: float | None) -> tuple[str, list[float]]:
    clauses, params = [], []
    if since is not None:
        clauses.append("start_time >= ?")
        params.append(since)
    if until is not None:
        clauses.append("start_time < ?")
        params.append(until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def query_rows(path: str | Path, since: float | None = None, until: float | None = None) -> list[dict]:
    """Every row whose start time is in ``[since, until)``, oldest first, as dicts."""
    return list(iter_rows(path, since, until))


def iter_rows(path: str | Path, since: float | None = None, until: float | None = None) -> Iterator[dict]:
    """Stream rows in ``[since, until)`` oldest first (read-only connection)."""
    conn = connect(path, readonly=True)
    try:
        where, params = _time_filter(since, until)
        for row in conn.execute(f"SELECT * FROM traces{where} ORDER BY start_time, id", params):
            yield row_to_dict(row)
    finally:
        conn.close()


def find_row(path: str | Path, *, trace_id: str | None = None, request_id: str | None = None) -> dict | None:
    """The newest row with this trace id or request id, or None."""
    column, value = ("trace_id", trace_id) if trace_id is not None else ("request_id", request_id)
    if value is None:
        raise ValueError("pass trace_id or request_id")
    conn = connect(path, readonly=True)
    try:
        row = conn.execute(f"SELECT * FROM traces WHERE {column} = ? ORDER BY id DESC LIMIT 1",
                           (value,)).fetchone()
        return row_to_dict(row) if row is not None else None
    finally:
        conn.close()


def export_jsonl(path: str | Path, out: IO[str], since: float | None = None,
                 until: float | None = None) -> int:
    """Write rows as JSON lines to ``out``; returns how many."""
    count = 0
    for row in iter_rows(path, since, until):
        out.write(json.dumps(row, sort_keys=True) + "\n")
        count += 1
    return count
