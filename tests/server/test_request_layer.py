"""The request layer without a server: bodies → engine requests, crafted outputs → bodies."""

from __future__ import annotations

import json

import pytest
from tool_models import THINKING_OFF, TOOLS, WEATHER, with_template

from llmserve.outputs import CompletionOutput, RequestOutput
from llmserve.server.openai.layer import CHAT_URL, COMPLETIONS_URL, APIError, ModelView, parse_body
from llmserve.tokenizer import Tokenizer

USER = [{"role": "user", "content": "Hi"}]
CALL_TEXT = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}'
             '\n</tool_call>\n<tool_call>\n{"name": "count", "arguments": {"n": 3, "exact": '
             'true}}\n</tool_call>')


@pytest.fixture(scope="module")
def plain(checkpoint) -> ModelView:
    return ModelView.build(Tokenizer.from_pretrained(checkpoint), ["m"], 4096)


@pytest.fixture(scope="module")
def hermes(checkpoint, tmp_path_factory) -> ModelView:
    path = with_template(checkpoint, tmp_path_factory.mktemp("t") / "hermes")
    return ModelView.build(Tokenizer.from_pretrained(path), ["m"], 4096)


@pytest.fixture(scope="module")
def thinking(checkpoint, tmp_path_factory) -> tuple[ModelView, ModelView]:
    """(thinking on, thinking off) Qwen3-style views with the qwen3 reasoning parser."""
    root = tmp_path_factory.mktemp("r")
    on = with_template(checkpoint, root / "on")
    off = with_template(checkpoint, root / "off", opening=THINKING_OFF)
    return tuple(ModelView.build(Tokenizer.from_pretrained(p), ["m"], 4096,
                                 reasoning_parser="qwen3") for p in (on, off))


def _chat(view: ModelView, **body):
    return parse_body(CHAT_URL, {"messages": USER, **body}, view)


def _refused(view: ModelView, url: str = CHAT_URL, **body) -> str:
    with pytest.raises(APIError) as info:
        parse_body(url, {"messages": USER, "prompt": "x", **body}, view)
    assert info.value.status == 400
    return info.value.message


def test_response_formats_become_engine_constraints_with_their_ledger_kind(plain):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    cases = [
        ({"response_format": {"type": "text"}}, None, "text"),
        ({"response_format": {"type": "json_object"}}, "json_object", "json_object"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": schema, "strict": True}}}, "json", "json_schema"),
        ({"structured_outputs": {"regex": "[ab]+"}}, "regex", "regex"),
        ({"structured_outputs": {"json": schema}}, "json", "json_schema"),
        ({"guided_choice": ["yes", "no"]}, "choice", "choice"),
        ({"guided_grammar": 'start: "a"'}, "grammar", "grammar"),
    ]
    for body, kind, ledger in cases:
        for url in (CHAT_URL, COMPLETIONS_URL):
            req = parse_body(url, {"messages": USER, "prompt": "x", **body}, plain)
            so = req.params.structured_outputs
            assert (so.kind if so else None) == kind, body
            assert req.info("e")["response_format"] == ledger
            assert "tool_call_counter" not in req.info("e")
    assert _chat(plain, guided_json=schema).params.structured_outputs.json == schema


def test_conflicting_or_unsupported_fields_are_refused_by_name(plain, hermes):
    assert "at most one of response_format, guided_regex" in _refused(
        plain, response_format={"type": "json_object"}, guided_regex="a")
    assert "structured_outputs" in _refused(plain, structured_outputs={"regex": "a",
                                                                       "choice": ["b"]})
    assert "whitespace_pattern" in _refused(plain, structured_outputs={
        "json": {}, "whitespace_pattern": " "})
    for name in ("functions", "prediction", "web_search_options", "reasoning_effort"):
        assert name in _refused(plain, **{name: {"x": 1}})
    assert "modalities" in _refused(plain, modalities=["text", "audio"])
    assert _chat(plain, modalities=["text"], store=False, service_tier="auto").params
    assert "tool-call-parser" in _refused(plain, tools=[WEATHER])
    assert "not in tools" in _refused(hermes, tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "nope"}})
    assert "only allowed when tools" in _refused(hermes, tool_choice="required")
    assert "cannot be combined" in _refused(hermes, tools=TOOLS, tool_choice="required",
                                            response_format={"type": "json_object"})
    assert "prompt_logprobs is not supported with stream" in _refused(
        plain, prompt_logprobs=1, stream=True)


