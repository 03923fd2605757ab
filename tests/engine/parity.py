"""Shared pieces of the parity tests: transformers' greedy reference, an llmserve run with the
same settings, and the exactness check (same tokens, logprobs within 1e-4)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest
import torch

from llmserve import LLM, SamplingParams


def prefix_prompts(lengths: Sequence[int], vocab: int, prefix_len: int,
                   seed: int = 0) -> list[list[int]]:
    """Token-id prompts with bodies of `lengths` (ids in [3, vocab), clear of the specials); every
    other one (odd positions) starts with one shared `prefix_len`-token prefix, so prefix-cache
    hits happen. The prefix is drawn first, then the bodies in order, from Random(seed)."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, vocab) for _ in range(prefix_len)]
    prompts = []
    for i, length in enumerate(lengths):
        body = [rng.randrange(3, vocab) for _ in range(length)]
        prompts.append(prefix + body if i % 2 else body)
    return prompts


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int,
              stop_at_eos: bool = False) -> tuple[list[int], list[float]]:
    """transformers' own model, one full forward per token: greedy tokens and their logprobs."""
    ids, logprobs = list(prompt), []
    for _ in range(steps):
        logits = model(torch.tensor([ids])).logits[0, -1].float()
        token = int(logits.argmax())
        logprobs.append(float(torch.log_softmax(logits, -1)[token]))
        ids.append(token)
        if stop_at_eos and token in model.generation_config.eos_token_id:
            break
    return ids[len(prompt):], logprobs


def run_llmserve(path, prompts, max_tokens: int, **engine_args):
    """Greedy fp32 llmserve over token-id prompts; returns (llm, outputs)."""
    llm = LLM(path, dtype="float32", **engine_args)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    return llm, llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def assert_matches(outputs, expected) -> None:
    for i, (out, (tokens, logprobs)) in enumerate(zip(outputs, expected)):
        completion = out.outputs[0]
        assert completion.token_ids == tokens, f"prompt {i}"
        got = [completion.logprobs[j][t].logprob for j, t in enumerate(completion.token_ids)]
        assert got == pytest.approx(logprobs, abs=1e-4), f"prompt {i}"


def assert_exact_under_preemption(path, prompts, expected, max_tokens: int, num_kv_blocks: int,
                                  **engine_args):
    """A pool small enough to force preemption: still the reference's tokens and logprobs, and
    every block back in the pool at the end. Returns the LLM."""
    llm, outputs = run_llmserve(path, prompts, max_tokens, num_kv_blocks=num_kv_blocks,
                                block_size=16, **engine_args)
    assert llm.stats()["num_preemptions"] > 0
    assert_matches(outputs, expected)
    assert llm.stats()["kv_blocks_free"] == num_kv_blocks
    return llm


def assert_exact_with_chunked_prefill(path, prompts, expected, max_tokens: int, budget: int):
    """A token budget small enough to split prompts over steps (no prefix cache to hide it):
    still the reference's tokens and logprobs. Returns the LLM."""
    llm, outputs = run_llmserve(path, prompts, max_tokens, max_num_batched_tokens=budget,
                                enable_prefix_caching=False)
    assert_matches(outputs, expected)
    return llm
