"""Constraints that cannot compile, and token ids outside the vocabulary, are refused when the
request is added (ValueError: HTTP 400), naming what is wrong; nothing is queued."""

from __future__ import annotations

import pytest

from llmserve.config import EngineConfig, ModelConfig
from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams, StructuredOutputsParams
from llmserve.structured.spec import GrammarSpec
from llmserve.structured.xgrammar_backend import check_spec, unsupported_keywords


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine.from_args(tiny_dir, num_kv_blocks=64, block_size=16)


@pytest.mark.parametrize(("so", "named"), [
    (StructuredOutputsParams(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
    (StructuredOutputsParams(json={"type": "objec"}), "objec"),
    (StructuredOutputsParams(json='{"type": '), "not valid JSON"),
    (StructuredOutputsParams(regex="a(b"), "unclosed group"),
    (StructuredOutputsParams(grammar="start: undefined_rule"), "undefined_rule"),
])
def test_bad_constraint_is_refused_at_add(engine, so, named):
    with pytest.raises(ValueError, match=named):
        engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=so))
    assert not engine.has_unfinished_requests()
    assert "bad" not in engine.outputs.groups


def test_params_need_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_token_ids_outside_the_model_vocab_are_refused(engine):
    vocab = engine.runner.vocab_size
    with pytest.raises(ValueError, match="logit_bias token id"):
        engine.add_request("lb", [1, 2], SamplingParams(logit_bias={vocab: 1.0}))
    with pytest.raises(ValueError, match="after_token_ids"):
        engine.add_request("at", [1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(
            regex="a", after_token_ids=[vocab + 5])))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: 101.0})
    assert not engine.has_unfinished_requests()


def test_backend_option_is_checked(tiny_dir):
    with pytest.raises(ValueError, match="structured_outputs_backend"):
        EngineConfig(ModelConfig(tiny_dir), structured_outputs_backend="outlines").validate()


def test_xgrammar_refuses_keywords_it_would_drop():
    schema = {
        "type": "object",
        "properties": {
            "not": {"type": "integer", "multipleOf": 3},  # a property called "not" is fine
            "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
            "nested": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/x"}]},
        },
        "$defs": {"x": {"type": "array", "contains": {"type": "integer"}}},
    }
    assert unsupported_keywords(schema) == ["contains", "multipleOf", "uniqueItems"]
    assert unsupported_keywords({"type": "object", "properties": {"a": {"type": "string"}}}) == []
    with pytest.raises(ValueError, match="multipleOf"):
        check_spec(GrammarSpec("json", '{"type": "integer", "multipleOf": 2}'))
    with pytest.raises(ValueError, match="llguidance"):
        check_spec(GrammarSpec("grammar", "start: 'a'"))
    check_spec(GrammarSpec("regex", "a+"))  # accepted


def test_xgrammar_backend_without_the_package_is_a_clear_error(tiny_dir):
    pytest.importorskip("llguidance")
    try:
        import xgrammar  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="xgrammar"):
            LLMEngine.from_args(tiny_dir, num_kv_blocks=8, structured_outputs_backend="xgrammar")
    else:
        pytest.skip("xgrammar is installed")
