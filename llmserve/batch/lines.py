"""OpenAI batch input lines: parse a JSONL file and check its structure, line by line.

A line is `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions" |
"/v1/completions", "body": {...}}`. Structural problems (not JSON, a missing field, an unknown
url, a duplicate custom_id) make the whole file unusable, so they are collected for every line
and reported together with line numbers. Whether a body is a valid request is checked later
(`llmserve.batch.bodies`): a bad body fails only its own line, as OpenAI's batch does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ENDPOINTS = ("/v1/chat/completions", "/v1/completions")
MAX_CUSTOM_ID_CHARS = 512
# How many problems an error message lists before summarising the rest.
MAX_REPORTED = 20


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch input file (`line` is 1-based)."""

    line: int
    custom_id: str
    url: str
    body: dict


@dataclass(frozen=True)
class LineError:
    """A problem with one input line, in OpenAI's batch `errors.data` shape."""

    line: int
    message: str
    code: str = "invalid_request"
    param: str | None = None

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "param": self.param,
                "line": self.line}

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


class BatchInputError(ValueError):
    """The input file cannot be run; `errors` lists every bad line."""

    def __init__(self, errors: list[LineError], source: str = "input") -> None:
        self.errors = errors
        shown = "\n".join(f"  {e}" for e in errors[:MAX_REPORTED])
        more = len(errors) - MAX_REPORTED
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{source} has {len(errors)} invalid line(s):\n{shown}{tail}")


def parse_line(line_no: int, text: str, endpoint: str | None = None) -> BatchLine | LineError:
    """One line as a BatchLine, or the first structural problem it has."""
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return LineError(line_no, f"not valid JSON ({exc.msg})", "invalid_json")
    if not isinstance(obj, dict):
        return LineError(line_no, "a line must be a JSON object", "invalid_json")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return LineError(line_no, "custom_id must be a non-empty string", "missing_required_parameter",
                         "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID_CHARS:
        return LineError(line_no, f"custom_id is longer than {MAX_CUSTOM_ID_CHARS} characters",
                         param="custom_id")
    if obj.get("method", "POST") != "POST":
        return LineError(line_no, f"method must be 'POST', got {obj.get('method')!r}",
                         "invalid_method", "method")
    url = obj.get("url")
    if url not in ENDPOINTS:
        return LineError(line_no, f"url must be one of {list(ENDPOINTS)}, got {url!r}",
                         "invalid_url", "url")
    if endpoint is not None and url != endpoint:
        return LineError(line_no, f"url {url!r} does not match the batch endpoint {endpoint!r}",
                         "mismatched_url", "url")
    body = obj.get("body")
    if not isinstance(body, dict):
        return LineError(line_no, "body must be a JSON object", "missing_required_parameter",
                         "body")
    return BatchLine(line_no, custom_id, url, body)


def parse_lines(texts: Iterable[str], endpoint: str | None = None,
                source: str = "input") -> list[BatchLine]:
    """Every request of a batch file; BatchInputError listing all bad lines if any is bad.

    Blank lines are skipped. Duplicate custom_ids are errors (results are matched to requests
    by custom_id, and resuming a job skips the ones already done).
    """
    lines: list[BatchLine] = []
    errors: list[LineError] = []
    first_seen: dict[str, int] = {}
    for line_no, text in enumerate(texts, start=1):
        if not text.strip():
            continue
        parsed = parse_line(line_no, text, endpoint)
        if isinstance(parsed, LineError):
            errors.append(parsed)
            continue
        if parsed.custom_id in first_seen:
            errors.append(LineError(
                line_no, f"duplicate custom_id {parsed.custom_id!r} (first on line "
                f"{first_seen[parsed.custom_id]})", "duplicate_custom_id", "custom_id"))
            continue
        first_seen[parsed.custom_id] = line_no
        lines.append(parsed)
    if errors:
        raise BatchInputError(errors, source)
    if not lines:
        raise BatchInputError([LineError(0, "the file holds no requests", "empty_file")], source)
    return lines


def read_batch_file(path: str | Path, endpoint: str | None = None) -> list[BatchLine]:
    """Parse a batch input file from disk (UTF-8 JSONL)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read batch input {str(path)!r}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data[: exc.start].count(b"\n") + 1
        raise BatchInputError([LineError(line_no, "not valid UTF-8", "invalid_json")],
                              str(path)) from None
    # Split on "\n" only: str.splitlines would also split inside JSON strings holding U+2028.
    return parse_lines(text.split("\n"), endpoint, str(path))
