"""Durable batch progress: results are appended to JSONL files and flushed as they complete.

The result files are the progress record. After a crash (even `kill -9` in the middle of a
write) `ResultLog.open` cuts off a torn last line and reads back the custom_ids already done,
so the job resumes where it stopped and never writes a custom_id twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import IO

# fsync at most this often: flush() already survives a killed process; fsync covers power loss.
FSYNC_INTERVAL_S = 1.0


def _new_counts() -> dict[str, int]:
    return {"completed": 0, "failed": 0, "input_tokens": 0, "cached_tokens": 0,
            "output_tokens": 0}


def _count(counts: dict[str, int], obj: dict) -> None:
    ok = _succeeded(obj)
    counts["completed" if ok else "failed"] += 1
    usage = obj["response"]["body"].get("usage") if ok else None
    if isinstance(usage, dict):
        counts["input_tokens"] += usage.get("prompt_tokens") or 0
        counts["output_tokens"] += usage.get("completion_tokens") or 0
        details = usage.get("prompt_tokens_details") or {}
        counts["cached_tokens"] += details.get("cached_tokens") or 0


def _recover(path: Path) -> tuple[set[str], dict[str, int]]:
    """Truncate a torn tail; return the custom_ids in the file and counts by outcome."""
    done: set[str] = set()
    counts = _new_counts()
    if not path.exists():
        return done, counts
    with path.open("rb+") as f:
        good_end = 0
        for raw in f:
            if not raw.endswith(b"\n"):
                break  # torn write: the process died before the newline
            try:
                obj = json.loads(raw)
                custom_id = obj["custom_id"]
            except (ValueError, KeyError, TypeError):
                break
            done.add(custom_id)
            _count(counts, obj)
            good_end += len(raw)
        f.truncate(good_end)
    return done, counts


def _succeeded(obj: dict) -> bool:
    response = obj.get("response")
    return (isinstance(response, dict) and response.get("status_code") == 200
            and isinstance(response.get("body"), dict))


class ResultLog:
    """Append-only output (and optional separate errors) file of one batch job.

    Args:
        output: where successful results go (and failures too when `errors` is None).
        errors: where failed lines go; None or the same path as `output` means one file.
    """

    def __init__(self, output: str | Path, errors: str | Path | None = None) -> None:
        self.output = Path(output)
        self.errors = Path(errors) if errors is not None else None
        if self.errors is not None and _same(self.errors, self.output):
            self.errors = None
        self.done: set[str] = set()
        # completed / failed lines and the token usage of the completed ones
        self.counts = _new_counts()
        self._files: list[IO[str]] = []
        self._out: IO[str] | None = None
        self._err: IO[str] | None = None
        self._last_sync = time.monotonic()

    def open(self) -> ResultLog:
        """Recover what earlier runs wrote and open the files for appending."""
        for path in filter(None, (self.output, self.errors)):
            path.parent.mkdir(parents=True, exist_ok=True)
            done, counts = _recover(path)
            overlap = self.done & done
            if overlap:
                raise ValueError(f"{str(path)!r} repeats results already in another result "
                                 f"file (e.g. custom_id {sorted(overlap)[0]!r})")
            self.done |= done
            for k in counts:
                self.counts[k] += counts[k]
        self._out = self.output.open("a", encoding="utf-8")
        self._files = [self._out]
        if self.errors is not None:
            self._err = self.errors.open("a", encoding="utf-8")
            self._files.append(self._err)
        return self

    def write(self, line: dict) -> None:
        """Append one result line and flush it to the OS before returning."""
        ok = _succeeded(line)
        f = self._out if ok or self._err is None else self._err
        f.write(json.dumps(line, ensure_ascii=False, separators=(",", ":")) + "\n")
        f.flush()
        self.done.add(line["custom_id"])
        _count(self.counts, line)
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_INTERVAL_S:
            self.sync()
            self._last_sync = now

    def sync(self) -> None:
        for f in self._files:
            f.flush()
            os.fsync(f.fileno())

    def close(self) -> None:
        if not self._files:
            return
        self.sync()
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> ResultLog:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
