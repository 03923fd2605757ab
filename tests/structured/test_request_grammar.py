"""RequestGrammar on the llguidance backend, without an engine: advance, marker, rollback,
termination, and masks sized to the model's vocabulary (wider than the tokenizer's)."""

from __future__ import annotations

from concurrent.futures import Future

import pytest
import torch

from llmserve.structured.llguidance_backend import LLGuidanceBackend
from llmserve.structured.request_grammar import RequestGrammar
from llmserve.structured.spec import GrammarSpec
from llmserve.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def backend(tiny_dir):
    tokenizer = Tokenizer.from_pretrained(tiny_dir)
    return LLGuidanceBackend(tokenizer, tokenizer.vocab_size + 100)  # padded model vocab


def _grammar(backend, regex: str, after=None) -> RequestGrammar:
    future: Future = Future()
    future.set_result(backend.compile(GrammarSpec("regex", regex)))
    g = RequestGrammar(backend, future, after, deadline=float("inf"))
    assert g.poll() == "ready"
    return g


def _allowed(backend, g: RequestGrammar) -> set[int]:
    bitmask = torch.zeros(1, backend.bitmask_words, dtype=torch.int32)
    g.matcher.fill_bitmask(bitmask, 0)
    return {t for t in range(backend.vocab_size) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}


def test_advance_terminate_and_rollback(backend):
    tok = backend.tokenizer
    g = _grammar(backend, "ab")
    a, b = tok.encode("a", add_special_tokens=False), tok.encode("b", add_special_tokens=False)
    out = a + b
    assert g.advance(out) and g.terminated
    eos = set(tok.eos_token_ids)
    assert _allowed(backend, g) <= eos and _allowed(backend, g)
    g.rollback(len(b))
    assert not g.terminated and g.num_seen == len(a)
    assert set(b) <= _allowed(backend, g)
    assert not g.advance(a + a) and g.error  # "aa" breaks the grammar


def test_constraint_starts_after_marker(backend):
    tok = backend.tokenizer
    marker = tuple(tok.encode("xyz", add_special_tokens=False))
    g = _grammar(backend, "[0-9]+", after=marker)
    free = tok.encode("hello ", add_special_tokens=False)
    assert g.advance(free) and not g.active  # free text before the marker
    assert g.advance(free + list(marker)) and g.active and g.start == len(free) + len(marker)
    allowed = _allowed(backend, g)
    assert all(tok.decode([t]).isdigit() for t in allowed)
    assert not allowed & set(range(tok.vocab_size, backend.vocab_size))  # padding never allowed
