"""logit_bias: +100 forces a token, -100 bans it; a grammar's mask wins over a bias."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmserve.engine.llm_engine import LLMEngine
from llmserve.engine.request import Request
from llmserve.engine.sampler import Sampler
from llmserve.engine.sampling_constraints import apply_token_bitmask
from llmserve.sampling_params import SamplingParams
from llmserve.structured.masks import GrammarMasks


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return LLMEngine.from_args(tiny_dir, num_kv_blocks=128, block_size=16)


def _tokens(engine, run, params: SamplingParams) -> list[int]:
    engine.add_request("lb", [11, 42, 97], params)
    return run(engine)["lb"].outputs[0].token_ids


def test_plus_100_forces_the_token(engine, run):
    tokens = _tokens(engine, run, SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                                                 ignore_eos=True, logit_bias={123: 100}))
    assert tokens == [123] * 20


def test_minus_100_bans_the_token(engine, run):
    free = _tokens(engine, run, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    banned = free[0]
    biased = _tokens(engine, run, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True,
                                                 logit_bias={banned: -100}))
    assert banned not in biased


def _request(rid: str, **kw) -> Request:
    return Request(rid, [1, 2], SamplingParams(**kw), max_tokens=4)


def test_bias_applies_only_to_its_row_and_mask_wins_over_bias():
    logits = torch.zeros(3, 64)
    logits[:, 7] = 5.0  # the argmax everywhere without constraints
    requests = [_request("a", temperature=0.0, logit_bias={9: 100}),
                _request("b", temperature=0.0),
                _request("c", temperature=0.0, logit_bias={9: 100})]
    bitmask = torch.zeros(1, 2, dtype=torch.int32)
    bitmask[0, 0] = (1 << 3) | (1 << 7)  # row c may only take 3 or 7: the biased 9 is masked
    masks = GrammarMasks([2], bitmask)
    before = logits.clone()
    out = Sampler().sample(logits, requests, masks).to_host()
    assert out.token_ids == [9, 7, 7]
    assert torch.equal(logits, before)  # the caller's logits are not modified


def test_bitmask_unpacking_matches_a_reference():
    rng = np.random.default_rng(0)
    vocab = 100  # not a multiple of 32: the last word is partly padding
    words = rng.integers(-(2**31), 2**31, size=(2, 4), dtype=np.int64).astype(np.int32)
    logits = torch.randn(4, vocab)
    expected = logits.clone()
    for j, row in enumerate([1, 3]):
        for t in range(vocab):
            if not (int(words[j, t // 32]) >> (t % 32)) & 1:
                expected[row, t] = float("-inf")
    apply_token_bitmask(logits, [1, 3], torch.from_numpy(words))
    assert torch.equal(logits, expected)
