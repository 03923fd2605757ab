"""How a chat choice's generated text becomes message fields: content, reasoning, tool calls.

A `TextShape` is made per choice. Streamed, `feed(delta_text)` and `finish()` return the delta
fragments to send (`{"content": ...}`, `{"reasoning_content": ...}`, `{"tool_calls": [...]}`);
whole, `message(text)` returns the message fields and whether tool calls were found. Both
forms split the same text the same way, so the streamed fragments add up to the message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from llmserve.server.openai.tool_parsers.types import ContentDelta

if TYPE_CHECKING:
    from llmserve.server.openai.reasoning import ReasoningParser
    from llmserve.server.openai.tool_parsers import ToolCallDelta, ToolParser


class TextShape(Protocol):
    def feed(self, text: str) -> list[dict]: ...

    def finish(self) -> list[dict]: ...

    def message(self, text: str) -> tuple[dict, bool]: ...


class PlainText:
    """The text is the content, as generated."""

    def feed(self, text: str) -> list[dict]:
        return [{"content": text}] if text else []

    def finish(self) -> list[dict]:
        return []

    def message(self, text: str) -> tuple[dict, bool]:
        return {"content": text}, False


class ParsedText:
    """Reasoning first (`reasoning_content`), then the answer, whose tool calls are read out.

    Either parser may be None: without a reasoning parser all text is the answer; without a
    tool parser the answer is the content.
    """

    def __init__(self, reasoning: ReasoningParser | None, tools: ToolParser | None) -> None:
        self._reasoning_parser = reasoning
        self._tool_parser = tools
        self._reasoning = reasoning.stream() if reasoning is not None else None
        self._tools = tools.stream() if tools is not None else None

    def feed(self, text: str) -> list[dict]:
        if self._reasoning is None:
            return self._answer(text, final=False)
        reasoning, content = self._reasoning.feed(text)
        return _reasoning_part(reasoning) + self._answer(content, final=False)

    def finish(self) -> list[dict]:
        if self._reasoning is None:
            return self._answer("", final=True)
        reasoning, content = self._reasoning.finish()
        return _reasoning_part(reasoning) + self._answer(content, final=True)

    def message(self, text: str) -> tuple[dict, bool]:
        message: dict = {}
        if self._reasoning_parser is not None:
            reasoning, answer = self._reasoning_parser.extract(text)
            message["reasoning_content"] = reasoning
            text = answer or ""
        if self._tool_parser is None:
            return {**message, "content": text}, False
        found = self._tool_parser.extract(text)
        message["content"] = found.content if found.calls else found.content or ""
        if found.calls:
            message["tool_calls"] = [call.to_openai() for call in found.calls]
        return message, bool(found.calls)

    def _answer(self, text: str, final: bool) -> list[dict]:
        if self._tools is None:
            return [{"content": text}] if text else []
        deltas = self._tools.feed(text) if text else []
        if final:
            deltas += self._tools.finish()
        return [_tool_part(d) for d in deltas]


def _reasoning_part(text: str) -> list[dict]:
    return [{"reasoning_content": text}] if text else []


def _tool_part(delta: ContentDelta | ToolCallDelta) -> dict:
    if isinstance(delta, ContentDelta):
        return {"content": delta.text}
    return {"tool_calls": [delta.to_openai()]}
