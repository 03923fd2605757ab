"""The engine's use of the greedy screen (`llmserve.kernels.cpu_greedy`) on CPU: all-greedy
batches without logprobs take their tokens from it, token-exact against transformers; batches
that need the logits (logprobs, sampling, penalties, logit bias) never do."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmserve import LLM, SamplingParams
from llmserve.kernels import cpu_greedy, cpu_native
from tests.engine.parity import hf_greedy
from tests.engine.test_parity_transformers import make_prompts

pytestmark = pytest.mark.skipif(
    cpu_native.find_compiler() is None or cpu_greedy.blocker(torch.zeros(2, 2)) is not None,
    reason="greedy screen unavailable here")

MAX_TOKENS = 10


@pytest.fixture(scope="module")
def qwen3(checkpoint_factory):
    path = checkpoint_factory("qwen3", head_dim=32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = make_prompts(400)
    return path, batch, [hf_greedy(model, p, MAX_TOKENS)[0] for p in batch]


@pytest.fixture
def screen_calls(monkeypatch):
    """Counts the rows the screen decides. The class is looked up now: the kernel tests'
    conftest reloads llmserve.kernels modules, which replaces it."""
    calls = {"rows": 0}
    head_cls = cpu_greedy.GreedyHead
    real = head_cls.__call__

    def counting(self, hidden):
        calls["rows"] += hidden.shape[0]
        return real(self, hidden)

    monkeypatch.setattr(head_cls, "__call__", counting)
    return calls


def tokens(llm: LLM, batch, **params) -> list[list[int]]:
    sp = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **{"temperature": 0.0, **params})
    outs = llm.generate([{"prompt_token_ids": p} for p in batch], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("engine_args", [
    {},
    {"num_kv_blocks": 24, "block_size": 16},  # preemptions
    {"max_num_batched_tokens": 48, "enable_prefix_caching": False},  # chunked prefill
], ids=["plain", "preemption", "chunked"])
def test_screened_greedy_matches_transformers(qwen3, screen_calls, engine_args):
    path, batch, expected = qwen3
    llm = LLM(path, dtype="float32", **engine_args)
    assert llm.engine.runner.model.lm_head.greedy is not None
    assert tokens(llm, batch) == expected
    assert screen_calls["rows"] >= len(batch) * MAX_TOKENS
    if "num_kv_blocks" in engine_args:
        assert llm.stats()["num_preemptions"] > 0
        assert llm.stats()["kv_blocks_free"] == 24


@pytest.mark.parametrize("params", [
    {"logprobs": 1},
    {"temperature": 0.8, "seed": 3},
    {"repetition_penalty": 1.3},
    {"logit_bias": {5: 2.0}},
], ids=["logprobs", "sampling", "penalty", "logit_bias"])
def test_batches_that_need_logits_skip_the_screen(qwen3, screen_calls, monkeypatch, params):
    path, batch, _ = qwen3
    with_screen = tokens(LLM(path, dtype="float32"), batch[:6], **params)
    assert screen_calls["rows"] == 0
    monkeypatch.setenv(cpu_greedy.ENV_SWITCH, "0")
    llm = LLM(path, dtype="float32")
    assert llm.engine.runner.model.lm_head.greedy is None
    assert tokens(llm, batch[:6], **params) == with_screen


def test_a_mixed_batch_takes_the_logits_path(qwen3, screen_calls):
    path, batch, expected = qwen3
    llm = LLM(path, dtype="float32")
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    sampled = SamplingParams(temperature=0.9, seed=1, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch[:4]], [greedy, sampled] * 2,
                        use_tqdm=False)
    assert screen_calls["rows"] == 0
    assert [outs[0].outputs[0].token_ids, outs[2].outputs[0].token_ids] == [expected[0], expected[2]]


def test_switch_off_keeps_the_float32_head(qwen3, screen_calls, monkeypatch):
    path, batch, expected = qwen3
    monkeypatch.setenv(cpu_greedy.ENV_SWITCH, "0")
    llm = LLM(path, dtype="float32")
    assert llm.engine.runner.model.lm_head.greedy is None
    assert tokens(llm, batch) == expected
    assert screen_calls["rows"] == 0
