"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, and the v11 form
`[TOOL_CALLS]name[ARGS]{...}` repeated for parallel calls.

`[TOOL_CALLS]` is a special token, so the completion must be detokenized with
`skip_special_tokens=False` for this parser to see it.
"""

from __future__ import annotations

import json
import re

from llmserve.server.openai.tool_parsers.base import Block, PartCall, ToolParser, take_call
from llmserve.server.openai.tool_parsers.json_scan import ScanCache, skip_ws
from llmserve.server.openai.tool_parsers.types import make_mistral_call_id

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


class MistralToolParser(ToolParser):
    """Both Mistral formats; ids are 9 letters and digits, as Mistral's templates demand."""

    name = "mistral"
    start_markers = (TOOL_CALLS,)

    def new_call_id(self) -> str:
        return make_mistral_call_id()

    def _find_block(self, text: str, pos: int) -> tuple[int, int] | None:
        at = text.find(TOOL_CALLS, pos)
        return None if at < 0 else (at, at + len(TOOL_CALLS))

    def _parse_block(self, text: str, start: int, body: int, final: bool,
                     cache: ScanCache) -> Block:
        i = skip_ws(text, body)
        if i == len(text):
            return Block(fail_at=start) if final else Block()
        if text[i] == "[":
            return self._parse_list(text, start, i + 1, final, cache)
        return self._parse_v11(text, start, i, final, cache)

    def _parse_list(self, text: str, start: int, i: int, final: bool,
                    cache: ScanCache) -> Block:
        calls: list[PartCall] = []
        fail_at = start
        while True:
            end = take_call(text, skip_ws(text, i), final, cache, calls, fail_at)
            if isinstance(end, Block):
                return end
            j = skip_ws(text, end)
            if j == len(text):
                return Block(calls, fail_at=j) if final else Block(calls)
            if text[j] == "]":
                return Block(calls, end=j + 1)
            if text[j] != ",":
                return Block(calls, fail_at=j)
            i, fail_at = j + 1, j

    def _parse_v11(self, text: str, start: int, i: int, final: bool,
                   cache: ScanCache) -> Block:
        name = _NAME.match(text, i)
        if name is None:
            return Block(fail_at=start)
        j = name.end()
        rest = text[j:j + len(ARGS)]
        if not text.startswith(ARGS, j):
            if not final and j + len(rest) == len(text) and ARGS.startswith(rest):
                return Block()
            return Block(fail_at=start)
        k = j + len(ARGS)
        if k == len(text):
            return Block(fail_at=start) if final else Block()
        if text[k] != "{":
            return Block(fail_at=start)
        end = cache.value_end(text, k)
        if end is None:
            if final or not cache.prefix_ok(text, k, len(text)):
                return Block(fail_at=start)
            return Block([PartCall(name.group(), text[k:])])
        try:
            args = json.loads(text[k:end])
        except ValueError:
            args = None
        if not isinstance(args, dict):
            return Block(fail_at=start)
        return Block([PartCall(name.group(), text[k:end])], end=end)
