"""Tool-call parsers for the models' native formats, and grammars that force those formats.

    parser = get_tool_parser("hermes")(parallel_tool_calls=True)
    result = parser.extract(text)          # ExtractedToolCalls(content, calls)
    stream = parser.stream()               # per completion
    deltas = stream.feed(delta_text) ...   # ContentDelta / ToolCallDelta
    deltas = stream.finish()
    grammar = tool_call_grammar("hermes", tools, "required",   # Lark, or None for "auto"
                                special_tokens=tool_marker_tokens(tokenizer))

A parser reads the completion's text, so special-token markers (Mistral's `[TOOL_CALLS]`) must
be kept in it: detokenize with `skip_special_tokens=False` when a tool parser reads it.

Names: "hermes" (Hermes, Qwen2.5, Qwen3), "llama3_json" (Llama 3.x), "mistral".
"""

from __future__ import annotations

from llmserve.server.openai.tool_parsers.base import ToolCallStream, ToolParser
from llmserve.server.openai.tool_parsers.grammar import tool_call_grammar, tool_marker_tokens
from llmserve.server.openai.tool_parsers.hermes import HermesToolParser
from llmserve.server.openai.tool_parsers.llama3 import PYTHON_TAG, Llama3JsonToolParser
from llmserve.server.openai.tool_parsers.mistral import TOOL_CALLS, MistralToolParser
from llmserve.server.openai.tool_parsers.types import (
    ContentDelta,
    Delta,
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
)

TOOL_PARSERS: dict[str, type[ToolParser]] = {
    p.name: p for p in (HermesToolParser, Llama3JsonToolParser, MistralToolParser)
}


def get_tool_parser(name: str) -> type[ToolParser]:
    """The parser class registered under `name`; ValueError names the known ones."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown tool-call parser {name!r}; "
                         f"choose one of {sorted(TOOL_PARSERS)}") from None


def detect_tool_parser(chat_template: str | None) -> str | None:
    """Guess the parser from a chat template's text (None if it shows no known format)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return "hermes"
    if TOOL_CALLS in chat_template:
        return "mistral"
    if PYTHON_TAG in chat_template or (
            '"parameters"' in chat_template and "<|start_header_id|>" in chat_template):
        return "llama3_json"
    return None


__all__ = [
    "TOOL_PARSERS", "ContentDelta", "Delta", "ExtractedToolCalls", "ToolCall", "ToolCallDelta",
    "ToolCallStream", "ToolParser", "detect_tool_parser", "get_tool_parser", "tool_call_grammar",
    "tool_marker_tokens",
]
