"""Prefix caching: a second request sharing a long prefix computes only the rest."""

from __future__ import annotations

from llmserve import SamplingParams
from llmserve.engine.llm_engine import LLMEngine


def run_to_end(engine: LLMEngine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return [o for o in outs if o.finished]


def test_second_request_sharing_200_token_prefix_computes_only_the_rest(llama_dir):
    engine = LLMEngine.from_args(llama_dir, dtype="float32", block_size=16, num_kv_blocks=64)
    prefix = [(i * 7) % 300 + 3 for i in range(200)]
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    engine.add_request("first", prefix + [5, 6, 7], params)
    first = run_to_end(engine)[0]
    assert first.num_cached_tokens == 0
    engine.add_request("second", prefix + [9, 10, 11, 12, 13], params)
    engine.step()
    second = engine.scheduler.requests["second"]
    # 200 shared tokens = 12 full blocks of 16 (192 tokens) are reused; only the rest is run.
    assert second.num_cached_tokens == 192
    assert second.num_prefill_tokens_run == 205 - 192
    out = run_to_end(engine)[0]
    assert out.num_cached_tokens == 192
    assert engine.stats()["prefix_cache_hits"] == 192


def test_prefix_hit_gives_the_same_tokens_as_a_cold_run(llama_dir):
    prompt = [(i * 13) % 300 + 3 for i in range(70)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    cold = LLMEngine.from_args(llama_dir, dtype="float32", enable_prefix_caching=False, num_kv_blocks=32)
    cold.add_request("a", prompt, params)
    expected = run_to_end(cold)[0].outputs[0].token_ids
    warm = LLMEngine.from_args(llama_dir, dtype="float32", num_kv_blocks=32)
    warm.add_request("a", prompt, params)
    run_to_end(warm)
    warm.add_request("b", prompt, params)
    out = run_to_end(warm)[0]
    assert out.num_cached_tokens == 64
    assert out.outputs[0].token_ids == expected


def test_n_greater_than_one_shares_prompt_blocks(llama_dir):
    engine = LLMEngine.from_args(llama_dir, dtype="float32", block_size=16, num_kv_blocks=64)
    prompt = list(range(3, 67))  # 64 tokens = 4 full blocks
    engine.add_request("n4", prompt, SamplingParams(n=4, max_tokens=3, temperature=1.0, seed=3))
    engine.step()
    held = [engine.kv.block_ids(f"n4#{i}") for i in range(4)]
    shared = set(held[0][:3])
    assert all(set(ids[:3]) == shared for ids in held)  # the first 3 prompt blocks are shared
    out = run_to_end(engine)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert engine.stats()["kv_blocks_free"] == 64
