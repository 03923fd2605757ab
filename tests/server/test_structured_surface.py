"""response_format, vLLM's structured outputs, logit_bias, echo with logprobs, prompt_logprobs
and reasoning output, end to end on the random model (whose free text is gibberish, so every
valid output below is the constraint's doing)."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from live_server import stream_chunks, validate
from tool_models import THINKING_OFF, with_template

CHAT = [{"role": "user", "content": "Describe a pet."}]
PET = {"type": "object", "additionalProperties": False,
       "required": ["name", "kind", "age", "vaccinated"],
       "properties": {"name": {"type": "string", "maxLength": 6},
                      "kind": {"enum": ["cat", "dog", "fish"]},
                      "age": {"type": "integer", "minimum": 0, "maximum": 30},
                      "vaccinated": {"type": "boolean"}}}
PET_FORMAT = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET,
                                                     "strict": True}}


class Pet(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=6)
    kind: Literal["cat", "dog", "fish"]
    age: int = pydantic.Field(ge=0, le=30)
    vaccinated: bool


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=120)


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.api_url + path, json=body, timeout=120)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_json_schema_outputs_always_validate(client, seed):
    reply = client.chat.completions.create(model="tiny-llama", messages=CHAT, n=5, seed=seed,
                                           temperature=1.0, max_tokens=200,
                                           response_format=PET_FORMAT)
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        jsonschema.validate(json.loads(choice.message.content), PET)


def test_openai_client_parse_returns_the_pydantic_model(client):
    parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
    reply = parse(model="tiny-llama", messages=CHAT, response_format=Pet, seed=7, max_tokens=200)
    assert isinstance(reply.choices[0].message.parsed, Pet)


def test_streamed_json_adds_up_and_chunks_match_the_schema(server):
    body = {"messages": CHAT, "response_format": PET_FORMAT, "seed": 9, "max_tokens": 200}
    chunks = stream_chunks(server.base_url, "/v1/chat/completions", body)
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    jsonschema.validate(json.loads(text), PET)
    whole = _post(server, "/chat/completions", body).json()
    validate("CreateChatCompletionResponse", whole)
    assert whole["choices"][0]["message"]["content"] == text


def _json_object(text: str, finish: str) -> bool:
    # Unbounded strings may run into max_tokens; what stopped must be a whole object.
    if finish == "length":
        return text.startswith("{")
    return isinstance(json.loads(text), dict)


def test_json_object_regex_choice_and_grammar_hold_on_both_endpoints(server):
    cases = [
        ({"response_format": {"type": "json_object"}}, _json_object),
        ({"structured_outputs": {"regex": "[a-c]{2,5}-[0-9]{1,2}"}},
         lambda t, f: re.fullmatch("[a-c]{2,5}-[0-9]{1,2}", t)),
        ({"guided_regex": "(yes|no)!"}, lambda t, f: t in ("yes!", "no!")),
        ({"structured_outputs": {"choice": ["red", "green", "blue"]}},
         lambda t, f: t in ("red", "green", "blue")),
        ({"guided_choice": ["up", "down"]}, lambda t, f: t in ("up", "down")),
        ({"structured_outputs": {"grammar": 'start: "x" ("y" | "z")+ "."'}},
         lambda t, f: re.fullmatch("x[yz]+[.]", t)),
    ]
    for extra, holds in cases:
        for seed in (1, 2):
            chat = _post(server, "/chat/completions", {"messages": CHAT, "seed": seed, "n": 2,
                                                       "max_tokens": 64, **extra}).json()
            texts = [(c["message"]["content"], c["finish_reason"]) for c in chat["choices"]]
            done = _post(server, "/completions", {"prompt": "Say", "seed": seed, "n": 2,
                                                  "max_tokens": 64, **extra}).json()
            texts += [(c["text"], c["finish_reason"]) for c in done["choices"]]
            assert all(holds(t, f) for t, f in texts), (extra, texts)


def test_uncompilable_constraints_are_400_naming_the_problem(server):
    for so, named in [({"grammar": "start: nonexisting_rule"}, "nonexisting_rule"),
                      ({"json": {"type": "strng"}}, "strng"),
                      ({"regex": "(unclosed"}, "unclosed group")]:
        reply = _post(server, "/chat/completions", {"messages": CHAT, "structured_outputs": so})
        assert reply.status_code == 400 and named in reply.json()["error"]["message"]
        validate("ErrorResponse", reply.json())


def test_logit_bias_pins_or_bans_tokens(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 6, "temperature": 1.0, "seed": 3,
            "logprobs": 0}
    pinned = _post(server, "/completions", {**body, "logit_bias": {"42": 100}}).json()
    assert pinned["choices"][0]["logprobs"]["tokens"] == [
        httpx.post(server.base_url + "/detokenize", json={"tokens": [42]}).json()["prompt"]] * 6
    greedy = {**body, "temperature": 0, "max_tokens": 1}

    def first_token(extra: dict) -> int:
        text = _post(server, "/completions", {**greedy, **extra}).json()["choices"][0]["text"]
        return httpx.post(server.base_url + "/tokenize", json={
            "prompt": text, "add_special_tokens": False}).json()["tokens"][0]

    banned = first_token({})
    assert first_token({"logit_bias": {str(banned): -100}}) != banned


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(server):
    body = {"prompt": "The quick brown fox", "max_tokens": 4, "echo": True, "logprobs": 2,
            "temperature": 0, "ignore_eos": True}
    whole = _post(server, "/completions", body).json()
    validate("CreateCompletionResponse", whole)
    choice = whole["choices"][0]
    prompt_tokens = whole["usage"]["prompt_tokens"]
    assert choice["text"].startswith("The quick brown fox")
    assert len(choice["logprobs"]["tokens"]) == prompt_tokens + 4
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert all(v <= 0 for v in choice["logprobs"]["token_logprobs"][1:])
    chunks = stream_chunks(server.base_url, "/v1/completions", body)
    streamed = [t for c in chunks for ch in c["choices"] for t in (ch["logprobs"] or {}).get(
        "tokens", ())]
    assert streamed == choice["logprobs"]["tokens"]
    assert "".join(ch["text"] for c in chunks for ch in c["choices"]) == choice["text"]


def test_prompt_logprobs_extra_field_on_both_endpoints(server):
    done = _post(server, "/completions", {"prompt": "Hello there", "max_tokens": 1,
                                          "prompt_logprobs": 1}).json()
    entries = done["choices"][0]["prompt_logprobs"]
    assert len(entries) == done["usage"]["prompt_tokens"] and entries[0] is None
    assert all(1 <= len(e) <= 2 for e in entries[1:])
    chat = _post(server, "/chat/completions", {"messages": CHAT, "max_tokens": 1,
                                               "prompt_logprobs": 0}).json()
    validate("CreateChatCompletionResponse", chat)
    assert len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_reasoning_parser_with_thinking_off_constrains_the_answer(checkpoint, tmp_path_factory):
    from llmserve.engine.async_engine import AsyncEngine
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.server.openai import create_app, serve_in_background

    path = with_template(checkpoint, tmp_path_factory.mktemp("think") / "off", THINKING_OFF)
    engine = AsyncEngine(LLMEngine.from_args(str(path), num_kv_blocks=128, block_size=16,
                                             max_model_len=512, max_num_batched_tokens=512))
    app = create_app(engine, reasoning_parser="qwen3")
    with serve_in_background(app) as (url, _):
        body = {"messages": CHAT, "response_format": PET_FORMAT, "seed": 4, "max_tokens": 200}
        reply = httpx.post(url + "/v1/chat/completions", json=body, timeout=120).json()
        message = reply["choices"][0]["message"]
        assert message["reasoning_content"] is None
        jsonschema.validate(json.loads(message["content"]), PET)
        chunks = stream_chunks(url, "/v1/chat/completions", body)
        assert all("reasoning_content" not in c["choices"][0]["delta"] for c in chunks)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == (
            message["content"])
