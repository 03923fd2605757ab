"""Helpers of the batch tests: build batch lines, write and read JSONL."""

from __future__ import annotations

import json
from pathlib import Path


def chat_line(custom_id: str, content: str, **body) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 8,
            "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": body}


def completion_line(custom_id: str, prompt, **body) -> dict:
    body = {"prompt": prompt, "max_tokens": 8, "temperature": 0, **body}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def write_jsonl(path: Path, rows: list) -> Path:
    """Rows may be dicts (dumped) or raw strings (written as they are)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(s) for s in path.read_text(encoding="utf-8").splitlines() if s.strip()]
