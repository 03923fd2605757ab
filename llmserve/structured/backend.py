"""The grammar-backend interface: compile a spec, match one completion, fill token bitmasks.

A backend turns a `GrammarSpec` into a `CompiledGrammar` (shared, immutable, cached), and a
compiled grammar gives one `GrammarMatcher` per completion. Bitmasks are int32 words, one bit
per token id (bit k of word w is token 32 w + k; 1 = allowed), sized to the MODEL's vocabulary,
which can be larger than the tokenizer's: ids the tokenizer does not know are never allowed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llmserve.structured.spec import GrammarSpec


class GrammarMatcher(ABC):
    """The grammar state of one completion."""

    @abstractmethod
    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False when the grammar does not allow it."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last `num_tokens` accepted tokens."""

    @abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the next token's allowed set into `bitmask[row]` (a CPU int32 tensor)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """True when the grammar is complete and allows nothing but EOS."""

    @property
    @abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed (it then stays failed), or None."""


class CompiledGrammar(ABC):
    """A compiled spec: immutable, shared by every completion that uses it."""

    @abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar."""


class GrammarBackend(ABC):
    """Compiles specs against one tokenizer and model vocabulary."""

    name: str
    vocab_size: int  # the model's: the width of every bitmask, in tokens

    @abstractmethod
    def validate(self, spec: GrammarSpec) -> None:
        """Raise ValueError, naming the offending keyword or position, for a spec this backend
        cannot compile. Fast (no tokenizer needed): called when a request is added."""

    @abstractmethod
    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Compile (slow for large grammars: run it off the step loop). Raises ValueError."""

    def fill_bitmasks(self, matchers: list[tuple[GrammarMatcher, int]],
                      bitmask: torch.Tensor) -> None:
        """Fill `bitmask[row]` for each (matcher, row); backends may do it in parallel."""
        for matcher, row in matchers:
            matcher.fill_bitmask(bitmask, row)

    @property
    def bitmask_words(self) -> int:
        return (self.vocab_size + 31) // 32
