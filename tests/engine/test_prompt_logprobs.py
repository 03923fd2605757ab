"""prompt_logprobs: every prompt token scored exactly as transformers scores it (fp32), across
chunked prefill, prefix-cache hits (skipped for these requests), preemption, n > 1 and the
engine-process pipe."""

from __future__ import annotations

import pickle
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmserve import LLM, SamplingParams
from llmserve.engine.output_wire import OutputDecoder, OutputEncoder
from llmserve.outputs import CompletionOutput, Logprob, RequestOutput

K = 3


@pytest.fixture(scope="module")
def hf_model(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()


def prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 400) for _ in range(length)] for length in [1, 2, 9, 37, 70][:n]]


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """[len - 1, vocab]: row i scores prompt token i + 1."""
    return torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1].float(), dim=-1)


def check(model, prompt: list[int], got, k: int = K) -> None:
    assert got is not None and len(got) == len(prompt) and got[0] is None
    if len(prompt) == 1:
        return
    ref = hf_prompt_logprobs(model, prompt)
    for i in range(1, len(prompt)):
        entry, row, token = got[i], ref[i - 1], prompt[i]
        assert entry[token].logprob == pytest.approx(float(row[token]), abs=1e-4), i
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        assert entry[token].decoded_token is not None
        top = sorted((lp for lp in entry.values() if lp.rank <= k), key=lambda lp: lp.rank)
        assert [lp.logprob for lp in top] == pytest.approx(row.topk(k).values.tolist(), abs=1e-4)
        assert len(entry) in (k, k + 1)  # the prompt's token plus the top-k (it may be in it)


def run(llm: LLM, batch: list[list[int]], params: list[SamplingParams]) -> list[RequestOutput]:
    return llm.generate([{"prompt_token_ids": p} for p in batch], params, use_tqdm=False)


def with_lp(k: int = K, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 3)
    return SamplingParams(temperature=0.0, ignore_eos=True, prompt_logprobs=k, **kw)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prompt_logprobs_match_transformers_in_a_mixed_batch(llama_dir, hf_model,
                                                             async_scheduling):
    llm = LLM(llama_dir, dtype="float32", async_scheduling=async_scheduling,
              max_num_batched_tokens=32)
    batch = prompts()
    params = [with_lp() if i % 2 == 0 else with_lp(k=None) for i in range(len(batch))]
    params[3] = with_lp(k=0)
    outs = run(llm, batch, params)
    for out, prompt, p in zip(outs, batch, params):
        if p.prompt_logprobs is None:
            assert out.prompt_logprobs is None
        else:
            check(hf_model, prompt, out.prompt_logprobs, p.prompt_logprobs)
    assert all(len(e) == 1 for e in outs[3].prompt_logprobs[1:])  # k = 0: the token alone
    assert llm.stats()["kv_blocks_free"] == llm.stats()["kv_blocks_total"]


def test_chunked_prefill_and_preemption(llama_dir, hf_model):
    # 16 tokens a step: the 37- and 70-token prompts are scored across 3 and 5 chunks; a pool
    # this small also preempts and recomputes.
    llm = LLM(llama_dir, dtype="float32", max_num_batched_tokens=16, block_size=16,
              num_kv_blocks=9)
    batch = prompts() + prompts(seed=1)[3:]
    outs = run(llm, batch, [with_lp(max_tokens=24 if i % 2 else 3) for i in range(len(batch))])
    for out, prompt in zip(outs, batch):
        check(hf_model, prompt, out.prompt_logprobs)
    assert llm.stats()["num_preemptions"] > 0
    assert llm.stats()["kv_blocks_free"] == 9


def test_prefix_cache_is_skipped_while_scoring_the_prompt(llama_dir, hf_model):
    llm = LLM(llama_dir, dtype="float32", block_size=16)
    prompt = prompts()[4]
    plain = SamplingParams(temperature=0.0, max_tokens=2)
    assert run(llm, [prompt], [plain])[0].prompt_logprobs is None
    assert run(llm, [prompt], [plain])[0].num_cached_tokens == 64  # the cache is warm
    out = run(llm, [prompt], [with_lp()])[0]
    assert out.num_cached_tokens == 0
    check(hf_model, prompt, out.prompt_logprobs)


def test_n_greater_than_one_scores_the_prompt_once(llama_dir, hf_model):
    llm = LLM(llama_dir, dtype="float32")
    prompt = prompts()[3]
    out = run(llm, [prompt], [SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=4,
                                             prompt_logprobs=2)])[0]
    assert len(out.outputs) == 3
    check(hf_model, prompt, out.prompt_logprobs, 2)


def test_prompt_logprobs_cross_the_pipe_once():
    enc, dec = OutputEncoder(), OutputDecoder()
    lps = [None, {7: Logprob(-1.5, 2, "x"), 9: Logprob(-0.5, 1, "y")}]

    def out(tokens, prompt_logprobs, finished=False):
        return RequestOutput("r", None, [3, 7], [CompletionOutput(0, "", tokens)], finished,
                             prompt_logprobs=prompt_logprobs)

    def trip(o):
        wire = pickle.loads(pickle.dumps(enc.encode([o])))
        return wire[0][-1], dec.decode(wire)[0]

    sent, got = trip(out([1], None))
    assert sent is None and got.prompt_logprobs is None
    sent, got = trip(out([1, 2], lps))
    assert sent == lps and got.prompt_logprobs == lps
    sent, got = trip(out([1, 2, 5], lps, finished=True))
    assert sent is None and got.prompt_logprobs == lps  # held by the decoder, not resent
