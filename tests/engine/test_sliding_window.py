"""Sliding-window models (Mistral's uniform window, Qwen2's use_sliding_window with
max_window_layers) against transformers, and the KV blocks a long windowed request holds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmserve import SamplingParams
from llmserve.attention.windows import kv_release_window, layer_sliding_windows
from llmserve.engine.llm_engine import LLMEngine
from llmserve.models.random_checkpoint import build_random_window_checkpoint
from tests.engine.parity import (
    assert_exact_under_preemption,
    assert_exact_with_chunked_prefill,
    assert_matches,
    hf_greedy,
    prefix_prompts,
    run_llmserve,
)
from tests.engine.test_parity_transformers import MAX_TOKENS

# name -> (architecture, overrides). Prompts run to 190 tokens: far past every window.
MODELS = {
    "mistral": ("mistral", {}),  # window 24, every layer: blocks are released
    "qwen2-mixed": ("qwen2", {}),  # window 20 on layers 1-2, layer 0 full: blocks are kept
    "qwen2-all": ("qwen2", {"max_window_layers": 0, "num_hidden_layers": 2}),
}
# A pool that forces preemption. Without release the longest request (200 tokens) needs 13
# blocks of 16; with it, requests stop growing past their window, so only a pool of a few
# windows runs short, and the 200-token request runs in a pool of 8 blocks (32-token chunks).
PREEMPTING_POOL = {
    "mistral": dict(num_kv_blocks=8, max_num_batched_tokens=32),
    "qwen2-mixed": dict(num_kv_blocks=13, max_num_batched_tokens=32),
    "qwen2-all": dict(num_kv_blocks=8, max_num_batched_tokens=32),
}


def make_prompts(vocab: int = 400, seed: int = 0) -> list[list[int]]:
    """9 prompts around and far past the windows (1..190 tokens); four share a 40-token prefix
    (so prefix hits include blocks that are behind the window)."""
    return prefix_prompts([1, 19, 23, 25, 33, 60, 100, 150, 7], vocab, 40, seed)


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request, tmp_path_factory):
    arch, overrides = MODELS[request.param]
    path = str(build_random_window_checkpoint(tmp_path_factory.mktemp(request.param), arch,
                                              **overrides))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts()
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return path, prompts, expected, request.param


def test_greedy_matches_transformers(reference):
    path, prompts, expected, _ = reference
    llm, outputs = run_llmserve(path, prompts, MAX_TOKENS)
    assert_matches(outputs, expected)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_greedy_with_preemption_matches_transformers(reference):
    path, prompts, expected, name = reference
    assert_exact_under_preemption(path, prompts, expected, MAX_TOKENS, **PREEMPTING_POOL[name])


def test_greedy_with_chunked_prefill_matches_transformers(reference):
    path, prompts, expected, _ = reference
    assert_exact_with_chunked_prefill(path, prompts, expected, MAX_TOKENS, budget=24)


def test_layer_windows_follow_each_convention():
    base = {"num_hidden_layers": 4, "sliding_window": 8}
    assert layer_sliding_windows({**base, "model_type": "mistral"}) == [8] * 4
    assert layer_sliding_windows({**base, "model_type": "mistral", "sliding_window": None}) \
        == [None] * 4
    qwen = {**base, "model_type": "qwen2", "max_window_layers": 3}
    assert layer_sliding_windows(qwen) == [None] * 4  # use_sliding_window is off by default
    assert layer_sliding_windows({**qwen, "use_sliding_window": True}) == [None] * 3 + [8]
    types = ["sliding_attention", "full_attention"] * 2
    assert layer_sliding_windows({**base, "model_type": "gemma3_text", "layer_types": types}) \
        == [8, None, 8, None]
    assert layer_sliding_windows({**base, "model_type": "gemma3_text",
                                  "sliding_window_pattern": 2}) == [8, None, 8, None]
    # Neither key: transformers' default pattern for Gemma 3 (every 6th layer global).
    seven = {**base, "num_hidden_layers": 7, "model_type": "gemma3_text"}
    assert layer_sliding_windows(seven) == [8] * 5 + [None, 8]
    assert kv_release_window({**base, "model_type": "mistral"}) == 8
    assert kv_release_window({**qwen, "use_sliding_window": True}) is None


def _run_and_watch(engine: LLMEngine, rid: str, prompt: list[int], max_tokens: int) -> list[int]:
    """Step one request to the end; return the blocks it held after each step."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        if rid in engine.kv.req_blocks:
            held.append(engine.kv.num_held_blocks(rid))
            runner_table = engine.runner.batch.block_ids(rid)
            assert runner_table == engine.kv.block_ids(rid)
    return held


@pytest.mark.parametrize("budget", [2048, 24])
def test_long_request_holds_about_a_window_of_blocks(tmp_path, budget):
    window, bs = 24, 16
    path = build_random_window_checkpoint(tmp_path, "mistral", sliding_window=window)
    # A pool far smaller than the request (300 tokens = 19 blocks) serves it when chunked.
    num_blocks = 6 if budget == 24 else 20
    engine = LLMEngine.from_args(str(path), dtype="float32", block_size=bs,
                                 num_kv_blocks=num_blocks, max_num_batched_tokens=budget)
    prompt = [(7 * i) % 300 + 3 for i in range(250)]
    held = _run_and_watch(engine, "long", prompt, max_tokens=50)
    # Decode steps: the window's blocks plus the one the window edge falls in.
    limit = -(-window // bs) + 1
    assert max(held[-40:]) <= limit
    assert engine.kv.num_free_blocks == num_blocks
    engine.kv.pool.check_integrity()


def test_released_blocks_are_reused_and_prefix_hits_stay_exact(tmp_path):
    """A second identical request after the first one released (and others reused) its early
    blocks: the hit is cut at the first evicted block and the output is unchanged."""
    path = build_random_window_checkpoint(tmp_path, "mistral", sliding_window=24)
    engine = LLMEngine.from_args(str(path), dtype="float32", block_size=16, num_kv_blocks=12,
                                 max_num_batched_tokens=32)
    prompt = [(5 * i) % 300 + 3 for i in range(120)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = {}
    for rid in ("a", "b", "c"):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    outs[out.request_id] = out.outputs[0].token_ids
    assert outs["a"] == outs["b"] == outs["c"]
    assert engine.kv.prefix_cache_hits > 0
    engine.kv.pool.check_integrity()


def test_abort_after_blocks_were_released_frees_everything(tmp_path):
    """A request aborted while it holds only its window's blocks (the early ones already
    released) gives every block back; none is freed twice."""
    path = build_random_window_checkpoint(tmp_path, "mistral", sliding_window=24)
    engine = LLMEngine.from_args(str(path), dtype="float32", block_size=16, num_kv_blocks=8,
                                 max_num_batched_tokens=32)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("long", {"prompt_token_ids": [(3 * i) % 300 + 3 for i in range(150)]},
                       params)
    for _ in range(12):  # past the prompt (5 chunks of 32) and into decode
        engine.step()
    assert engine.kv.block_ids("long").count(-1) > 0  # some blocks were released already
    engine.abort_request("long")
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()
    assert engine.kv.num_free_blocks == 8
    engine.kv.pool.check_integrity()
