"""Shared pieces of the parity tests: transformers' greedy reference, an llmserve run with the
same settings, and the exactness check (same tokens, logprobs within 1e-4)."""

from __future__ import annotations

import pytest
import torch

from llmserve import LLM, SamplingParams


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
