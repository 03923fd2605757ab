"""Incremental detokenizing: generated token ids to text deltas that never split a character."""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence
from typing import Protocol


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (`llmserve.tokenizer.Tokenizer` has it); a
    protocol, so this module does not import the tokenizer module that re-exports it."""

    @property
    def special_token_ids(self) -> frozenset[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...


class IncrementalDetokenizer:
    """Turn generated token ids into text deltas that never split a UTF-8 character.

    Keeps two offsets into the token list: text is decoded from ``prefix_offset`` (a few tokens
    of already emitted context, which decoders such as SentencePiece need for spacing) and the
    delta is whatever that window adds beyond ``read_offset``. Each ``add`` decodes a window of a
    few tokens, so the cost per token does not grow with the length of the output. Text is held
    back only while the raw bytes end inside a character that later bytes may complete; bytes
    that can never form a character are emitted as U+FFFD, exactly as a full decode shows them.
    """

    # Prompt tokens kept as decoding context; more than any tokenizer merges across.
    _CONTEXT = 5
    # Bound on held-back tokens for tokenizers whose token bytes are not exact.
    _MAX_PENDING = 8

    def __init__(self, tokenizer: TokenDecoder, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = list(prompt_token_ids)
        self._num_prompt = len(self._ids)
        self._read = len(self._ids)
        self._prefix = max(self._read - self._CONTEXT, 0)
        if self._read and self._ends_mid_character(self._prefix):
            # A token-id prompt that stops inside a character: decode the output on its own,
            # as a full decode of the output tokens would.
            self._prefix = self._read
        self._parts: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids so far (without the prompt)."""
        return self._ids[self._num_prompt:]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly completed text ('' while held back)."""
        self._ids.append(token_id)
        return self._emit(force=False)

    def flush(self) -> str:
        """Emit held-back bytes (as U+FFFD) once generation is over; '' if nothing is held."""
        return self._emit(force=True)

    def _ends_mid_character(self, start: int) -> bool:
        """True when the bytes of tokens ``start:`` end with the start of an unfinished char."""
        tail = b""
        for token_id in reversed(self._ids[start:]):
            if self._skip and token_id in self._tok.special_token_ids:
                continue  # skipped specials do not separate bytes in the decoded text
            tail = self._tok.token_bytes(token_id) + tail
            if len(tail) >= 3:
                break
        # An unfinished character has at most 3 bytes so far; its lead byte can never be a
        # continuation byte, so looking at the last 3 bytes alone is exact.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        decoder.decode(tail[-3:], final=False)
        return bool(decoder.getstate()[0])

    def _emit(self, force: bool) -> str:
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix:self._read], self._skip)
        new_text = self._tok.decode(self._ids[self._prefix:], self._skip)
        if (not force and new_text.endswith("\ufffd")
                and len(self._ids) - self._read < self._MAX_PENDING
                and self._ends_mid_character(self._read)):
            return ""
        # The window normally extends the context's text; if a decoder rewrote the context
        # (spacing clean-up), take what follows the part both agree on.
        if new_text.startswith(prefix_text):  # the usual case, without commonprefix's Python loop
            delta = new_text[len(prefix_text):]
        else:
            delta = new_text[len(os.path.commonprefix([prefix_text, new_text])):]
        self._prefix, self._read = self._read, len(self._ids)
        if delta:
            self._parts.append(delta)
        return delta
