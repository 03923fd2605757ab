"""Optional grammar backend: xgrammar (the `xgrammar` extra), for GPU deployments.

xgrammar silently drops some JSON-schema keywords (the output then need not satisfy the
schema), so `validate` refuses every schema that uses one before anything is compiled. It takes
no Lark grammars: `structured_outputs.grammar` needs the llguidance backend. The package is
imported only when this backend is built.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import torch

from llmserve.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from llmserve.structured.spec import GrammarSpec

# Keywords xgrammar ignores (or does not implement) instead of enforcing.
UNSUPPORTED_KEYWORDS = frozenset({
    "multipleOf", "uniqueItems", "contains", "minContains", "maxContains",
    "patternProperties", "propertyNames", "dependentRequired", "dependentSchemas",
    "if", "then", "else", "not", "unevaluatedProperties", "unevaluatedItems",
})
# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE = ("items", "additionalProperties", "additionalItems", "contains", "not", "if", "then",
        "else", "propertyNames", "unevaluatedProperties", "unevaluatedItems")
_LIST = ("allOf", "anyOf", "oneOf", "prefixItems", "items")
_MAP = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_MAX_WHITESPACE = 12  # as llguidance_backend.MAX_JSON_WHITESPACE


def unsupported_keywords(schema: object) -> list[str]:
    """The keywords of `schema` (and its subschemas) that xgrammar would not enforce, sorted.
    Property names are data, not keywords: a property called "not" is fine."""
    return sorted({key for sub in _subschemas(schema) for key in sub
                   if key in UNSUPPORTED_KEYWORDS})


def _subschemas(schema: object) -> Iterator[dict]:
    if not isinstance(schema, dict):
        return
    yield schema
    for key in _ONE:
        if isinstance(schema.get(key), dict):
            yield from _subschemas(schema[key])
    for key in _LIST:
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                yield from _subschemas(sub)
    for key in _MAP:
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                yield from _subschemas(sub)


def check_spec(spec: GrammarSpec) -> None:
    """ValueError for what xgrammar cannot enforce (no xgrammar import needed)."""
    if spec.kind == "grammar":
        raise ValueError("structured_outputs.grammar (a Lark grammar) is not supported by the "
                         "xgrammar backend; start the engine with "
                         "--structured-outputs-backend llguidance")
    if spec.kind == "json":
        bad = unsupported_keywords(spec.schema())
        if bad:
            raise ValueError(f"invalid structured_outputs.json: keyword(s) {bad} are not "
                             "supported by the xgrammar backend")


class XGrammarMatcher(GrammarMatcher):
    def __init__(self, matcher) -> None:
        self.m = matcher
        self._error: str | None = None

    def accept_token(self, token_id: int) -> bool:
        ok = bool(self.m.accept_token(token_id))
        if not ok and self._error is None:
            self._error = f"token {token_id} is not allowed by the grammar"
        return ok

    def rollback(self, num_tokens: int) -> None:
        self.m.rollback(num_tokens)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)

    def is_terminated(self) -> bool:
        return bool(self.m.is_terminated())

    @property
    def error(self) -> str | None:
        return self._error


class XGrammarGrammar(CompiledGrammar):
    def __init__(self, xgr, compiled) -> None:
        self._xgr, self._compiled = xgr, compiled

    def matcher(self) -> XGrammarMatcher:
        return XGrammarMatcher(self._xgr.GrammarMatcher(self._compiled))


class XGrammarBackend(GrammarBackend):
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size: int) -> None:
        try:
            import xgrammar
        except ImportError as exc:
            raise ValueError("the xgrammar backend needs the xgrammar package: "
                             "pip install 'llmserve[xgrammar]'") from exc
        self._xgr = xgrammar
        self.vocab_size = vocab_size
        eos = sorted(t for t in tokenizer.eos_token_ids if t < vocab_size)
        # Raw token bytes for every id of the model's vocabulary (unknown ids: empty).
        vocab = [tokenizer.token_bytes(i) for i in range(min(vocab_size, tokenizer.vocab_size))]
        info = xgrammar.TokenizerInfo(vocab, vocab_type=xgrammar.VocabType.RAW,
                                      vocab_size=vocab_size, stop_token_ids=eos)
        self._compiler = xgrammar.GrammarCompiler(info)

    def validate(self, spec: GrammarSpec) -> None:
        check_spec(spec)

    def compile(self, spec: GrammarSpec) -> XGrammarGrammar:
        check_spec(spec)
        c = self._compiler
        try:
            if spec.kind == "json":
                compiled = c.compile_json_schema(spec.text, any_whitespace=True,
                                                 max_whitespace_cnt=_MAX_WHITESPACE)
            elif spec.kind == "json_object":
                compiled = c.compile_builtin_json_grammar()
            elif spec.kind == "regex":
                compiled = c.compile_regex(spec.text)
            else:  # choice: an EBNF alternation of JSON-escaped literals
                alts = " | ".join(json.dumps(choice) for choice in spec.choices())
                compiled = c.compile_grammar(f"root ::= {alts}")
        except RuntimeError as exc:  # xgrammar reports grammar errors as RuntimeError
            raise ValueError(f"invalid structured_outputs.{spec.kind}: {exc}") from None
        return XGrammarGrammar(self._xgr, compiled)
