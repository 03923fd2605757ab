"""The optional xgrammar backend produces valid outputs too (skipped where it is not installed)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from llmserve.engine.llm_engine import LLMEngine
from llmserve.sampling_params import SamplingParams, StructuredOutputsParams

pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]},
                   "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "color", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine.from_args(tiny_dir, num_kv_blocks=256, block_size=16,
                               async_scheduling=False, structured_outputs_backend="xgrammar")


def _texts(engine, run, spec: StructuredOutputsParams, seeds=range(3), n=2) -> list[str]:
    for seed in seeds:
        engine.add_request(f"x{seed}-{spec.kind}", [5 + seed, 17, 42],
                           SamplingParams(n=n, seed=seed, temperature=1.0, max_tokens=300,
                                          structured_outputs=spec))
    done = run(engine)
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    outs = [c for out in done.values() for c in out.outputs]
    assert all(c.finish_reason == "stop" for c in outs), [(c.finish_reason, c.text) for c in outs]
    return [c.text for c in outs]


def test_json_schema_outputs_validate(engine, run):
    for text in _texts(engine, run, StructuredOutputsParams(json=SCHEMA)):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_regex_and_choice_hold(engine, run):
    for text in _texts(engine, run, StructuredOutputsParams(regex=r"[a-c]{2,4}-\d")):
        assert re.fullmatch(r"[a-c]{2,4}-\d", text), text
    for text in _texts(engine, run, StructuredOutputsParams(choice=["yes", "no"])):
        assert text in ("yes", "no")


def test_dropped_keywords_are_refused_before_compiling(engine):
    bad = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    with pytest.raises(ValueError, match="uniqueItems"):
        engine.add_request("bad", [5, 6], SamplingParams(
            structured_outputs=StructuredOutputsParams(json=bad)))
