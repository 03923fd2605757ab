"""Stream delta tracking: what each completion has gained since its last chunk.

Engine outputs are cumulative (the whole text and token ids so far), so every streaming front
end (chat and completions over SSE, gRPC) asks one tracker what is new per completion.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmserve.outputs import CompletionOutput, SampleLogprobs


class RequestAborted(Exception):
    """The engine aborted the request: the server's doing (drain timeout) when `error` is None,
    else the request's own (`CompletionOutput.error`: its grammar failed to compile)."""

    def __init__(self, error: str | None = None) -> None:
        super().__init__(error or "the request was aborted by the server")
        self.error = error


@dataclass
class Delta:
    """What one completion gained since the previous delta of the same key."""

    text: str
    token_ids: list[int]
    logprobs: SampleLogprobs | None  # entries of the new tokens; None when not requested
    first_token: int  # index of the first new token in the completion
    first_char: int  # offset of `text` in the completion's text
    finish_reason: str | None

    @property
    def empty(self) -> bool:
        """Nothing new at all: no text, no token and not the end."""
        return not self.text and not self.token_ids and self.finish_reason is None


class DeltaTracker:
    """Per key (a completion), how many characters and tokens were already sent."""

    def __init__(self) -> None:
        self._chars: dict[Hashable, int] = {}
        self._tokens: dict[Hashable, int] = {}
        self._done: set[Hashable] = set()

    def delta(self, key: Hashable, c: CompletionOutput) -> Delta | None:
        """The new part of `c`, or None once `key` has finished.

        Raises RequestAborted when the engine aborted the completion.
        """
        if key in self._done:
            return None
        if c.finish_reason == "abort":
            raise RequestAborted(c.error)
        chars, tokens = self._chars.get(key, 0), self._tokens.get(key, 0)
        logprobs = c.logprobs[tokens:] if c.logprobs is not None else None
        self._chars[key], self._tokens[key] = len(c.text), len(c.token_ids)
        if c.finish_reason is not None:
            self._done.add(key)
        return Delta(c.text[chars:], list(c.token_ids[tokens:]), logprobs, tokens, chars,
                     c.finish_reason)

    def finished(self, keys: list[Hashable]) -> bool:
        """Whether every one of `keys` has seen its finish reason."""
        return all(k in self._done for k in keys)
