"""Regex, choice and Lark-grammar constraints hold for every sampled completion."""

from __future__ import annotations

import re

import pytest

from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams, StructuredOutputsParams


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine.from_args(tiny_dir, num_kv_blocks=256, block_size=16, async_scheduling=False)


def _sample(engine, run, so: StructuredOutputsParams, n: int = 4, seeds=(0, 1),
            max_tokens: int = 60) -> list:
    for seed in seeds:
        engine.add_request(f"q{seed}", [4, 40 + seed], SamplingParams(
            n=n, seed=seed, temperature=1.0, max_tokens=max_tokens, structured_outputs=so))
    return [c for out in run(engine).values() for c in out.outputs]


def test_regex_holds(engine, run):
    pattern = r"[A-Z][a-z]{1,4}-[0-9]{2,3}"
    outs = _sample(engine, run, StructuredOutputsParams(regex=pattern))
    assert len(outs) == 8
    for c in outs:
        assert c.finish_reason == "stop"
        assert re.fullmatch(pattern, c.text), c.text


def test_choice_holds_and_varies(engine, run):
    choices = ["alpha", "beta gamma", "δέλτα", "{json}"]
    outs = _sample(engine, run, StructuredOutputsParams(choice=choices), seeds=(0, 1, 2))
    assert {c.text for c in outs} <= set(choices)
    assert len({c.text for c in outs}) > 1  # temperature 1: not always the same one


def test_lark_grammar_holds(engine, run):
    grammar = '''
start: "(" expr ")"
expr: NUMBER | expr OP expr
OP: "+" | "*"
NUMBER: /[1-9]/
'''
    outs = _sample(engine, run, StructuredOutputsParams(grammar=grammar), max_tokens=120)
    for c in outs:
        if c.finish_reason == "stop":
            assert re.fullmatch(r"\([1-9]([+*][1-9])*\)", c.text), c.text
        else:  # a random model may keep extending the expression: still a valid prefix
            assert re.fullmatch(r"\([1-9]([+*][1-9])*[+*]?", c.text), c.text


def test_constraint_starts_after_the_marker_tokens(engine, run):
    # Greedy and unconstrained, the model emits some tokens; take the first two as the marker
    # (like the end of a reasoning block): the output is free up to them, constrained after.
    free = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("free", [4, 40], free)
    prefix = run(engine)["free"].outputs[0].token_ids[:2]
    so = StructuredOutputsParams(choice=["yes", "no"], after_token_ids=prefix)
    engine.add_request("after", [4, 40], SamplingParams(temperature=0.0, max_tokens=30,
                                                        structured_outputs=so))
    out = run(engine)["after"].outputs[0]
    assert out.token_ids[:2] == prefix
    tail = engine.tokenizer.decode(out.token_ids[2:])
    assert tail in ("yes", "no"), tail
    assert out.finish_reason == "stop"
