"""Llama 3.x JSON calls: `{"name": ..., "parameters": {...}}`, optionally after
`<|python_tag|>`, several separated by `;`."""

from __future__ import annotations

from llmserve.server.openai.tool_parsers.base import Block, PartCall, ToolParser, take_call
from llmserve.server.openai.tool_parsers.json_scan import ScanCache, skip_ws

PYTHON_TAG = "<|python_tag|>"


class Llama3JsonToolParser(ToolParser):
    """Calls are a completion that starts with `{`, or the text after `<|python_tag|>`."""

    name = "llama3_json"
    start_markers = (PYTHON_TAG,)

    def _find_block(self, text: str, pos: int) -> tuple[int, int] | None:
        if pos == 0:
            first = skip_ws(text, 0)
            if text.startswith("{", first):
                return first, first
        at = text.find(PYTHON_TAG, pos)
        return None if at < 0 else (at, at + len(PYTHON_TAG))

    def _parse_block(self, text: str, start: int, body: int, final: bool,
                     cache: ScanCache) -> Block:
        calls: list[PartCall] = []
        i, fail_at = skip_ws(text, body), start
        while True:
            end = take_call(text, i, final, cache, calls, fail_at)
            if isinstance(end, Block):
                return end
            j = skip_ws(text, end)
            if j == len(text) and not final:
                return Block(calls)  # a `;` and another call may follow
            if not text.startswith(";", j):
                return Block(calls, end=end)
            k = skip_ws(text, j + 1)
            if k == len(text):
                return Block(calls, end=k) if final else Block(calls)
            if text[k] != "{":
                return Block(calls, end=end)
            i, fail_at = k, k
