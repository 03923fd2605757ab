"""The default grammar backend: llguidance (a Rust Earley parser with a lazy lexer).

It loads the model's tokenizer.json directly, compiles lazily (a JSON schema in about a
millisecond), and refuses JSON-schema keywords it does not implement instead of ignoring them.
"""

from __future__ import annotations

import logging
import os
import threading

import llguidance as llg
import torch

from llmserve.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from llmserve.structured.spec import GrammarSpec

logger = logging.getLogger(__name__)

# Runaway whitespace: a model (and surely a random one) can otherwise emit whitespace between
# JSON tokens forever. At most this many whitespace characters at any one place: enough for a
# newline and pretty-print indentation a few levels deep. A schema's "x-guidance" overrides it.
MAX_JSON_WHITESPACE = 12
# Below this many rows the masks are filled one after another: waking a pool of threads costs
# more than a few masks (most take tens of microseconds; a full-vocabulary walk about a ms).
_PARALLEL_FROM_ROWS = 8
JSON_DEFAULTS = {
    "whitespace_flexible": True,
    "whitespace_pattern": r"[\x20\x0A\x0D\x09]" + f"{{0,{MAX_JSON_WHITESPACE}}}",
}


def fill_next_token_bitmask(matcher: llg.LLMatcher, bitmask: torch.Tensor, row: int) -> None:
    """Row `row` of a contiguous int32 CPU bitmask from `matcher`, as llguidance.torch's function
    of that name does. That module is not imported: it applies torch.compile at import, which
    pulls in torch's dynamo and inductor, measured at 3-9 s of engine start-up on 2 cores."""
    _check_bitmask(bitmask)
    v = bitmask[row]
    matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())


def fill_next_token_bitmask_par(executor: llg.LLExecutor, pairs: list[tuple[llg.LLMatcher, int]],
                                bitmask: torch.Tensor) -> None:
    """The rows of many (matcher, row) pairs on llguidance's thread pool, as llguidance.torch's
    function of that name does (see `fill_next_token_bitmask`)."""
    _check_bitmask(bitmask)
    batch, words = bitmask.shape
    executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, batch)


def _check_bitmask(bitmask: torch.Tensor) -> None:
    # The Rust side writes through the raw pointer: anything else would be memory corruption.
    if not (bitmask.dtype == torch.int32 and bitmask.is_cpu and bitmask.dim() == 2
            and bitmask.is_contiguous()):
        raise ValueError(f"a grammar bitmask must be a contiguous 2-d int32 CPU tensor, got "
                         f"{tuple(bitmask.shape)} {bitmask.dtype} on {bitmask.device}")


def grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar of a spec (not yet checked)."""
    if spec.kind in ("json", "json_object"):
        return llg.LLMatcher.grammar_from_json_schema(spec.schema(), defaults=JSON_DEFAULTS)
    if spec.kind == "regex":
        return llg.LLMatcher.grammar_from_regex(spec.text)
    if spec.kind == "choice":
        return llg.grammar_from("choice", spec.text)
    # A Lark grammar (llguidance dialect); llama.cpp's GBNF is converted to Lark.
    return llg.grammar_from("grammar", spec.text)


class LLGuidanceMatcher(GrammarMatcher):
    def __init__(self, matcher: llg.LLMatcher) -> None:
        self.m = matcher

    def accept_token(self, token_id: int) -> bool:
        return self.m.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        fill_next_token_bitmask(self.m, bitmask, row)

    def is_terminated(self) -> bool:
        return self.m.is_stopped()

    @property
    def error(self) -> str | None:
        return self.m.get_error() or None


class LLGuidanceGrammar(CompiledGrammar):
    def __init__(self, template: llg.LLMatcher) -> None:
        self._template = template

    def matcher(self) -> LLGuidanceMatcher:
        # A copy of a matcher that already computed its first mask: no grammar re-parse.
        return LLGuidanceMatcher(self._template.deep_copy())


class LLGuidanceBackend(GrammarBackend):
    """llguidance over an llmserve Tokenizer; bitmasks are `vocab_size` (the model's) wide."""

    name = "llguidance"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._lock = threading.Lock()
        self._ll_tokenizer: llg.LLTokenizer | None = None
        self._executor: llg.LLExecutor | None = None

    @property
    def ll_tokenizer(self) -> llg.LLTokenizer:
        """Built on first use (about a second for a 100k vocabulary): call it off the loop."""
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = build_ll_tokenizer(self.tokenizer, self.vocab_size)
            return self._ll_tokenizer

    def validate(self, spec: GrammarSpec) -> None:
        error = llg.LLMatcher.validate_grammar(_grammar_or_raise(spec))
        if error:
            raise ValueError(f"invalid structured_outputs.{spec.kind}: {error.strip()}")

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        grammar = _grammar_or_raise(spec)
        tok = self.ll_tokenizer
        template = llg.LLMatcher(tok, grammar, log_level=0)
        if template.is_error():
            raise ValueError(f"invalid structured_outputs.{spec.kind}: {template.get_error()}")
        scratch = torch.empty((1, self.bitmask_words), dtype=torch.int32)
        fill_next_token_bitmask(template, scratch, 0)  # the first mask builds the lexer
        return LLGuidanceGrammar(template)

    def fill_bitmasks(self, matchers: list[tuple[GrammarMatcher, int]],
                      bitmask: torch.Tensor) -> None:
        if len(matchers) < _PARALLEL_FROM_ROWS:
            super().fill_bitmasks(matchers, bitmask)
            return
        if self._executor is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            self._executor = llg.LLExecutor(max(1, min(4, cores)))
        pairs = [(m.m, row) for m, row in matchers]  # type: ignore[attr-defined]
        fill_next_token_bitmask_par(self._executor, pairs, bitmask)


def _grammar_or_raise(spec: GrammarSpec) -> str:
    try:
        return grammar_text(spec)
    except ValueError as exc:
        raise ValueError(f"invalid structured_outputs.{spec.kind}: {exc}") from None


def build_ll_tokenizer(tokenizer, vocab_size: int) -> llg.LLTokenizer:
    """An llguidance tokenizer with the model's vocabulary size and the engine's EOS ids.

    Fast path: llguidance reads the tokenizer.json itself. It checks EOS ids against the
    tokenizer's own count before widening to `vocab_size`, which fails for encodings whose
    special ids leave gaps (cl100k): those get a token table built from our tokenizer.
    """
    eos = sorted(t for t in tokenizer.eos_token_ids if t < vocab_size)
    backend = getattr(tokenizer, "_tok", None)  # the tokenizers.Tokenizer inside ours
    if backend is not None:
        try:
            return llg.LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=eos or None)
        except ValueError as exc:
            logger.info("llguidance: tokenizer.json not taken as is (%s); building a table", exc)
    return llg.LLTokenizer(llg.TokenizerWrapper(_TokenTable(tokenizer, vocab_size, eos)),
                           eos_token=eos or None)


class _TokenTable:
    """What llguidance's TokenizerWrapper reads: every id's bytes, specials, encode."""

    def __init__(self, tokenizer, vocab_size: int, eos: list[int]) -> None:
        self._tokenizer = tokenizer
        self.eos_token_id = eos[0] if eos else None
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(i for i in tokenizer.special_token_ids if i < vocab_size)

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)
