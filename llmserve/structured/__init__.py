"""Constrained decoding: grammar backends behind one interface (llguidance default, xgrammar
optional), compiled off the step loop and cached, with token bitmasks filled on the host."""

from llmserve.structured.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from llmserve.structured.backends import BACKENDS, create_backend
from llmserve.structured.manager import StructuredOutputManager
from llmserve.structured.masks import GrammarMasks, grammar_masks
from llmserve.structured.request_grammar import RequestGrammar
from llmserve.structured.spec import GrammarSpec

__all__ = [
    "BACKENDS",
    "CompiledGrammar",
    "GrammarBackend",
    "GrammarMasks",
    "GrammarMatcher",
    "GrammarSpec",
    "RequestGrammar",
    "StructuredOutputManager",
    "create_backend",
    "grammar_masks",
]