def test_logit_bias_keys_become_checked_token_ids(plain):
    assert _chat(plain, logit_bias={"5": -100, "7": 2.5}).params.logit_bias == {5: -100.0,
                                                                                7: 2.5}
    vocab = plain.tokenizer.vocab_size
    assert f"outside the vocabulary [0, {vocab})" in _refused(plain, logit_bias={str(vocab): 1})
    assert "integer strings" in _refused(plain, logit_bias={"-1": 1})
    assert "logit_bias.5" in _refused(plain, logit_bias={"5": -100.5})


def test_tool_choice_required_or_named_sets_the_parsers_grammar(hermes):
    required = _chat(hermes, tools=TOOLS, tool_choice="required")
    grammar = required.params.structured_outputs.grammar
    assert "<tool_call>" in grammar and "get_weather" in grammar and "count" in grammar
    assert required.info("e")["response_format"] == "tools_required"
    named = _chat(hermes, tools=TOOLS, parallel_tool_calls=False,
                  tool_choice={"type": "function", "function": {"name": "count"}})
    assert "get_weather" not in named.params.structured_outputs.grammar
    assert named.info("e")["response_format"] == "tools_named"
    auto = _chat(hermes, tools=TOOLS)
    assert auto.params.structured_outputs is None
    assert auto.info("e")["response_format"] == "tools_auto"
    assert auto.info("e")["tool_call_counter"](CALL_TEXT) == 2


def test_tools_are_rendered_but_not_parsed_with_tool_choice_none(hermes):
    req = _chat(hermes, tools=TOOLS, tool_choice="none")
    prompt = hermes.tokenizer.decode(req.prompts[0]["prompt_token_ids"])
    assert '"get_weather"' in prompt and "<tools>" in prompt
    assert "tool_call_counter" not in req.info("e")
    body = req.reply("id", 0).response([_output(CALL_TEXT)])
    assert body["choices"][0]["message"]["content"] == CALL_TEXT


