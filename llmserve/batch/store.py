"""Durable state of the online Batch API: files on local disk, their records in SQLite.

Layout under the root directory: `state.db` (SQLite, WAL), `files/<file_id>` (uploaded and
produced files) and `batches/<batch_id>/{output,errors}.jsonl` (results appended while the
batch runs; they become files when it finishes). Objects are returned in OpenAI's shapes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
TERMINAL = ("failed", "completed", "expired", "cancelled")
_TIMES = ("in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
          "expired_at", "cancelling_at", "cancelled_at")
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL,
    filename TEXT NOT NULL, purpose TEXT NOT NULL, status TEXT NOT NULL DEFAULT 'processed');
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, seq INTEGER NOT NULL, endpoint TEXT NOT NULL,
    input_file_id TEXT NOT NULL, completion_window TEXT NOT NULL, status TEXT NOT NULL,
    output_file_id TEXT, error_file_id TEXT, created_at INTEGER NOT NULL,
    {", ".join(f"{t} INTEGER" for t in _TIMES)},
    total INTEGER NOT NULL DEFAULT 0, completed INTEGER NOT NULL DEFAULT 0,
    failed INTEGER NOT NULL DEFAULT 0, input_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    model TEXT, errors TEXT, metadata TEXT);
"""


class BatchStore:
    """Files and batches of one server; safe to call from any thread (one lock)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "batches").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.root / "state.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- files ---------------------------------------------------------------------------------
    def file_path(self, file_id: str) -> Path:
        return self.root / "files" / file_id

    def add_file(self, data: bytes, filename: str, purpose: str) -> dict:
        """Store an uploaded file (written and fsynced before its record exists)."""
        file_id = f"file-{uuid.uuid4().hex}"
        _write_durably(self.file_path(file_id), data)
        return self.register_file(file_id, len(data), filename, purpose)

    def register_file(self, file_id: str, size: int, filename: str, purpose: str) -> dict:
        with self._lock:
            self._db.execute(
                "INSERT OR IGNORE INTO files (id, bytes, created_at, filename, purpose) "
                "VALUES (?, ?, ?, ?, ?)", (file_id, size, int(time.time()), filename, purpose))
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        return _file_object(row) if row is not None else None

    def list_files(self, purpose: str | None = None) -> list[dict]:
        sql, args = "SELECT * FROM files", ()
        if purpose:
            sql, args = sql + " WHERE purpose = ?", (purpose,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY created_at DESC, id", args).fetchall()
        return [_file_object(r) for r in rows]

    def delete_file(self, file_id: str) -> bool:
        with self._lock:
            deleted = self._db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount
        if deleted:
            self.file_path(file_id).unlink(missing_ok=True)
        return bool(deleted)

    # -- batches -------------------------------------------------------------------------------
    def batch_dir(self, batch_id: str) -> Path:
        return self.root / "batches" / batch_id

    def add_batch(self, input_file_id: str, endpoint: str, completion_window: str,
                  window_s: int, metadata: dict | None) -> dict:
        batch_id = f"batch_{uuid.uuid4().hex}"
        now = int(time.time())
        with self._lock:
            seq = self._db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM batches").fetchone()[0]
            self._db.execute(
                "INSERT INTO batches (id, seq, endpoint, input_file_id, completion_window, "
                "status, created_at, expires_at, metadata) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (batch_id, seq, endpoint, input_file_id, completion_window, "validating", now,
                 now + window_s, json.dumps(metadata) if metadata is not None else None))
        return self.get_batch(batch_id)

    def get_batch(self, batch_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return _batch_object(row) if row is not None else None

    def list_batches(self, limit: int = 20, after: str | None = None) -> list[dict]:
        """Newest first; `after` is the id of the last batch of the previous page."""
        sql, args = "SELECT * FROM batches", []
        if after:
            sql += " WHERE seq < (SELECT seq FROM batches WHERE id = ?)"
            args.append(after)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY seq DESC LIMIT ?", [*args, limit]).fetchall()
        return [_batch_object(r) for r in rows]

    def active_batches(self) -> list[dict]:
        """Batches not yet terminal, oldest first (the order the worker runs them)."""
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            rows = self._db.execute(f"SELECT * FROM batches WHERE status IN ({marks}) "
                                    "ORDER BY seq", ACTIVE).fetchall()
        return [_batch_object(r) for r in rows]

    def update_batch(self, batch_id: str, **fields: Any) -> dict:
        """Set columns (a `status` also stamps its `<status>_at` time if it has one)."""
        status = fields.get("status")
        stamp = f"{status}_at" if status else None
        if stamp in _TIMES and stamp not in fields:
            fields[stamp] = int(time.time())
        for key in ("errors", "metadata"):
            if key in fields and fields[key] is not None:
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE batches SET {cols} WHERE id = ?", [*fields.values(),
                                                                         batch_id])
        return self.get_batch(batch_id)

    def cancel_batch(self, batch_id: str) -> dict | None:
        """Move an active batch to `cancelling` (atomic: the worker may be finishing it)."""
        with self._lock:
            self._db.execute(
                "UPDATE batches SET status = 'cancelling', cancelling_at = ? WHERE id = ? AND "
                "status IN ('validating', 'in_progress')", (int(time.time()), batch_id))
        return self.get_batch(batch_id)

    def input_in_use(self, file_id: str) -> str | None:
        """The id of an active batch reading this file, if any."""
        marks = ", ".join("?" * len(ACTIVE))
        with self._lock:
            row = self._db.execute(f"SELECT id FROM batches WHERE input_file_id = ? AND status "
                                   f"IN ({marks})", (file_id, *ACTIVE)).fetchone()
        return row[0] if row else None


def _write_durably(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".part")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _file_object(row: sqlite3.Row) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"], "status_details": None}


def _batch_object(row: sqlite3.Row) -> dict:
    errors = json.loads(row["errors"]) if row["errors"] else None
    return {
        "id": row["id"], "object": "batch", "endpoint": row["endpoint"], "errors": errors,
        "input_file_id": row["input_file_id"], "completion_window": row["completion_window"],
        "status": row["status"], "output_file_id": row["output_file_id"],
        "error_file_id": row["error_file_id"], "created_at": row["created_at"],
        **{t: row[t] for t in _TIMES},
        "request_counts": {"total": row["total"], "completed": row["completed"],
                           "failed": row["failed"]},
        "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
        "model": row["model"],
        "usage": {"input_tokens": row["input_tokens"],
                  "input_tokens_details": {"cached_tokens": row["cached_tokens"]},
                  "output_tokens": row["output_tokens"],
                  "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": row["input_tokens"] + row["output_tokens"]},
    }
