"""The values tool-call parsers return: whole calls, and the deltas of a stream."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field


def make_call_id() -> str:
    """A tool call id as OpenAI spells them: `call_` and 24 random hex digits."""
    return "call_" + secrets.token_hex(12)


_ALNUM = string.ascii_letters + string.digits


def make_mistral_call_id() -> str:
    """Nine random letters and digits: Mistral's chat templates refuse any other id shape."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


@dataclass
class ToolCall:
    """One function call: `arguments` is JSON text (an object), as OpenAI sends it."""

    name: str
    arguments: str
    id: str = field(default_factory=make_call_id)
    type: str = "function"

    def to_openai(self) -> dict:
        """The `message.tool_calls[]` entry of a chat completion."""
        return {"id": self.id, "type": self.type,
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ExtractedToolCalls:
    """A whole completion split into its text (None when empty) and its tool calls."""

    content: str | None
    calls: list[ToolCall]

    @property
    def called(self) -> bool:
        """True when the completion holds at least one call (finish_reason "tool_calls")."""
        return bool(self.calls)


@dataclass
class ContentDelta:
    """More message text."""

    text: str


@dataclass
class ToolCallDelta:
    """A piece of tool call `index`: the first piece of a call carries id, type and name;
    every piece may carry a fragment of the arguments' JSON text."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    type: str | None = None

    def to_openai(self) -> dict:
        """The `delta.tool_calls[]` entry of a chat completion chunk."""
        out: dict = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
            out["type"] = self.type or "function"
        function: dict = {"arguments": self.arguments}
        if self.name is not None:
            function = {"name": self.name, "arguments": self.arguments}
        out["function"] = function
        return out


Delta = ContentDelta | ToolCallDelta
