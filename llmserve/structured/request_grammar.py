"""The grammar state of one completion (one engine Request; n > 1 children get one each)."""

from __future__ import annotations

import time
from concurrent.futures import Future

from llmserve.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher


class RequestGrammar:
    """A completion's matcher, its compilation while pending, and where the constraint starts.

    The matcher advances with each output token the engine appends (`advance`), so it always
    reflects the completion's output: output tokens survive preemption (recompute only replays
    them through the model), so the same matcher is kept across it. With `after_token_ids` the
    output is free until it contains that sequence; the constraint applies from the next token.
    """

    def __init__(self, backend: GrammarBackend, future: Future[CompiledGrammar],
                 after_token_ids: tuple[int, ...] | None, deadline: float) -> None:
        self.backend = backend
        self.future = future
        self.deadline = deadline
        self.after = tuple(after_token_ids) if after_token_ids else None
        self.matcher: GrammarMatcher | None = None
        # Output index where the constraint starts (None: after_token_ids not seen yet).
        self.start: int | None = None if self.after else 0
        self.num_seen = 0  # output tokens examined so far
        self.error: str | None = None

    def poll(self, now: float | None = None) -> str:
        """"ready", "waiting" (compiling) or "failed" (see `error`)."""
        if self.matcher is not None:
            return "ready"
        if self.error is not None:
            return "failed"
        if not self.future.done():
            if (now if now is not None else time.monotonic()) < self.deadline:
                return "waiting"
            self.error = "grammar compilation timed out"
            return "failed"
        try:
            self.matcher = self.future.result().matcher()
        except Exception as exc:  # noqa: BLE001 - a compile error fails this request only
            self.error = str(exc) or type(exc).__name__
            return "failed"
        return "ready"

    @property
    def active(self) -> bool:
        """Whether the next token is constrained (a mask applies to it)."""
        return self.matcher is not None and self.start is not None and self.error is None

    @property
    def terminated(self) -> bool:
        return self.matcher is not None and self.start is not None and (
            self.matcher.is_terminated())

    def advance(self, output_token_ids: list[int]) -> bool:
        """Feed the output tokens appended since the last call; False if the grammar refused
        one (then `error` says why and the matcher stays failed)."""
        if self.error is not None:
            return False
        for i in range(self.num_seen, len(output_token_ids)):
            self.num_seen = i + 1
            if self.start is None:
                n = len(self.after)
                if i + 1 >= n and tuple(output_token_ids[i + 1 - n : i + 1]) == self.after:
                    self.start = i + 1
                continue
            if self.matcher.is_terminated():  # only EOS remains; it ends the request
                continue
            token = output_token_ids[i]
            if not self.matcher.accept_token(token):
                self.error = self.matcher.error or f"token {token} violates the grammar"
                return False
        return True

    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` output tokens (for speculative decoding)."""
        constrained = self.num_seen - (self.start or 0) if self.start is not None else 0
        if self.matcher is not None and constrained > 0:
            self.matcher.rollback(min(num_tokens, constrained))
        self.num_seen -= num_tokens
        if self.start is not None and self.after and self.num_seen < self.start:
            self.start = None
