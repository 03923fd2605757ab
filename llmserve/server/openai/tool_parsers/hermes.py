"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
repeated for parallel calls."""

from __future__ import annotations

from llmserve.server.openai.tool_parsers.base import Block, PartCall, ToolParser, take_call
from llmserve.server.openai.tool_parsers.json_scan import ScanCache, skip_ws

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


class HermesToolParser(ToolParser):
    """Calls in `<tool_call>` tags; a last call left unclosed at the end still counts."""

    name = "hermes"
    start_markers = (TOOL_CALL_START,)

    def _find_block(self, text: str, pos: int) -> tuple[int, int] | None:
        at = text.find(TOOL_CALL_START, pos)
        return None if at < 0 else (at, at + len(TOOL_CALL_START))

    def _parse_block(self, text: str, start: int, body: int, final: bool,
                     cache: ScanCache) -> Block:
        calls: list[PartCall] = []
        end = take_call(text, skip_ws(text, body), final, cache, calls, start)
        if isinstance(end, Block):
            return end
        j = skip_ws(text, end)
        if text.startswith(TOOL_CALL_END, j):
            return Block(calls, end=j + len(TOOL_CALL_END))
        if j == len(text):
            return Block(calls, end=j) if final else Block(calls)
        if not final and TOOL_CALL_END.startswith(text[j:]):
            return Block(calls)
        return Block(fail_at=start)
