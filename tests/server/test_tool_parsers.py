"""Tool-call parsers: whole-text extraction and streaming, which must agree for any chunking."""

from __future__ import annotations

import json
import random
import re

import pytest

from llmserve.server.openai.tool_parsers import (
    ContentDelta,
    ToolCallDelta,
    detect_tool_parser,
    get_tool_parser,
)

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}'


def hermes(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def run_stream(parser, chunks: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Feed `chunks`; check the delta protocol; return (content, [(name, arguments)])."""
    stream = parser.stream()
    deltas = []
    for chunk in chunks:
        deltas += stream.feed(chunk)
    deltas += stream.finish()
    content, calls, ids = "", [], set()
    for d in deltas:
        if isinstance(d, ContentDelta):
            assert d.text
            content += d.text
            continue
        assert isinstance(d, ToolCallDelta)
        if d.index == len(calls):  # the first delta of a call opens it
            assert d.id and d.name and d.type == "function" and d.id not in ids
            ids.add(d.id)
            calls.append([d.name, d.arguments])
        else:
            assert d.index == len(calls) - 1 and d.id is None and d.name is None
            calls[d.index][1] += d.arguments
    return content or None, [tuple(c) for c in calls]


def check_all_splits(parser, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """Streamed == extracted for every 2-way split, char by char, and random chunkings."""
    whole = parser.extract(text)
    expected = (whole.content, [(c.name, c.arguments) for c in whole.calls])
    splits = [[text[:k], text[k:]] for k in range(len(text) + 1)] + [list(text)]
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1)))
        splits.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for chunks in splits:
        assert run_stream(parser, chunks) == expected, chunks
    return expected


def args(text: str) -> dict:
    return json.loads(text)


# --- Hermes / Qwen ------------------------------------------------------------------------

def test_hermes_single_call_with_text_before():
    p = get_tool_parser("hermes")()
    content, calls = check_all_splits(p, "Let me check.\n" + hermes(WEATHER))
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    out = p.extract("Let me check.\n" + hermes(WEATHER))
    assert out.called and re.fullmatch(r"call_[0-9a-f]{24}", out.calls[0].id)
    assert out.calls[0].to_openai()["function"]["name"] == "get_weather"


def test_hermes_parallel_calls_and_text_after():
    p = get_tool_parser("hermes")()
    text = hermes(WEATHER) + "\n" + hermes(TIME) + "\nDone."
    content, calls = check_all_splits(p, text)
    assert content == "Done."
    assert [c[0] for c in calls] == ["get_weather", "get_time"]
    assert args(calls[1][1]) == {"tz": "Europe/Paris"}


def test_hermes_parallel_off_keeps_first_call_only():
    p = get_tool_parser("hermes")(parallel_tool_calls=False)
    content, calls = check_all_splits(p, hermes(WEATHER) + "\n" + hermes(TIME))
    assert content is None and [c[0] for c in calls] == ["get_weather"]


@pytest.mark.parametrize("block", [
    "<tool_call>\nnot json at all\n</tool_call>",
    '<tool_call>\n{"name": get_weather}\n</tool_call>',
    '<tool_call>\n{"arguments": {"a": 1}, "name": "f"\n</tool_call>',
    '<tool_call>{"name": "f"}</tool_call>',
    '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
])
def test_hermes_malformed_call_is_content(block):
    p = get_tool_parser("hermes")()
    text = "Hi " + block + " bye"
    content, calls = check_all_splits(p, text)
    assert calls == [] and content == text


def test_hermes_unclosed_last_call_counts_and_plain_text_passes_through():
    p = get_tool_parser("hermes")()
    _, calls = check_all_splits(p, hermes(WEATHER)[:-len("</tool_call>")])
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}')]
    text = "a < b and <tool> is not <tool_call, ok\n\n"
    assert check_all_splits(p, text) == (text, [])


def test_hermes_other_key_order_and_unicode_arguments():
    p = get_tool_parser("hermes")()
    _, calls = check_all_splits(p, '<tool_call>{"arguments": {"q": "é{}"}, "name": "s"}'
                                   "</tool_call>")
    assert calls == [("s", '{"q": "é{}"}')]
    _, calls = check_all_splits(p, hermes('{"name": "s", "arguments": {"q": "}\\"{ é"}}'))
    assert args(calls[0][1]) == {"q": '}"{ é'}


def test_hermes_stream_sends_name_before_arguments_finish():
    p = get_tool_parser("hermes")()
    stream = p.stream()
    assert stream.feed("<tool_") == []  # a partial tag is held back
    deltas = stream.feed('call>\n{"name": "get_weather", "arguments": {"ci')
    assert len(deltas) == 1 and deltas[0].name == "get_weather"
    assert deltas[0].arguments == '{"ci'
    assert stream.feed('ty": "Oslo"}}\n</tool_call>')[0].arguments == 'ty": "Oslo"}'
    assert stream.finish() == [] and stream.tool_calls_sent == 1


# --- Llama 3.x JSON -----------------------------------------------------------------------

LLAMA_WEATHER = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
LLAMA_TIME = '{"name": "get_time", "parameters": {"tz": "UTC"}}'


@pytest.mark.parametrize("text", [
    LLAMA_WEATHER, " " + LLAMA_WEATHER, "<|python_tag|>" + LLAMA_WEATHER,
])
def test_llama3_single_call(text):
    content, calls = check_all_splits(get_tool_parser("llama3_json")(), text)
    assert content is None and calls == [("get_weather", '{"city": "Paris"}')]


def test_llama3_parallel_semicolon_and_text_before_tag():
    p = get_tool_parser("llama3_json")()
    content, calls = check_all_splits(p, LLAMA_WEATHER + "; " + LLAMA_TIME)
    assert content is None and [c[0] for c in calls] == ["get_weather", "get_time"]
    content, calls = check_all_splits(p, "Sure.<|python_tag|>" + LLAMA_WEATHER + ";" + LLAMA_TIME)
    assert content == "Sure." and len(calls) == 2
    one = get_tool_parser("llama3_json")(parallel_tool_calls=False)
    assert check_all_splits(one, LLAMA_WEATHER + "; " + LLAMA_TIME)[1] == calls[:1]


@pytest.mark.parametrize("text", [
    '{"answer": 42}', "The answer is {x}.", '{"name": "f", "parameters": [1]}',
    "<|python_tag|>brave_search.call(query=\"x\")",
])
def test_llama3_non_calls_are_content(text):
    assert check_all_splits(get_tool_parser("llama3_json")(), text) == (text, [])


def test_arguments_that_turn_invalid_are_content_when_seen_whole():
    # Once a call's name and the start of its arguments are out, the stream cannot take them
    # back; whole and in one chunk, the broken call is text.
    p = get_tool_parser("llama3_json")()
    text = '{"name": "f", "parameters": {"a": tru}}'
    assert p.extract(text).content == text and not p.extract(text).calls
    assert run_stream(p, [text]) == (text, [])
    assert run_stream(p, ['{"name": "f", "parameters": {"a": tr', 'u}}'])[1] == [("f", '{"a": tr')]
    mistral = get_tool_parser("mistral")()
    assert run_stream(mistral, ["[TOOL_CALLS]f[ARGS]{bad}"]) == ("[TOOL_CALLS]f[ARGS]{bad}", [])


def test_json_prefix_check():
    from llmserve.server.openai.tool_parsers.json_prefix import json_prefix_ok

    for good in ['{"a": [1, 2.5e3, true, null, "x\\u00e9"], "b": {}}', '[[{"a": []}]]']:
        json.loads(good)
        assert all(json_prefix_ok(good[:k]) for k in range(len(good) + 1))
    for bad in ['{"a": tru}', '{"a" 1}', '{"a": 1,}', '{1: 2}', '[1 2]', '{"a": 01}',
                '{"a": "x\ny"}', '{"a": 1}}', '{"a": 1]', '{"a": "\\x"}']:
        with pytest.raises(ValueError):
            json.loads(bad)
        assert not json_prefix_ok(bad), bad


# --- Mistral ------------------------------------------------------------------------------

def test_mistral_list_form_single_and_parallel():
    p = get_tool_parser("mistral")()
    content, calls = check_all_splits(p, "Checking. [TOOL_CALLS][" + WEATHER + ", " + TIME + "]")
    assert content == "Checking." and [c[0] for c in calls] == ["get_weather", "get_time"]
    out = p.extract("[TOOL_CALLS][" + WEATHER + "]")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", out.calls[0].id)
    assert out.content is None and args(out.calls[0].arguments)["city"] == "Paris"


def test_mistral_v11_form_single_and_parallel():
    p = get_tool_parser("mistral")()
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'
    content, calls = check_all_splits(p, text)
    assert content is None and calls == [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")]
    one = get_tool_parser("mistral")(parallel_tool_calls=False)
    assert check_all_splits(one, text)[1] == calls[:1]


@pytest.mark.parametrize("text", [
    "[TOOL_CALLS]not a call", "[TOOL_CALLS][oops]", '[TOOL_CALLS]f[ARGS][1, 2]',
    '[TOOL_CALLS][{"name": "f", "argument": {}}]', "[TOOL_CALLS]f[ARGS]nope",
    "[TOOL_CALLS]f[ARG",
])
def test_mistral_malformed_is_content(text):
    assert check_all_splits(get_tool_parser("mistral")(), text) == (text, [])


# --- registry -----------------------------------------------------------------------------

def test_registry_and_detection():
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    assert detect_tool_parser('{{- "<tool_call>\\n" }}{{ tool_call | tojson }}') == "hermes"
    assert detect_tool_parser("{{ '[AVAILABLE_TOOLS]' }}{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_tool_parser("{{- '<|python_tag|>' + tool_call.name }}") == "llama3_json"
    assert detect_tool_parser("{{ message.content }}") is None
    assert detect_tool_parser(None) is None


def test_delta_to_openai_shapes():
    first = ToolCallDelta(0, '{"a', "call_x", "f", "function").to_openai()
    assert first == {"index": 0, "id": "call_x", "type": "function",
                     "function": {"name": "f", "arguments": '{"a'}}
    assert ToolCallDelta(0, '": 1}').to_openai() == {"index": 0,
                                                     "function": {"arguments": '": 1}'}}
