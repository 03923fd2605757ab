"""Tool-call grammars, checked with llguidance itself over a byte-level vocabulary: they take
the parsers' own text, refuse wrong names and arguments, and whatever a random "model" samples
under them parses back into calls whose arguments validate."""

from __future__ import annotations

import json
import random

import jsonschema
import llguidance
import numpy as np
import pytest

from llmserve.server.openai.tool_parsers import (
    get_tool_parser,
    tool_call_grammar,
    tool_marker_tokens,
)

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city", "unit"],
    "properties": {"city": {"type": "string", "maxLength": 6},
                   "unit": {"enum": ["c", "f"]}}}}}
COUNT = {"type": "function", "function": {"name": "count", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["n", "exact"],
    "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                   "exact": {"type": "boolean"}}}}}
TOOLS = [WEATHER, COUNT]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
SPECIALS = ["<eos>", "[TOOL_CALLS]", "[ARGS]"]
EOS = 256


class _ByteTokenizer:
    """256 byte tokens, then the special tokens."""

    eos_token_id = EOS
    bos_token_id = None
    tokens = [bytes([i]) for i in range(256)] + [s.encode() for s in SPECIALS]
    special_token_ids = list(range(256, 256 + len(SPECIALS)))

    def __call__(self, data):
        return list(data if isinstance(data, bytes) else data.encode())


TOKENIZER = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteTokenizer()))
SPECIAL_IDS = {s: 256 + k for k, s in enumerate(SPECIALS)}


def encode(text: str, specials: dict[str, int]) -> list[int]:
    """Bytes, except that the given special tokens' text becomes their ids."""
    ids: list[int] = []
    while text:
        hits = [(text.find(s), s) for s in specials if s in text]
        if not hits:
            return ids + list(text.encode())
        at, s = min(hits)
        ids += list(text[:at].encode()) + [specials[s]]
        text = text[at + len(s):]
    return ids


def decode(ids: list[int]) -> str:
    return b"".join(_ByteTokenizer.tokens[i] for i in ids if i != EOS).decode()


def accepts(grammar: str, text: str, specials: dict[str, int]) -> bool:
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(encode(text, specials)) and matcher.is_accepting()


def sample(grammar: str, rng: random.Random, limit: int = 400) -> list[int]:
    """Random tokens among those the grammar allows, until EOS: a random model, constrained."""
    matcher = llguidance.LLMatcher(TOKENIZER, grammar, log_level=0)
    out: list[int] = []
    for _ in range(limit):
        bits = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.flatnonzero(np.unpackbits(bits, bitorder="little")[:TOKENIZER.vocab_size])
        token = int(rng.choice(list(allowed)))
        if token == EOS:
            return out
        assert matcher.consume_token(token), matcher.get_error()
        out.append(token)
    raise AssertionError("no end within the limit: " + decode(out))


def hermes_call(name: str, args: dict) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


GOOD_W = {"city": "Paris", "unit": "c"}
GOOD_C = {"n": 3, "exact": True}


def test_hermes_required_accepts_native_text_and_refuses_wrong_calls():
    g = tool_call_grammar("hermes", TOOLS, "required", True)
    assert llguidance.LLMatcher.validate_grammar(g, TOKENIZER) == ""
    both = hermes_call("get_weather", GOOD_W) + "\n" + hermes_call("count", GOOD_C)
    assert accepts(g, both, {})
    assert accepts(g, hermes_call("count", GOOD_C), {})
    assert accepts(g, "\n\n" + hermes_call("count", GOOD_C), {})  # as after </think>
    for bad in [hermes_call("get_time", GOOD_W), hermes_call("get_weather", GOOD_C),
                hermes_call("get_weather", {"city": "Paris"}),
                hermes_call("get_weather", {"city": "Paris", "unit": "k"}),
                hermes_call("count", {"n": "3", "exact": True}),
                hermes_call("get_weather", {**GOOD_W, "extra": 1}),
                "Sure! " + hermes_call("count", GOOD_C), "\n\n\n" + hermes_call("count", GOOD_C),
                ""]:
        assert not accepts(g, bad, {}), bad
    single = tool_call_grammar("hermes", TOOLS, "required", parallel_tool_calls=False)
    assert accepts(single, hermes_call("count", GOOD_C), {})
    assert not accepts(single, both, {})


def test_named_function_allows_only_that_function():
    choice = {"type": "function", "function": {"name": "count"}}
    g = tool_call_grammar("hermes", TOOLS, choice, True)
    assert accepts(g, hermes_call("count", GOOD_C), {})
    assert not accepts(g, hermes_call("get_weather", GOOD_W), {})
    assert not accepts(g, hermes_call("count", GOOD_C) + "\n" + hermes_call("count", GOOD_C), {})


