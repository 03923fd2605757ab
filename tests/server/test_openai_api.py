"""The official `openai` client against a live llmserve: results, streaming, schemas, usage."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from live_server import stream_chunks, validate

MODEL = "tiny-llama"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0, timeout=60)


def _post(server, path: str, body: dict) -> dict:
    response = httpx.post(server.api_url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_models_list_matches_schema_and_names_the_checkpoint(server, client):
    body = httpx.get(server.api_url + "/models").json()
    validate("ListModelsResponse", body)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion_matches_schema_and_counts_usage(server, client):
    body = _post(server, "/chat/completions", {"model": MODEL, "messages": CHAT,
                                               "max_tokens": 7, "ignore_eos": True})
    validate("CreateChatCompletionResponse", body)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert choice["logprobs"] is None and choice["message"]["refusal"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + 7
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3)
    assert reply.usage.completion_tokens <= 3 and reply.choices[0].message.content is not None


def test_chat_stream_sends_role_deltas_finish_usage_then_done(server):
    request = {"model": MODEL, "messages": CHAT, "max_completion_tokens": 8, "seed": 7,
               "ignore_eos": True}
    chunks = stream_chunks(server.base_url, "/v1/chat/completions",
                           {**request, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 8
    assert all(c["usage"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    whole = _post(server, "/chat/completions", request)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]


def test_completion_stream_and_non_stream_agree_and_match_schemas(server):
    request = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 6,
               "temperature": 0, "ignore_eos": True}
    whole = _post(server, "/completions", request)
    validate("CreateCompletionResponse", whole)
    chunks = stream_chunks(server.base_url, "/v1/completions",
                           {**request, "stream_options": {"include_usage": True}})
    for chunk in chunks:
        finished = all(c["finish_reason"] is not None for c in chunk["choices"])
        validate("CreateCompletionResponse" if finished else "CreateCompletionStreamChunk", chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"]
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0


def test_prompt_cache_hit_reported_as_cached_tokens(server):
    prompt = "Every request waits in a queue, then the scheduler gives it a share " * 3
    first = _post(server, "/completions", {"prompt": prompt, "max_tokens": 2})
    again = _post(server, "/completions", {"prompt": prompt, "max_tokens": 2})
    assert first["usage"]["prompt_tokens"] > 16
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def test_n2_gives_two_indexed_choices_in_both_modes(server, client):
    reply = client.completions.create(model=MODEL, prompt="Hello", n=2, max_tokens=4,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 8
    chunks = stream_chunks(server.base_url, "/v1/chat/completions",
                           {"messages": CHAT, "n": 2, "max_tokens": 4, "ignore_eos": True})
    finishes = {c["choices"][0]["index"]: c["choices"][0]["finish_reason"]
                for c in chunks if c["choices"][0]["finish_reason"]}
    assert finishes == {0: "length", 1: "length"}
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role")]
    assert roles == [0, 1]


def test_multiple_prompts_number_choices_prompt_major(server, client):
    reply = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], n=2,
                                      max_tokens=2)
    assert sorted(c.index for c in reply.choices) == [0, 1, 2, 3]
    assert reply.usage.prompt_tokens == 5
    reply = client.completions.create(model=MODEL, prompt=["Hello", "Hello world"],
                                      max_tokens=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    hello = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello"}).json()
    assert reply.usage.prompt_tokens > 2 * hello["count"]
    assert reply.usage.completion_tokens == 6


def test_stop_string_ends_the_completion_before_it(client):
    base = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24,
                                     temperature=0, extra_body={"ignore_eos": True}
                                     ).choices[0].text
    match = re.search(r"[A-Za-z]{2,}", base[1:])
    assert match, f"no usable stop string in {base!r}"
    stop = match.group(0)[:2]
    stopped = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=24,
                                        temperature=0, stop=[stop],
                                        extra_body={"ignore_eos": True}).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == base[:base.find(stop)]


def test_seed_makes_sampling_reproducible(client):
    def sample(seed: int) -> str:
        return client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=12, temperature=1.0, seed=seed,
            extra_body={"ignore_eos": True}).choices[0].message.content

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_chat_logprobs_in_both_modes(server, client):
    request = {"model": MODEL, "messages": CHAT, "max_tokens": 5, "temperature": 0,
               "logprobs": True, "top_logprobs": 3, "ignore_eos": True}
    whole = _post(server, "/chat/completions", request)
    validate("CreateChatCompletionResponse", whole)
    content = whole["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and all(len(t["top_logprobs"]) == 3 for t in content)
    assert all(t["logprob"] <= 0 for t in content)
    # Greedy: the chosen token is the most likely one.
    assert all(t["logprob"] == pytest.approx(t["top_logprobs"][0]["logprob"]) for t in content)
    chunks = stream_chunks(server.base_url, "/v1/chat/completions", request)
    streamed = [t for c in chunks if c["choices"] and c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["content"]]
    assert [t["token"] for t in streamed] == [t["token"] for t in content]
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=3,
                                           logprobs=True, top_logprobs=2)
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens


def test_completion_logprobs_include_the_sampled_token(client):
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, logprobs=2,
                                      extra_body={"ignore_eos": True})
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(value)
    assert lp.text_offset == sorted(lp.text_offset)


def test_request_id_header_is_honoured_or_generated(server):
    body = {"messages": CHAT, "max_tokens": 1}
    response = httpx.post(server.api_url + "/chat/completions", json=body,
                          headers={"X-Request-Id": "trace-42.a"})
    assert response.headers["x-request-id"] == "trace-42.a"
    response = httpx.post(server.api_url + "/chat/completions", json=body,
                          headers={"X-Request-Id": "bad id\twith spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


def test_tokenize_and_detokenize_round_trip(server):
    tokens = httpx.post(server.base_url + "/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 512
    text = httpx.post(server.base_url + "/detokenize", json={"tokens": tokens["tokens"]}).json()
    assert text["prompt"] == "Hello world"
    chat = httpx.post(server.base_url + "/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > tokens["count"]
    bad = httpx.post(server.base_url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and "vocabulary" in bad.json()["error"]["message"]


def test_health_and_metrics_expose_vllm_style_names(server):
    assert httpx.get(server.base_url + "/health").status_code == 200
    text = httpx.get(server.base_url + "/metrics").text
    for name in ["time_to_first_token_seconds", "inter_token_latency_seconds",
                 "e2e_request_latency_seconds", "request_queue_time_seconds",
                 "prompt_tokens_total", "generation_tokens_total", "num_requests_running",
                 "num_requests_waiting", "kv_cache_usage_perc", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total",
                 "request_success_total"]:
        assert f"llmserve:{name}" in text, name
    assert server.metric("llmserve:generation_tokens_total") > 0
