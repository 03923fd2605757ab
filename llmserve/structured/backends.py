"""Choosing a grammar backend by name; each is imported only when chosen."""

from __future__ import annotations

from llmserve.structured.backend import GrammarBackend

BACKENDS = ("llguidance", "xgrammar")


def create_backend(name: str, tokenizer, vocab_size: int) -> GrammarBackend:
    """The backend called `name` for this tokenizer (an llmserve Tokenizer) and model vocab."""
    if name == "llguidance":
        from llmserve.structured.llguidance_backend import LLGuidanceBackend

        return LLGuidanceBackend(tokenizer, vocab_size)
    if name == "xgrammar":
        from llmserve.structured.xgrammar_backend import XGrammarBackend

        return XGrammarBackend(tokenizer, vocab_size)
    raise ValueError(f"unknown structured outputs backend {name!r}; expected one of {BACKENDS}")
