"""Greedy outputs token-exact against transformers' own model on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.parity import (
    assert_exact_under_preemption,
    assert_exact_with_chunked_prefill,
    assert_matches,
    hf_greedy,
    prefix_prompts,
    run_llmserve,
)

MAX_TOKENS = 10
ARCH_OVERRIDES = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {"head_dim": 32},
    "llama-tied-rope-llama3": {
        "tie_word_embeddings": True,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    },
}


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """18 prompts of mixed lengths (1..190 tokens); half share a 40-token prefix."""
    lengths = [1, 5, 17, 31, 32, 33, 48, 64, 90, 150, 7, 12, 45, 60, 80, 100, 3, 120]
    return prefix_prompts(lengths, vocab, 40, seed)


@pytest.fixture(scope="module", params=list(ARCH_OVERRIDES))
def reference(request, checkpoint_factory):
    name = request.param
    arch = name.split("-")[0]
    path = checkpoint_factory(arch, **ARCH_OVERRIDES[name])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = make_prompts(vocab=400)
    expected = [hf_greedy(model, p, MAX_TOKENS) for p in prompts]
    return path, prompts, expected


def test_greedy_batch_matches_transformers(reference):
    path, prompts, expected = reference
    llm, outputs = run_llmserve(path, prompts, MAX_TOKENS)
    assert_matches(outputs, expected)
    stats = llm.stats()
    assert stats["prefix_cache_hits"] > 0  # the shared 40-token prefix was reused
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]


def test_greedy_with_preemption_matches_transformers(reference):
    assert_exact_under_preemption(*reference, MAX_TOKENS, num_kv_blocks=24)


def test_greedy_with_chunked_prefill_matches_transformers(reference):
    assert_exact_with_chunked_prefill(*reference, MAX_TOKENS, budget=24)
