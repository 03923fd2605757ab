"""What the trace ledger stores: the ``traces`` row, its columns, and the schema with migrations.

Columns are only ever added. A ledger file written before a column existed gets it on the next
open (``ALTER TABLE ADD COLUMN``, NULL in old rows); ``SCHEMA_VERSION`` changes only for a change
that old files cannot follow. Other components may keep tables of their own in the same file
(:class:`Table`); the ledger's single writer thread writes those rows too.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
from dataclasses import asdict, dataclass, field
from typing import Any

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
    # Added for structured outputs and tool calling; migrated into older files on open.
    ("response_format", "TEXT"), ("num_tool_calls", "INTEGER"),
)
COLUMNS = tuple(name for name, _ in _COLUMN_TYPES)
STATUSES = ("ok", "error", "aborted")


@dataclass
class TraceRecord:
    """One request's row. ``status`` is ok / error / aborted; ``cost_partial`` flags a request
    that did not complete and paid only for what it computed. ``response_format`` is the kind
    of output asked for ("text", "json_object", "json_schema", "regex", "choice", "grammar",
    "tools_required"); ``num_tool_calls`` counts the tool calls in the final output."""

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
    response_format: str | None = None
    num_tool_calls: int | None = None

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["cost_partial"] = int(self.cost_partial)
        row["extra"] = json.dumps(self.extra, sort_keys=True) if self.extra else None
        return row


@dataclass(frozen=True)
class Table:
    """A table another component keeps in the ledger file (created when the ledger opens)."""

    name: str
    ddl: str  # CREATE TABLE IF NOT EXISTS ...
    columns: tuple[str, ...]

    def insert_sql(self) -> str:
        return (f"INSERT INTO {self.name} ({', '.join(self.columns)}) "
                f"VALUES ({', '.join('?' * len(self.columns))})")


TRACES = Table("traces", "", COLUMNS)


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring a ledger written by an older llmserve up to the current columns."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(traces)")}
    for name, sqltype in _COLUMN_TYPES:
        if name not in present:
            conn.execute(f"ALTER TABLE traces ADD COLUMN {name} {sqltype}")


def create_schema(conn: sqlite3.Connection, tables: tuple[Table, ...] = ()) -> None:
    """Create the tables if missing, add missing columns, refuse an incompatible schema."""
    cols = ",\n  ".join(f"{name} {sqltype}" for name, sqltype in _COLUMN_TYPES)
    with conn:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        # The key of the user-id HMAC: random per ledger, so hashes join within it but a guessed
        # user id cannot be checked against them without the database itself.
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('user_hash_key', ?)", (secrets.token_hex(32),))
    (found,) = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    if found != str(SCHEMA_VERSION):  # checked before any change: never touch a foreign layout
        raise ValueError(f"trace ledger schema version {found} is not {SCHEMA_VERSION}")
    with conn:
        conn.execute(f"CREATE TABLE IF NOT EXISTS traces (\n  id INTEGER PRIMARY KEY AUTOINCREMENT,\n  {cols})")
        _add_missing_columns(conn)
        for col in ("start_time", "trace_id", "request_id"):
            conn.execute(f"CREATE INDEX IF NOT EXISTS traces_{col} ON traces ({col})")
        for table in tables:
            conn.execute(table.ddl)


def row_to_dict(row: sqlite3.Row) -> dict[str, Any]:
    """A database row as a plain dict, with ``extra`` decoded and the flag as a bool."""
    out = dict(row)
    out["extra"] = json.loads(out["extra"]) if out.get("extra") else {}
    out["cost_partial"] = bool(out.get("cost_partial"))
    return out
