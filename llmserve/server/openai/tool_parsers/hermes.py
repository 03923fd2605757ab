"""Hermes / Qwen2.5 / Qwen3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`,
repeated for parallel calls."""

from __future__ import annotations

from llmserve.server.openai.tool_parsers.base import Block, PartCall, ToolParser
from llmserve.server.openai.tool_parsers.json_scan import ScanCache, scan_call, skip_ws

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
        i = skip_ws(text, body)
        if i == len(text):
            return Block(fail_at=start) if final else Block()
        if text[i] != "{":
            return Block(fail_at=start)
        scan = scan_call(text, i, final, cache)
        if scan.status == "bad":
            return Block(fail_at=start)
        calls = [PartCall(scan.name, scan.arguments)] if scan.name is not None else []
        if scan.status == "partial":
            return Block(calls)
        j = skip_ws(text, scan.end)
        if text.startswith(TOOL_CALL_END, j):
            return Block(calls, end=j + len(TOOL_CALL_END))
        if j == len(text):
            return Block(calls, end=j) if final else Block(calls)
        if not final and TOOL_CALL_END.startswith(text[j:]):
            return Block(calls)
        return Block(fail_at=start)
