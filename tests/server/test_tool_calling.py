"""Tool calling end to end: a random model under a Hermes-style template, through the openai
client and raw HTTP, streamed and whole, checked against the OpenAI schemas."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest
from live_server import live_server, stream_chunks, validate
from tool_models import PARAMETERS, TOOLS, WEATHER, with_template

USER = [{"role": "user", "content": "Weather in Oslo?"}]
# Room for the tools' description in the prompt (the test tokenizer spends ~1 token a byte).
ENGINE = {"max_model_len": 1024, "num_kv_blocks": 512}


@pytest.fixture(scope="module")
def hermes_server(checkpoint, tmp_path_factory):
    path = with_template(checkpoint, tmp_path_factory.mktemp("tools") / "hermes")
    with live_server(path, **ENGINE) as live:
        yield live


@pytest.fixture(scope="module")
def client(hermes_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=hermes_server.api_url, api_key="unused", max_retries=0,
                         timeout=120)


def _check_calls(calls, parallel: bool = True) -> None:
    assert calls and (parallel or len(calls) == 1)
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_required_tool_choice_always_yields_calls_that_validate(client, seed):
    reply = client.chat.completions.create(
        model="hermes", messages=USER, tools=TOOLS, tool_choice="required", n=3, seed=seed,
        temperature=1.0, max_tokens=300, parallel_tool_calls=False)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        _check_calls(choice.message.tool_calls, parallel=False)


def test_named_function_is_the_one_called_and_the_response_matches_the_schema(hermes_server):
    body = {"messages": USER, "tools": TOOLS, "seed": 5, "max_tokens": 300,
            "tool_choice": {"type": "function", "function": {"name": "count"}}}
    reply = httpx.post(hermes_server.api_url + "/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    validate("CreateChatCompletionResponse", reply.json())
    calls = reply.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["count"]


def test_streamed_calls_name_first_then_arguments_and_equal_the_whole_answer(hermes_server,
                                                                            client):
    body = {"messages": USER, "tools": [WEATHER], "tool_choice": "required", "seed": 11,
            "temperature": 1.0, "max_tokens": 300}
    whole = client.chat.completions.create(model="hermes", **body)
    chunks = stream_chunks(hermes_server.base_url, "/v1/chat/completions", body)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    pieces = [p for c in chunks for p in c["choices"][0]["delta"].get("tool_calls", ())]
    calls: dict[int, list[str]] = {}
    for piece in pieces:  # per call: id, type and name in its first piece only
        first = piece["index"] not in calls
        assert ("id" in piece) == ("name" in piece["function"]) == first
        calls.setdefault(piece["index"], []).append(piece["function"]["arguments"])
    expected = whole.choices[0].message.tool_calls
    assert sorted(calls) == list(range(len(expected)))
    assert ["".join(calls[i]) for i in sorted(calls)] == [c.function.arguments for c in expected]
    assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    stream = client.chat.completions.create(model="hermes", stream=True, **body)
    assert [c.choices[0].finish_reason for c in stream][-1] == "tool_calls"


def test_auto_parses_free_text_and_none_leaves_it_alone(client):
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model="hermes", messages=USER, tools=TOOLS,
                                               tool_choice=choice, max_tokens=8, seed=1)
        assert reply.choices[0].message.tool_calls is None  # gibberish holds no calls
        assert reply.choices[0].finish_reason == "length"


def test_conversation_with_tool_results_is_accepted(client):
    messages = USER + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12 degrees"}]
    reply = client.chat.completions.create(model="hermes", messages=messages, tools=TOOLS,
                                           max_tokens=4)
    assert reply.usage.completion_tokens == 4


def test_tool_errors_are_400_naming_the_problem(client):
    with pytest.raises(openai.BadRequestError, match="not in tools"):
        client.chat.completions.create(model="hermes", messages=USER, tools=TOOLS,
                                       tool_choice={"type": "function",
                                                    "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="hermes", messages=USER, tools=[
            {"type": "function", "function": {"name": "bad name!"}}])


def test_engine_observers_get_the_ledger_fields(hermes_server, client):
    seen: dict[str, dict] = {}
    finished: dict[str, list[str]] = {}

    class Observer:
        def on_request_added(self, request_id, info):
            seen[request_id] = info

        def on_finished(self, output, usage, timings):
            finished[output.request_id] = [c.text for c in output.outputs]

    hermes_server.engine.add_observer(Observer())
    client.chat.completions.create(model="hermes", messages=USER, tools=TOOLS, seed=2,
                                   tool_choice="required", parallel_tool_calls=False,
                                   max_tokens=300)
    client.chat.completions.create(model="hermes", messages=USER, max_tokens=2,
                                   response_format={"type": "json_object"})
    deadline = time.monotonic() + 10  # observers may hear of the end after the client does
    while len(finished) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    (tools_id, tools_info), (_, json_info) = seen.items()
    assert tools_info["response_format"] == "tools_required"
    assert tools_info["tool_call_counter"](finished[tools_id][0]) == 1
    assert json_info["response_format"] == "json_object"
    assert "tool_call_counter" not in json_info
