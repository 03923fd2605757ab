"""Incremental scanning of the JSON objects that carry tool calls.

The scanners take the text produced so far and say how far a JSON value reaches, or that it
is not finished yet (None), without parsing it: a string skips in one regex step, so scanning
a call's text again on every streamed token stays cheap.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from llmserve.server.openai.tool_parsers.json_prefix import JsonPrefix

# A whole string literal, an unterminated one (the text ends inside it), a bracket, or a run
# of anything else.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|"|[{}\[\]]|[^"{}\[\]]+', re.S)
# `{"name": "...", "arguments": ` (or "parameters") followed by the `{` of the arguments: the
# shape models emit, which lets the name go out before the arguments are finished.
_HEADER = re.compile(
    r'\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)', re.S)
_WS = re.compile(r"\s*")


def skip_ws(text: str, pos: int) -> int:
    """The first position at or after `pos` that is not whitespace."""
    return _WS.match(text, pos).end()


class ScanCache:
    """Remembers how far values were scanned, so that a stream, whose text only grows,
    scans each character about once rather than once per delta."""

    def __init__(self) -> None:
        self._ends: dict[int, tuple[int, int] | int] = {}  # pos -> (resume at, depth) | end
        self._prefixes: dict[int, JsonPrefix] = {}

    def value_end(self, text: str, pos: int) -> int | None:
        """End of the object or array starting at `text[pos]`, or None if the text ends first.

        Only brackets are balanced; whether the value is valid JSON is checked by the caller
        once the end is known.
        """
        known = self._ends.get(pos, (pos, 0))
        if isinstance(known, int):
            return known
        at, depth = known
        for m in _TOKEN.finditer(text, at):
            tok = m.group()
            if tok == '"':
                self._ends[pos] = (m.start(), depth)
                return None  # the text ends inside a string
            if tok in "{[":
                depth += 1
            elif tok in "}]":
                depth -= 1
                if depth == 0:
                    self._ends[pos] = m.end()
                    return m.end()
            elif depth == 0:
                return None  # not an object or array
            self._ends[pos] = (m.end() if tok[0] in '{}[]"' else m.start(), depth)
        return None

    def prefix_ok(self, text: str, start: int, stop: int) -> bool:
        """Is `text[start:stop]` the start of valid JSON?"""
        return self._prefixes.setdefault(start, JsonPrefix()).check(text, start, stop)


@dataclass
class CallScan:
    """What is known of a `{"name": ..., "arguments": {...}}` object in the text so far.

    `status` is "ok" (complete and valid), "partial" (not finished) or "bad". For "ok",
    `end` is where the object ends. `name`/`arguments` are set once the name is known; for a
    partial object `arguments` is the arguments' text so far.
    """

    status: str
    name: str | None = None
    arguments: str = ""
    end: int = 0


def scan_call(text: str, pos: int, final: bool, cache: ScanCache | None = None,
              name_key: str = "name") -> CallScan:
    """Scan the call object starting at `text[pos]` (a `{`); `final` = no more text comes."""
    cache = cache or ScanCache()
    header = _HEADER.match(text, pos)
    name = _header_name(header)
    if header is not None and name is None:
        return CallScan("bad")
    end = cache.value_end(text, pos)
    if end is None:
        if final or header is None:
            return CallScan("bad" if final else "partial")
        args_end = cache.value_end(text, header.end())
        stop = len(text) if args_end is None else args_end
        arguments = text[header.end():stop]
        if not cache.prefix_ok(text, header.end(), stop):
            return CallScan("bad")  # caught before any of it is streamed
        return CallScan("partial", name, arguments)
    try:
        obj = json.loads(text[pos:end])
    except ValueError:
        return CallScan("bad")
    if not isinstance(obj, dict):
        return CallScan("bad")
    args = obj.get("arguments", obj.get("parameters"))
    if not isinstance(obj.get(name_key), str) or not isinstance(args, dict):
        return CallScan("bad")
    if header is not None:
        # Keep the model's own text of the arguments: it is what the stream already sent.
        return CallScan("ok", name, text[header.end():cache.value_end(text, header.end())], end)
    return CallScan("ok", obj[name_key], json.dumps(args, ensure_ascii=False), end)


def _header_name(header: re.Match | None) -> str | None:
    if header is None:
        return None
    try:
        return json.loads(header.group(1))
    except ValueError:
        return None
