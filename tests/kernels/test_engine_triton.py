"""Greedy generation with the Triton attention backend gives the torch backend's tokens."""

from __future__ import annotations

import random

import pytest

from llmserve import LLM, SamplingParams
from llmserve.attention import triton_backend as triton_backend_module
from llmserve.models.random_checkpoint import build_random_checkpoint


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> str:
    # head_dim 32, GQA 2: the Qwen3 shape (q/k norm before rotary) at toy size.
    return str(build_random_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3"))


def _prompts() -> list[list[int]]:
    rng = random.Random(0)
    shared = [rng.randrange(3, 400) for _ in range(20)]
    # Two prompts share a block-aligned prefix (a prefix-cache hit runs the extend path).
    tails = [[rng.randrange(3, 400) for _ in range(n)] for n in (5, 9)]
    return [shared + tails[0], [rng.randrange(3, 400) for _ in range(3)], shared + tails[1], [7]]


def _generate(path: str, backend: str) -> list[list[int]]:
    llm = LLM(
        path, dtype="float32", block_size=16, attention_backend=backend,
        # A small token budget chunks the prefills and mixes them with decode rows.
        max_num_batched_tokens=16, max_num_seqs=4, enforce_eager=True,
    )
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in _prompts()], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_greedy_tokens_match_torch_backend(qwen3_dir, monkeypatch):
    seen: list[int] = []
    original = triton_backend_module.triton_attention

    def counting(q, k, v, k_cache, v_cache, meta, scale):
        seen.append(meta.max_query_len)
        return original(q, k, v, k_cache, v_cache, meta, scale)

    want = _generate(qwen3_dir, "torch")
    monkeypatch.setattr(triton_backend_module, "triton_attention", counting)
    got = _generate(qwen3_dir, "triton")
    assert got == want
    assert all(len(tokens) == 6 for tokens in got)
    # Both kernels ran: steps with several query rows and pure-decode steps.
    assert max(seen) > 1 and min(seen) == 1