def test_llama3_and_mistral_formats():
    llama = tool_call_grammar("llama3_json", TOOLS, "required", True)
    call_w = json.dumps({"name": "get_weather", "parameters": GOOD_W})
    call_c = json.dumps({"name": "count", "parameters": GOOD_C})
    assert accepts(llama, call_w + "; " + call_c, {})
    assert not accepts(llama, json.dumps({"name": "count", "arguments": GOOD_C}), {})
    specials = {"[TOOL_CALLS]": SPECIAL_IDS["[TOOL_CALLS]"]}
    listed = tool_call_grammar("mistral", TOOLS, "required", True, specials)
    text = "[TOOL_CALLS][" + json.dumps({"name": "count", "arguments": GOOD_C}) + "]"
    assert accepts(listed, text, specials)
    assert not accepts(listed, text, {})  # the marker spelled out is not the special token
    v11 = tool_call_grammar("mistral", TOOLS, "required", True, SPECIAL_IDS)
    text = ("[TOOL_CALLS]get_weather[ARGS]" + json.dumps(GOOD_W) + "[TOOL_CALLS]count[ARGS]"
            + json.dumps(GOOD_C))
    assert accepts(v11, text, SPECIAL_IDS)
    assert not accepts(v11, "[TOOL_CALLS]count[ARGS]" + json.dumps(GOOD_W), SPECIAL_IDS)


@pytest.mark.parametrize("parser,specials", [
    ("hermes", {}), ("llama3_json", {}), ("mistral", {"[TOOL_CALLS]": 257}),
    ("mistral", SPECIAL_IDS),
])
@pytest.mark.parametrize("parallel", [True, False])
def test_sampled_outputs_always_parse_into_valid_calls(parser, specials, parallel):
    grammar = tool_call_grammar(parser, TOOLS, "required", parallel, specials)
    rng = random.Random(7)
    for _ in range(5):
        text = decode(sample(grammar, rng))
        result = get_tool_parser(parser)(parallel_tool_calls=parallel).extract(text)
        assert result.calls and result.content is None, text
        assert parallel or len(result.calls) == 1
        for call in result.calls:
            jsonschema.validate(json.loads(call.arguments), PARAMS[call.name])


def test_tools_with_refs_to_their_own_defs():
    # pydantic writes nested models as $defs + $ref; both tools name theirs "Item"
    def tool(name, kind):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "required": ["item"], "properties": {"item": {"$ref": "#/$defs/Item"}},
            "$defs": {"Item": {"type": "object", "required": ["v"],
                               "properties": {"v": {"type": kind}}}}}}}
    tools = [tool("a", "integer"), tool("b", "string")]
    g = tool_call_grammar("hermes", tools, "required", True)
    assert accepts(g, hermes_call("a", {"item": {"v": 1}}), {})
    assert accepts(g, hermes_call("b", {"item": {"v": "x"}}), {})
    assert not accepts(g, hermes_call("a", {"item": {"v": "x"}}), {})
    v11 = tool_call_grammar("mistral", tools, "required", True, SPECIAL_IDS)
    assert accepts(v11, '[TOOL_CALLS]b[ARGS]{"item": {"v": "x"}}', SPECIAL_IDS)
    assert not accepts(v11, '[TOOL_CALLS]b[ARGS]{"item": {"v": 2}}', SPECIAL_IDS)


def test_hermes_markers_as_added_tokens_of_a_hf_tokenizer():
    # Qwen's <tool_call> is an added (not special) token: llguidance matches it by id only.
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE({c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                        []))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken("<tool_call>", special=False), AddedToken("</tool_call>")])
    tok.add_special_tokens([AddedToken("<eos>", special=True)])
    markers = tool_marker_tokens(tok)
    assert markers == {"<tool_call>": 256, "</tool_call>": 257}
    lltok = llguidance.LLTokenizer(tok.to_str(), eos_token=tok.token_to_id("<eos>"))
    grammar = tool_call_grammar("hermes", TOOLS, "required", True, markers)
    text = hermes_call("count", GOOD_C)

    def ok(g, ids):
        m = llguidance.LLMatcher(lltok, g, log_level=0)
        assert not m.is_error(), m.get_error()
        return m.consume_tokens(ids) and m.is_accepting()

    native = tok.encode(text, add_special_tokens=False).ids
    assert native[0] == 256 and native[-1] == 257
    spelled = [t for ch in text for t in tok.encode(ch, add_special_tokens=False).ids]
    assert spelled != native
    assert ok(grammar, native) and not ok(grammar, spelled)
    assert not ok(tool_call_grammar("hermes", TOOLS, "required"), native)


def test_free_choices_and_errors():
    assert tool_call_grammar("hermes", TOOLS, "auto") is None
    assert tool_call_grammar("hermes", TOOLS, "none") is None
    assert tool_call_grammar("hermes", TOOLS, None) is None
    with pytest.raises(ValueError, match="not in tools"):
        tool_call_grammar("hermes", TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ValueError, match="parser"):
        tool_call_grammar("pythonic", TOOLS, "required")
    with pytest.raises(ValueError, match="at least one tool"):
        tool_call_grammar("hermes", [], "required")
    with pytest.raises(ValueError, match="name"):
        tool_call_grammar("hermes", [{"type": "function", "function": {"name": "a b"}}],
                          "required")
    with pytest.raises(ValueError, match="tool_choice"):
        tool_call_grammar("hermes", TOOLS, "sometimes")
