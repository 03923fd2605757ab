"""Split `<think>…</think>` reasoning (Qwen3, DeepSeek-R1) from a completion's answer.

One state machine serves both forms: `extract(text)` is a stream fed the whole text at once,
so the streamed deltas concatenate to exactly what `extract` returns. Text that may be the
start of a tag is held back until the next delta decides it.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def _held(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """`feed(delta) -> (reasoning_delta, content_delta)`; `finish()` releases held text."""

    def __init__(self, starts_in_reasoning: bool) -> None:
        self._default = "reasoning" if starts_in_reasoning else "content"
        self._state = "start"
        self._buf = ""
        self.reasoning_ended = False

    def feed(self, delta: str) -> tuple[str, str]:
        """Take more completion text; return (reasoning, content) text that can go out now."""
        self._buf += delta
        return self._drain(final=False)

    def finish(self) -> tuple[str, str]:
        """The completion ended: release whatever was held back."""
        return self._drain(final=True)

    def _drain(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while self._buf:
            before = (self._state, len(self._buf))
            if self._state == "start":
                self._start(final)
            elif self._state == "reasoning":
                reasoning.append(self._reasoning(final))
            elif self._state == "content_lead":
                stripped = self._buf.lstrip()
                self._buf = stripped
                self._state = "content" if stripped else "content_lead"
            else:
                content.append(self._buf)
                self._buf = ""
            if (self._state, len(self._buf)) == before:
                break  # waiting for more text
        return "".join(reasoning), "".join(content)

    def _start(self, final: bool) -> None:
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_START):
            self._buf, self._state = stripped[len(THINK_START):], "reasoning"
        elif final or (stripped and not THINK_START.startswith(stripped)):
            self._state = self._default

    def _reasoning(self, final: bool) -> str:
        at = self._buf.find(THINK_END)
        if at >= 0:
            out, self._buf = self._buf[:at], self._buf[at + len(THINK_END):]
            self._state, self.reasoning_ended = "content_lead", True
            return out
        keep = 0 if final else _held(self._buf, THINK_END)
        out, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
        return out


class ReasoningParser:
    """`<think>…</think>` reasoning. With `starts_in_reasoning` (DeepSeek-R1, whose template
    opens `<think>` in the prompt) a completion without an opening tag begins as reasoning;
    otherwise (Qwen3) it is all content unless it opens with `<think>`. A leading `<think>`
    is dropped either way; whitespace right after `</think>` is not content."""

    name = ""
    starts_in_reasoning = False
    start_marker = THINK_START
    end_marker = THINK_END  # tokenized by the server into the constraint's after_token_ids

    def __init__(self, starts_in_reasoning: bool | None = None) -> None:
        if starts_in_reasoning is not None:
            self.starts_in_reasoning = starts_in_reasoning
        # False when the prompt itself already closed the reasoning (Qwen3 with thinking off
        # renders an empty <think></think>): a constraint then applies from the first token.
        self.constraint_after_reasoning = True

    @classmethod
    def for_prompt(cls, prompt: str | None) -> ReasoningParser:
        """A parser for one request, reading how the rendered prompt ends: a prompt that
        leaves `<think>` open starts the completion inside the reasoning (DeepSeek-R1, the
        Qwen3 thinking-only templates); one that ends with `</think>` has no reasoning left."""
        parser = cls()
        text = (prompt or "").rstrip()
        if text.rfind(THINK_START) > text.rfind(THINK_END):
            parser.starts_in_reasoning = True
        elif text.endswith(THINK_END):
            parser.constraint_after_reasoning = False
        return parser

    def stream(self) -> ReasoningStream:
        """A fresh streaming reader for one completion."""
        return ReasoningStream(self.starts_in_reasoning)

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """(reasoning, content) of a whole completion; None where a part is empty."""
        stream = self.stream()
        r1, c1 = stream.feed(text)
        r2, c2 = stream.finish()
        return (r1 + r2) or None, (c1 + c2) or None


class Qwen3ReasoningParser(ReasoningParser):
    name = "qwen3"


class DeepSeekR1ReasoningParser(ReasoningParser):
    name = "deepseek_r1"
    starts_in_reasoning = True
