"""Backends: replica state shared across config reloads, and what a response tells us.

A replica is any endpoint speaking the OpenAI API. Its :class:`ReplicaState` (requests in flight,
health) is keyed by URL and survives config reloads, so a reload never forgets that a replica is
down or how loaded it is. :class:`Capture` watches a response go by (streamed or not) and keeps
what the trace record needs: time to first token, tokens, finish reason, the text when asked.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

MODEL_VERSION_HEADER = "x-model-version"


@dataclass
class ReplicaState:
    """Live state of one replica URL."""

    url: str
    api_key: str | None = None
    outstanding: int = 0
    healthy: bool = True
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_error: str | None = None
    served: int = 0

    def snapshot(self) -> dict:
        return {"url": self.url, "healthy": self.healthy, "outstanding": self.outstanding,
                "served": self.served, "last_error": self.last_error}


class ReplicaRegistry:
    """URL -> ReplicaState, reused by every config generation."""

    def __init__(self) -> None:
        self._by_url: dict[str, ReplicaState] = {}

    def get(self, url: str, api_key: str | None) -> ReplicaState:
        state = self._by_url.get(url)
        if state is None:
            state = self._by_url[url] = ReplicaState(url=url, api_key=api_key)
        state.api_key = api_key  # a reload may rotate the key
        return state

    def retain(self, urls: set[str]) -> None:
        """Forget replicas no longer configured (in-flight requests keep their own reference)."""
        for url in list(self._by_url):
            if url not in urls:
                del self._by_url[url]

    def all(self) -> list[ReplicaState]:
        return list(self._by_url.values())


@dataclass
class Capture:
    """Observes one upstream response; fed raw bytes, it parses OpenAI JSON or SSE."""

    start: float  # perf_counter when the router received the request
    streaming: bool
    keep_text: bool = False
    status_code: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    end: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    token_events: int = 0  # content chunks seen, the token count when usage is absent
    finish_reason: str | None = None
    model_version: str | None = None
    error_type: str | None = None
    text_parts: list[str] = field(default_factory=list)
    _buffer: bytes = b""

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    @property
    def ttft(self) -> float | None:
        if not self.streaming or self.first_token_at is None:
            return None
        return self.first_token_at - self.start

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if not self.streaming or n < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (n - 1)

    @property
    def output_tokens(self) -> int:
        return self.completion_tokens or self.token_events

    def feed_stream(self, chunk: bytes) -> None:
        """Parse complete SSE events out of ``chunk`` (events may span chunks)."""
        self._buffer += chunk
        while True:
            # OpenAI-style streams separate events by a blank line; accept both newline styles.
            idx = self._buffer.find(b"\n\n")
            if idx < 0:
                idx2 = self._buffer.find(b"\r\n\r\n")
                if idx2 < 0:
                    return
                event, self._buffer = self._buffer[:idx2], self._buffer[idx2 + 4:]
            else:
                event, self._buffer = self._buffer[:idx], self._buffer[idx + 2:]
            self._event(event)

    def _event(self, event: bytes) -> None:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if not data or data == b"[DONE]":
                continue
            try:
                obj = json.loads(data)
            except ValueError:
                continue
            if isinstance(obj, dict):
                self._payload(obj, time.perf_counter())

    def feed_body(self, body: bytes) -> None:
        """Parse a whole (non-streamed) JSON response."""
        try:
            obj = json.loads(body)
        except ValueError:
            return
        if isinstance(obj, dict):
            self._payload(obj, time.perf_counter())

    def _payload(self, obj: dict, now: float) -> None:
        if "error" in obj and isinstance(obj["error"], dict):
            self.error_type = str(obj["error"].get("type") or "upstream_error")
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details") or {}
            self.cached_tokens = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        if not self.model_version and isinstance(obj.get("system_fingerprint"), str):
            self.model_version = obj["system_fingerprint"]
        for choice in obj.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            self._choice(choice, now)

    def _choice(self, choice: dict, now: float) -> None:
        if choice.get("finish_reason"):
            self.finish_reason = str(choice["finish_reason"])
        if self.streaming:
            delta = choice.get("delta")
            piece = delta.get("content") if isinstance(delta, dict) else choice.get("text")
        else:
            message = choice.get("message")
            piece = message.get("content") if isinstance(message, dict) else choice.get("text")
        if not piece:
            return
        if self.streaming:
            self.token_events += 1
            self.first_token_at = self.first_token_at or now
            self.last_token_at = now
        if self.keep_text and choice.get("index", 0) == 0:
            self.text_parts.append(str(piece))