def test_assistant_tool_calls_and_tool_results_render_through_the_template(hermes):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"},
    ]
    req = parse_body(CHAT_URL, {"messages": messages, "tools": TOOLS}, hermes)
    prompt = hermes.tokenizer.decode(req.prompts[0]["prompt_token_ids"])
    assert '"arguments": {"city": "Oslo", "unit": "c"}' in prompt
    assert "<tool_response>\n12 degrees\n</tool_response>" in prompt
    bad = [*messages[:1], {**messages[1], "tool_calls": [{
        "id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]
    assert "JSON object" in _refused(hermes, messages=bad)


def test_constraint_starts_after_reasoning_unless_the_prompt_closed_it(thinking):
    on, off = thinking
    fmt = {"response_format": {"type": "json_object"}}
    end = on.tokenizer.encode("</think>", add_special_tokens=False)
    assert _chat(on, **fmt).params.structured_outputs.after_token_ids == tuple(end)
    assert _chat(off, **fmt).params.structured_outputs.after_token_ids is None
    assert _chat(on).params.structured_outputs is None


def _output(*texts: str, finish: str = "stop") -> RequestOutput:
    outputs = [CompletionOutput(i, t, list(range(len(t))), finish_reason=finish)
               for i, t in enumerate(texts)]
    return RequestOutput("r", None, [1, 2], outputs, finished=True)


def _stream(reply, text: str, step: int = 1) -> list[dict]:
    """Chunks of `text` streamed `step` characters at a time."""
    writer = reply.writer()
    chunks = writer.start()
    for end in range(step, len(text) + step, step):
        c = CompletionOutput(0, text[:end], list(range(min(end, len(text)))),
                             finish_reason="stop" if end >= len(text) else None)
        chunks += writer.feed(0, RequestOutput("r", None, [1, 2], [c], finished=False))
    return chunks + writer.finish()


@pytest.mark.parametrize("step", [1, 3, 17])
def test_streamed_tool_calls_add_up_to_the_whole_answer(hermes, step):
    reply = _chat(hermes, tools=TOOLS, stream=True).reply("id", 0)
    text = "Let me see." + CALL_TEXT
    whole = reply.response([_output(text)])["choices"][0]
    chunks = _stream(reply, text, step)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas)
    assert content == whole["message"]["content"] == "Let me see."
    assert "<" not in content
    calls: dict[int, dict] = {}
    for d in deltas:
        for piece in d.get("tool_calls", ()):
            if piece["index"] not in calls:  # the first piece names the call
                assert piece["id"].startswith("call_") and piece["type"] == "function"
                calls[piece["index"]] = {"name": piece["function"]["name"], "arguments": ""}
            else:
                assert "id" not in piece and "name" not in piece["function"]
            calls[piece["index"]]["arguments"] += piece["function"]["arguments"]
    expected = [c["function"] for c in whole["message"]["tool_calls"]]
    assert [calls[i] for i in sorted(calls)] == expected
    assert json.loads(expected[1]["arguments"]) == {"n": 3, "exact": True}
    assert whole["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("step", [1, 4])
def test_reasoning_is_split_out_in_both_forms(thinking, step):
    on, _ = thinking
    reply = _chat(on, stream=True).reply("id", 0)
    text = "<think>\nPonder a bit.\n</think>\n\nThe answer."
    message = reply.response([_output(text)])["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("\nPonder a bit.\n",
                                                                  "The answer.")
    deltas = [c["choices"][0]["delta"] for c in _stream(reply, text, step) if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "\nPonder a bit.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."


@pytest.mark.parametrize("step", [1, 5])
def test_a_prompt_that_leaves_think_open_starts_in_the_reasoning(checkpoint, tmp_path_factory,
                                                                 step):
    """Thinking-only templates (QwQ, Qwen3-Thinking) open <think> in the prompt: the model's
    text up to its </think> is reasoning, although it never writes the opening tag."""
    path = with_template(checkpoint, tmp_path_factory.mktemp("open") / "open", opening="<think>\n")
    view = ModelView.build(Tokenizer.from_pretrained(path), ["m"], 4096, reasoning_parser="qwen3")
    text = "Ponder a bit.\n</think>\n\nThe answer."
    reply = _chat(view, stream=True).reply("id", 0)
    message = reply.response([_output(text)])["choices"][0]["message"]
    assert (message["reasoning_content"], message["content"]) == ("Ponder a bit.\n",
                                                                  "The answer.")
    deltas = [c["choices"][0]["delta"] for c in _stream(reply, text, step) if c["choices"]]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Ponder a bit.\n"
    assert "".join(d.get("content") or "" for d in deltas) == "The answer."


def test_a_prompt_that_does_not_open_think_keeps_a_bare_close_as_content(thinking):
    on, _ = thinking
    text = "Plain answer </think> stays"
    message = _chat(on).reply("id", 0).response([_output(text)])["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] == text


def test_batch_and_http_share_the_reply_for_tool_calls(hermes):
    from llmserve.batch.bodies import Prepared, prepare, response_body
    from llmserve.batch.lines import BatchLine

    line = BatchLine(line=1, custom_id="a", url=CHAT_URL,
                     body={"messages": USER, "tools": TOOLS, "tool_choice": "required"})
    prep = prepare(line, hermes)
    assert isinstance(prep, Prepared) and prep.info()["response_format"] == "tools_required"
    body = response_body(prep, [_output(CALL_TEXT)], hermes.tokenizer)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 2


def test_parallel_tool_calls_false_keeps_at_most_one_call(hermes):
    for parallel, expected in ((False, 1), (True, 2)):
        req = _chat(hermes, tools=TOOLS, parallel_tool_calls=parallel)
        message = req.reply("id", 0).response([_output(CALL_TEXT)])["choices"][0]["message"]
        assert len(message["tool_calls"]) == expected
        assert req.info("e")["tool_call_counter"](CALL_TEXT) == expected


def test_safety_identifier_stands_in_for_user(plain):
    assert _chat(plain, safety_identifier="u-1").info("e")["user"] == "u-1"
    assert _chat(plain, safety_identifier="u-1", user="u-2").info("e")["user"] == "u-2"
    assert "safety_identifier" in _refused(plain, safety_identifier=5)
