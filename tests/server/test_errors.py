"""Bad input, authentication, body limits and engine failure all answer in OpenAI's envelope."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from live_server import live_server, sse_events, validate

CHAT = [{"role": "user", "content": "Hello"}]
SECRET = "s3cret-key"


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    validate("ErrorResponse", body)
    return body["error"]


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 5}, "temperature"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"top_p": 0}, "top_p"),
    ({"stop": ["a"] * 40}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    ({"top_logprobs": 2}, None),
    ({"logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"logit_bias": {"99999": 1.0}}, None),
    ({"logit_bias": {"x": 1.0}}, None),
    ({"functions": [{"name": "f"}]}, None),
    ({"audio": {"voice": "alloy", "format": "mp3"}}, None),
    ({"store": True}, None),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema"),
    ({"response_format": {"type": "yaml"}}, None),
    ({"tool_choice": "required"}, None),
])
def test_invalid_chat_parameters_are_400_with_the_param_named(client, extra, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-llama", **{"messages": CHAT, **extra})
    error = info.value.body
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    validate("ErrorResponse", {"error": error})


def test_prompt_plus_max_tokens_over_context_is_400_naming_the_limit(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512"):
        client.completions.create(model="tiny-llama", prompt="Hello", max_tokens=600)


def test_invalid_json_and_wrong_body_types_are_400_not_422(server):
    url = server.api_url + "/chat/completions"
    err = _error(httpx.post(url, content=b'{"messages": [', headers={
        "content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    _error(httpx.post(url, json=["not", "an", "object"]), 400)
    _error(httpx.post(url, json={"model": "tiny-llama"}), 400)
    _error(httpx.post(server.api_url + "/completions", json={"prompt": []}), 400)


def test_error_messages_never_echo_the_request_body(server):
    marker = "SECRET-PAYLOAD-" * 20
    response = httpx.post(server.api_url + "/completions",
                          json={"prompt": marker, "max_tokens": "many", "stop": 3})
    err = _error(response, 400)
    assert "SECRET-PAYLOAD" not in response.text and len(err["message"]) < 500


def test_unknown_model_is_404_model_not_found(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=CHAT)
    assert info.value.body["code"] == "model_not_found"
    _error(httpx.get(server.api_url + "/models/gpt-nope"), 404)
    _error(httpx.get(server.base_url + "/no/such/route"), 404)
    _error(httpx.delete(server.api_url + "/models"), 405)


def test_api_key_required_everywhere_but_health_and_metrics(checkpoint):
    with live_server(checkpoint, api_keys=(SECRET,), max_body_bytes=4096) as live:
        for key in ["wrong-key", ""]:
            anon = openai.OpenAI(base_url=live.api_url, api_key=key or "x", max_retries=0)
            with pytest.raises(openai.AuthenticationError):
                anon.models.list()
        err = _error(httpx.post(live.api_url + "/chat/completions", json={"messages": CHAT}),
                     401)
        assert err["code"] == "invalid_api_key"
        _error(httpx.post(live.base_url + "/tokenize", json={"prompt": "x"}), 401)
        assert httpx.get(live.base_url + "/health").status_code == 200
        assert httpx.get(live.base_url + "/metrics").status_code == 200
        authed = openai.OpenAI(base_url=live.api_url, api_key=SECRET, max_retries=0)
        assert authed.chat.completions.create(model="tiny-llama", messages=CHAT,
                                              max_tokens=2).choices
        # Over the body limit: 413 before anything is parsed.
        with pytest.raises(openai.APIStatusError) as info:
            authed.completions.create(model="tiny-llama", prompt="x" * 5000, max_tokens=1)
        assert info.value.status_code == 413
        chunked = httpx.post(live.base_url + "/tokenize", content=iter([b"{" * 3000] * 2),
                             headers={"authorization": f"Bearer {SECRET}"})
        _error(chunked, 413)


def test_engine_failure_mid_stream_sends_error_event_then_done(checkpoint):
    with live_server(checkpoint) as live:
        engine = live.engine.engine
        real_step, calls = engine.step, 0

        def failing_step():
            nonlocal calls
            calls += 1
            if calls > 3:
                raise RuntimeError("simulated device failure")
            return real_step()

        engine.step = failing_step
        events = sse_events(live.base_url, "/v1/chat/completions",
                            {"messages": CHAT, "max_tokens": 200, "ignore_eos": True,
                             "stream": True})
        assert events[-1] == (None, "[DONE]")
        name, data = events[-2]
        assert name == "error"
        body = json.loads(data)
        validate("ErrorResponse", body)
        assert "simulated device failure" in body["error"]["message"]
        for _, chunk in events[:-2]:
            validate("CreateChatCompletionStreamResponse", json.loads(chunk))
        deadline = time.monotonic() + 5
        while httpx.get(live.base_url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _error(httpx.post(live.api_url + "/chat/completions", json={"messages": CHAT}), 503)
