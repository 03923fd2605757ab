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
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1
# (column, SQL type). Times are Unix seconds (time.time()); costs are USD.
_COLUMN_TYPES = (
    ("trace_id", "TEXT NOT NULL"), ("span_id", "TEXT"), ("parent_span_id", "TEXT"),
    ("parent_trace_id", "TEXT"), ("request_id", "TEXT NOT NULL"),
    ("start_time", "REAL NOT NULL"), ("end_time", "REAL"),
    ("endpoint", "TEXT"), ("endpoint_version", "TEXT"), ("model", "TEXT"), ("model_version", "TEXT"),
    ("prompt_version", "TEXT"), ("chat_template_hash", "TEXT"), ("user_hash", "TEXT"),
    ("route", "TEXT"), ("prompt_tokens", "INTEGER"), ("cached_tokens", "INTEGER"),
    ("completion_tokens", "INTEGER"), ("queue_time", "REAL"), ("ttft", "REAL"), ("tpot", "REAL"),
    ("e2e_latency", "REAL"), ("finish_reason", "TEXT"), ("status", "TEXT NOT NULL"),
    ("error_type", "TEXT"), ("http_status", "INTEGER"), ("cost_mode", "TEXT"), ("cost_usd", "REAL"),
    ("input_cost_usd", "REAL"), ("cached_input_cost_usd", "REAL"), ("output_cost_usd", "REAL"),
    ("hardware_seconds", "REAL"), ("cost_partial", "INTEGER NOT NULL DEFAULT 0"),
    ("prompt_text", "TEXT"), ("completion_text", "TEXT"), ("extra", "TEXT"),
)
COLUMNS = tuple(name for name, _ in _COLUMN_TYPES)
STATUSES = ("ok", "error", "aborted")


@dataclass
class TraceRecord:
    """One request's row. ``status`` is ok / error / aborted; ``cost_partial`` flags a request
    that did not complete and paid only for what it computed."""

    trace_id: str
    request_id: str
    start_time: float
    status: str = "ok"
    span_id: str | None = None
    parent_span_id: str | None = None
    parent_trace_id: str | None = None
    end_time: float | None = None
    endpoint: str | None = None
    endpoint_version: str | None = None
    model: str | None = None
    model_version: str | None = None
    prompt_version: str | None = None
    chat_template_hash: str | None = None
    user_hash: str | None = None
    route: str | None = "primary"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    queue_time: float | None = None
    ttft: float | None = None
    tpot: float | None = None
    e2e_latency: float | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    http_status: int | None = None
    cost_mode: str | None = None
    cost_usd: float | None = None
    input_cost_usd: float | None = None
    cached_input_cost_usd: float | None = None
    output_cost_usd: float | None = None
    hardware_seconds: float | None = None
    cost_partial: bool = False
    prompt_text: str | None = None
    completion_text: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["cost_partial"] = int(self.cost_partial)
        row["extra"] = json.dumps(self.extra, sort_keys=True) if self.extra else None
        return row


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables if missing; refuse a database written by a different schema."""
    cols = ",\n  ".join(f"{name} {sqltype}" for name, sqltype in _COLUMN_TYPES)
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute(f"CREATE TABLE IF NOT EXISTS traces (\n  id INTEGER PRIMARY KEY AUTOINCREMENT,\n  {cols})")
        for col in ("start_time", "trace_id", "request_id"):
            conn.execute(f"CREATE INDEX IF NOT EXISTS traces_{col} ON traces ({col})")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        # The key of the user-id HMAC: random per ledger, so hashes join within it but a guessed
        # user id cannot be checked against them without the database itself.
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('user_hash_key', ?)", (secrets.token_hex(32),))
    (found,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if found != str(SCHEMA_VERSION):
        raise ValueError(f"trace ledger schema version {found} is not {SCHEMA_VERSION}")


def row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A database row as a plain dict, with ``extra`` decoded and the flag as a bool."""
    out = dict(row)
    out["extra"] = json.loads(out["extra"]) if out.get("extra") else {}
    out["cost_partial"] = bool(out.get("cost_partial"))
    return out


_STOP = object()
_BATCH = 256  # rows per transaction at most, so one commit does not hold readers up for long


def default_trace_db_path() -> str:
    """``$LLMSERVE_TRACE_DB``, else ``$XDG_STATE_HOME/llmserve/traces.db`` (~/.local/state)."""
    explicit = os.environ.get("LLMSERVE_TRACE_DB")
    if explicit:
        return explicit
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "llmserve", "traces.db")


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
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
        create_schema(conn)
    conn.row_factory = sqlite3.Row
    return conn


class TraceLedger:
    """Append-only writer of trace rows, with a bounded queue and one writer thread."""

    def __init__(self, path: str | Path, max_queue: int = 10_000) -> None:
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.path = str(path)
        self._conn = connect(self.path)
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
        if self._closed:
            raise RuntimeError("the trace ledger is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            self._queue.put((record.to_row(), future), timeout=timeout)
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
        self._queue.put((None, marker), timeout=timeout)
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

    def _write_batch(self, batch: list[tuple[dict | None, concurrent.futures.Future]]) -> None:
        rows = [(row, fut) for row, fut in batch if row is not None]
        ids: list[int] = []
        error: BaseException | None = None
        if rows:
            sql = f"INSERT INTO traces ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
            try:
                with self._conn:  # one transaction, committed (and fsynced) on exit
                    for row, _ in rows:
                        cur = self._conn.execute(sql, [row.get(c) for c in COLUMNS])
                        ids.append(int(cur.lastrowid or 0))
                self.rows_written += len(rows)
            except sqlite3.Error as exc:
                self.write_errors += len(rows)
                error = exc
        results = iter(ids)
        for row, fut in batch:
            if fut.set_running_or_notify_cancel():
                if row is None:
                    fut.set_result(None)
                elif error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(next(results))


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
