"""ToolParser: split a completion into text and tool calls, whole or as a stream.

Each format says where a block of calls starts (`_find_block`) and how to read one
(`_parse_block`); this class does the rest the same way for all of them. A stream re-reads
only the unfinished tail of the text and sends the difference from what it already sent, and
the whole-text form is the same reading with `final=True`, so the two agree by construction.

Whitespace next to a call is not content. Text that could be the start of a block marker, or
trailing whitespace, is held back until the next piece of text decides it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from llmserve.server.openai.tool_parsers.json_scan import ScanCache, scan_call
from llmserve.server.openai.tool_parsers.types import (
    ContentDelta,
    Delta,
    ExtractedToolCalls,
    ToolCall,
    ToolCallDelta,
    make_call_id,
)


@dataclass
class PartCall:
    """A call read from the text; its arguments may still be growing while streaming."""

    name: str
    arguments: str


@dataclass
class Block:
    """The reading of one block of calls.

    `end` is where the block ends (None: the text ends first, only when not final).
    `fail_at` set means the text from there on is not calls after all; the calls before it
    stand.
    """

    calls: list[PartCall] = field(default_factory=list)
    end: int | None = None
    fail_at: int | None = None


def take_call(text: str, i: int, final: bool, cache: ScanCache, calls: list[PartCall],
              fail_at: int) -> Block | int:
    """Read the JSON call object at `i` into `calls`: the index just past it when it is
    complete, else the Block that ends the reading (the text ends, no `{` there, bad JSON from
    `fail_at` on, or a call still streaming)."""
    if i == len(text):
        return Block(calls, fail_at=fail_at) if final else Block(calls)
    if text[i] != "{":
        return Block(calls, fail_at=fail_at)
    scan = scan_call(text, i, final, cache)
    if scan.status == "bad":
        return Block(calls, fail_at=fail_at)
    if scan.name is not None:
        calls.append(PartCall(scan.name, scan.arguments))
    if scan.status == "partial":
        return Block(calls)
    return scan.end


_DROPPED = object()  # a call past the first when parallel calls are off: not output, not text


@dataclass
class Reading:
    """Items (text or calls, in order) read from `start` on, and how far they are settled:
    `resume` (with the `n_final` items before it, which can no longer change) is the end of
    the last finished block or of text that no block can begin in; `after_call` says which."""

    items: list
    resume: int
    n_final: int
    after_call: bool


class ToolParser(ABC):
    """Extracts tool calls from a model's native format.

    `extract(text)` reads a whole completion; `stream()` gives a `ToolCallStream` that takes
    text deltas. With `parallel_tool_calls=False` only the first call is kept (later ones are
    dropped, not turned into text). Malformed calls come back as text, never as an error.
    """

    name: str = ""
    start_markers: tuple[str, ...] = ()

    def __init__(self, parallel_tool_calls: bool = True) -> None:
        self.parallel_tool_calls = parallel_tool_calls

    @abstractmethod
    def _find_block(self, text: str, pos: int) -> tuple[int, int] | None:
        """(start, body) of the first block at or after `pos`, or None."""

    @abstractmethod
    def _parse_block(self, text: str, start: int, body: int, final: bool,
                     cache: ScanCache) -> Block:
        """Read the block whose marker spans `text[start:body]`."""

    def new_call_id(self) -> str:
        return make_call_id()

    def extract(self, text: str) -> ExtractedToolCalls:
        """Split a whole completion into content (None if empty) and calls."""
        reading = self._read(text, True, 0, 0, ScanCache(), after_call=False)
        content = "".join(i for i in reading.items if isinstance(i, str))
        calls = [ToolCall(i.name, i.arguments, self.new_call_id())
                 for i in reading.items if isinstance(i, PartCall)]
        return ExtractedToolCalls(content or None, calls)

    def stream(self) -> ToolCallStream:
        """A fresh streaming reader for one completion."""
        return ToolCallStream(self)

    def _read(self, text: str, final: bool, start: int, n_calls: int, cache: ScanCache,
              after_call: bool) -> Reading:
        items: list = []
        text_from = search_from = resume = start
        n_final, resume_after_call = 0, after_call
        while True:
            found = self._find_block(text, search_from)
            if found is None:
                tail = text[text_from:]
                if final:
                    items.append(tail)
                    break
                tail = tail[:len(tail) - self._held_len(tail)]
                # Text up to its last non-space character is settled: no block can start in
                # it, and no call can follow it directly.
                settled = len(tail.rstrip())
                items += [tail[:settled], tail[settled:]]
                if settled:
                    resume, n_final, resume_after_call = text_from + settled, len(items) - 1, False
                break
            begin, body = found
            items.append(text[text_from:begin])
            block = self._parse_block(text, begin, body, final, cache)
            for call in block.calls:
                keep = self.parallel_tool_calls or n_calls == 0
                items.append(call if keep else _DROPPED)
                n_calls += 1
            if block.fail_at is not None:
                text_from, search_from = block.fail_at, max(body, block.fail_at + 1)
            elif block.end is None:
                break  # unfinished: the rest is held back
            else:
                text_from = search_from = resume = block.end
                n_final, resume_after_call = len(items), True
        _trim_whitespace(items, after_call=after_call, final=final)
        return Reading(items, resume, n_final, resume_after_call)

    def _held_len(self, tail: str) -> int:
        """How many trailing characters might begin a block marker."""
        held = 0
        for marker in self.start_markers:
            # The longest suffix that is a proper prefix of the marker starts at the earliest
            # occurrence of the marker's first character within reach of the end.
            at = tail.find(marker[0], max(0, len(tail) - len(marker) + 1))
            while at >= 0:
                if marker.startswith(tail[at:]):
                    held = max(held, len(tail) - at)
                    break
                at = tail.find(marker[0], at + 1)
        return held


def _trim_whitespace(items: list, after_call: bool, final: bool) -> None:
    """Drop whitespace next to calls; hold back trailing whitespace while streaming."""
    for k, item in enumerate(items):
        if not isinstance(item, str):
            continue
        if (k > 0 and not isinstance(items[k - 1], str)) or (k == 0 and after_call):
            item = item.lstrip()
        last = k == len(items) - 1
        if (not last and not isinstance(items[k + 1], str)) or (last and not final):
            item = item.rstrip()
        items[k] = item


class ToolCallStream:
    """Streaming reader: `feed(delta_text)` and, at the end, `finish()` return deltas.

    The content deltas concatenate to `extract()`'s content and each call's argument
    fragments to its `arguments`, with one exception: a call whose JSON breaks after its
    arguments started streaming cannot be taken back (the whole-text form reports it as text).
    """

    def __init__(self, parser: ToolParser) -> None:
        self._parser = parser
        self._text = ""
        self._cache = ScanCache()
        self._resume = 0  # the text before this is read for good
        self._after_call = False  # ... and it ends with a call
        self._calls_before = 0  # calls (kept or dropped) before `_resume`
        self._base_calls: list[PartCall] = []
        # Content sent beyond the settled part (settled content is sent as it settles), so
        # that each delta costs the unsettled text only, however long the answer grows.
        self._sent_tail = ""
        self._sent_calls: list[ToolCallDelta] = []  # per call: id/name and arguments sent

    @property
    def tool_calls_sent(self) -> int:
        """How many calls the stream has opened (for finish_reason "tool_calls")."""
        return len(self._sent_calls)

    def feed(self, delta: str) -> list[Delta]:
        """Take more completion text; return what can be sent now."""
        self._text += delta
        return self._advance(final=False)

    def finish(self) -> list[Delta]:
        """The completion ended: release what was held back."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> list[Delta]:
        reading = self._parser._read(self._text, final, self._resume, self._calls_before,
                                     self._cache, self._after_call)
        content = "".join(i for i in reading.items if isinstance(i, str))
        calls = self._base_calls + [i for i in reading.items if isinstance(i, PartCall)]
        out = self._diff(content, calls)
        done = reading.items[:reading.n_final]
        settled = sum(len(i) for i in done if isinstance(i, str))
        self._sent_tail = self._sent_tail[settled:]
        self._base_calls += [i for i in done if isinstance(i, PartCall)]
        self._calls_before += sum(1 for i in done if not isinstance(i, str))
        self._resume, self._after_call = reading.resume, reading.after_call
        return out

    def _diff(self, content: str, calls: list[PartCall]) -> list[Delta]:
        out: list[Delta] = []
        if len(content) > len(self._sent_tail) and content.startswith(self._sent_tail):
            out.append(ContentDelta(content[len(self._sent_tail):]))
            self._sent_tail = content
        for index, call in enumerate(calls):
            if index == len(self._sent_calls):
                first = ToolCallDelta(index, "", self._parser.new_call_id(), call.name,
                                      "function")
                self._sent_calls.append(ToolCallDelta(index, ""))
                out.append(first)
            sent = self._sent_calls[index]
            new = call.arguments
            if len(new) > len(sent.arguments) and new.startswith(sent.arguments):
                fragment = new[len(sent.arguments):]
                sent.arguments = new
                last = out[-1] if out else None
                if isinstance(last, ToolCallDelta) and last.index == index and not last.arguments:
                    last.arguments = fragment
                else:
                    out.append(ToolCallDelta(index, fragment))
        return out
