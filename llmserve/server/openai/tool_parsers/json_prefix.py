"""Is this text the beginning of some valid JSON value? (strict, as `json.loads` reads it)

A stream sends a call's arguments as they come; checking each prefix lets a call whose JSON
goes wrong be recognised as text before any of it has been sent, in most cases.
"""

from __future__ import annotations

import re

_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*'
_LEXEME = re.compile(
    r"(?P<ws>[ \t\n\r]+)|(?P<punct>[{}\[\],:])"
    rf"|(?P<string>{_STRING}\")|(?P<open_string>{_STRING}(?:\\(?:u[0-9a-fA-F]{{0,3}})?)?\Z)"
    r"|(?P<number>-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?(?![\d.eE+\-]))"
    r"|(?P<open_number>-?(?:0|[1-9]\d*)?(?:\.\d*)?(?:[eE][+-]?\d*)?\Z)"
    r"|(?P<literal>true|false|null)|(?P<open_literal>(?:t|tr|tru|f|fa|fal|fals|n|nu|nul)\Z)")
_VALUE_STARTS = {"{": "object", "[": "array"}


def json_prefix_ok(text: str) -> bool:
    """True if some continuation of `text` is one valid JSON value (empty text counts)."""
    return JsonPrefix().check(text, 0, len(text))


class JsonPrefix:
    """Checks ever longer prefixes of one JSON text, resuming after the part already checked
    (the text before `stop` must not change between calls)."""

    def __init__(self) -> None:
        self._stack: list[str] = []  # "object" / "array"
        # value | key | key_or_end | colon | comma_or_end | value_or_end | done | error
        self._expect = "value"
        self._pos: int | None = None

    def check(self, text: str, start: int, stop: int) -> bool:
        """Is `text[start:stop]` the start of a valid JSON value?"""
        pos = start if self._pos is None else self._pos
        while pos < stop and self._expect != "error":
            m = _LEXEME.match(text, pos, stop)
            if m is None or m.end() == pos:
                self._expect = "error"
                break
            kind = m.lastgroup
            if kind.startswith("open_"):
                # The text ends inside this lexeme: fine where a value (or a key) may go.
                return self._expect in ("value", "value_or_end") or (
                    kind == "open_string" and self._expect in ("key", "key_or_end"))
            if m.end() == stop and kind in ("number", "literal"):
                return self._expect in ("value", "value_or_end")  # it may still grow
            if kind != "ws":
                self._expect = _step(self._stack, self._expect, kind, m.group())
            pos = self._pos = m.end()
        return self._expect != "error"


def _step(stack: list[str], expect: str, kind: str, tok: str) -> str:
    """The state after one whole lexeme, or "error"."""
    if expect in ("value", "value_or_end"):
        if expect == "value_or_end" and tok == "]":
            return _close(stack, "array")
        if tok in _VALUE_STARTS:
            stack.append(_VALUE_STARTS[tok])
            return "key_or_end" if tok == "{" else "value_or_end"
        if kind in ("string", "number", "literal"):
            return _after_value(stack)
        return "error"
    if expect in ("key", "key_or_end"):
        if kind == "string":
            return "colon"
        return _close(stack, "object") if expect == "key_or_end" and tok == "}" else "error"
    if expect == "colon":
        return "value" if tok == ":" else "error"
    if expect == "comma_or_end":
        if tok == ",":
            return "key" if stack[-1] == "object" else "value"
        if tok in "}]":
            return _close(stack, "object" if tok == "}" else "array")
        return "error"
    return "error"  # done: nothing may follow the value


def _close(stack: list[str], kind: str) -> str:
    if not stack or stack[-1] != kind:
        return "error"
    stack.pop()
    return _after_value(stack)


def _after_value(stack: list[str]) -> str:
    return "comma_or_end" if stack else "done"
