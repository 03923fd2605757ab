"""Sampler: greedy, seeds, truncation support, penalties, min_tokens, logprobs, mixed batches."""

from __future__ import annotations

import math

import pytest
import torch

from llmserve.engine.request import Request
from llmserve.engine.sampler import Sampler, apply_penalties, process_logits
from llmserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_req(rid: str = "r", prompt=(1, 2, 3), output=(), eos=frozenset(), **params) -> Request:
    sp = SamplingParams(max_tokens=params.pop("max_tokens", 16), **params)
    req = Request(rid, list(prompt), sp, max_tokens=sp.max_tokens, eos_token_ids=frozenset(eos))
    for t in output:
        req.append_token(t)
    return req


def logits_from_probs(probs: list[float], rows: int, device: str = "cpu") -> torch.Tensor:
    return torch.tensor(probs, device=device).log().repeat(rows, 1)


def support(tokens: list[int]) -> set[int]:
    return set(tokens)


# --- greedy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_equals_argmax(device):
    torch.manual_seed(0)
    logits = torch.randn(6, 300, device=device)
    reqs = [make_req(f"r{i}", temperature=0.0) for i in range(6)]
    out = Sampler()(logits, reqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6


def test_greedy_slow_path_with_logprobs_equals_argmax():
    torch.manual_seed(1)
    logits = torch.randn(4, 200)
    reqs = [make_req(f"r{i}", temperature=0.0, logprobs=2) for i in range(4)]
    assert Sampler()(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy_over_steps():
    torch.manual_seed(2)
    sampler = Sampler()
    for _ in range(5):
        logits = torch.randn(8, 100)
        reqs = [make_req(f"r{i}", temperature=1.3, top_k=1, top_p=0.9) for i in range(8)]
        assert sampler(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_1_resolves_ties_like_argmax():
    logits = torch.zeros(200, 10)
    logits[:, 3] = logits[:, 6] = 2.0  # two equal maxima: argmax takes the first
    reqs = [make_req(f"r{i}", top_k=1) for i in range(199)] + [make_req("x")]  # not all greedy
    assert set(Sampler()(logits, reqs).token_ids[:199]) == {3}


def test_tiny_top_p_equals_greedy():
    torch.manual_seed(3)
    logits = torch.randn(16, 100)
    reqs = [make_req(f"r{i}", temperature=1.0, top_p=1e-6) for i in range(16)]
    assert Sampler()(logits, reqs).token_ids == logits.argmax(-1).tolist()


def test_vocab_size_hides_padded_columns():
    logits = torch.zeros(64, 20)
    logits[:, 16:] = 50.0  # padding columns the tokenizer cannot decode
    reqs = [make_req(f"r{i}", temperature=0.0 if i % 2 else 1.0) for i in range(64)]
    assert max(Sampler(vocab_size=16)(logits, reqs).token_ids) < 16


# --- seeds ----------------------------------------------------------------------------------


def _run_seeded(seed: int, position: int, mates: int, steps: list[torch.Tensor]) -> list[int]:
    """Sample `steps` for one seeded request placed at `position` among `mates` other rows."""
    sampler = Sampler()
    target = make_req("t", seed=seed, temperature=0.9, top_p=0.95)
    others = [make_req(f"o{i}", seed=100 + i if i % 2 else None) for i in range(mates)]
    got = []
    for step, row in enumerate(steps):
        gen = torch.Generator().manual_seed(1000 * mates + step)
        batch = torch.randn(mates + 1, row.numel(), generator=gen)
        batch[position] = row
        reqs = others[:position] + [target] + others[position:]
        token = sampler(batch, reqs).token_ids[position]
        target.append_token(token)
        got.append(token)
    return got


def test_seeded_request_independent_of_batch_mates_and_position():
    steps = [torch.randn(500, generator=torch.Generator().manual_seed(s)) * 0.1 for s in range(8)]
    alone = _run_seeded(42, 0, 0, steps)
    assert _run_seeded(42, 2, 3, steps) == alone
    assert _run_seeded(42, 5, 5, steps) == alone
    assert len(set(alone)) > 1  # the rows are near-uniform: the stream really is random


def test_different_seeds_give_different_streams():
    steps = [torch.zeros(1000) for _ in range(8)]
    assert _run_seeded(1, 0, 0, steps) != _run_seeded(2, 0, 0, steps)


def test_n_children_with_same_seed_get_distinct_streams():
    sp = SamplingParams(seed=7, max_tokens=4)
    a = Request("a", [1], sp, max_tokens=4, index=0)
    b = Request("b", [1], sp, max_tokens=4, index=1)
    logits = torch.zeros(2, 1000)
    toks = [Sampler()(logits, [a, b]).token_ids for _ in range(4)]
    assert [t[0] for t in toks] != [t[1] for t in toks]


# --- truncation: empirical support from many identical rows ------------------------------


PROBS = [0.4, 0.3, 0.2, 0.1]


def _sample_many(rows: int = 4000, probs=PROBS, **params) -> list[int]:
    reqs = [make_req(f"r{i}", **params) for i in range(rows)]
    return Sampler()(logits_from_probs(probs, rows), reqs).token_ids


def test_top_k_support_is_k_most_likely():
    assert support(_sample_many(top_k=2)) == {0, 1}
    assert support(_sample_many(top_k=3)) == {0, 1, 2}


@pytest.mark.parametrize(("top_p", "expected"), [(0.35, {0}), (0.65, {0, 1}), (0.75, {0, 1, 2})])
def test_top_p_keeps_minimal_prefix_reaching_p(top_p, expected):
    assert support(_sample_many(top_p=top_p)) == expected


def test_min_p_is_relative_to_max_probability():
    # threshold 0.3 * 0.4 = 0.12: keeps 0.4, 0.3, 0.2; drops 0.1
    assert support(_sample_many(min_p=0.3)) == {0, 1, 2}
    assert support(_sample_many(min_p=0.8)) == {0}


def test_top_k_then_top_p_renormalises():
    # top_k=3 -> 0.4/0.9, 0.3/0.9, 0.2/0.9 = .44,.33,.22; top_p=0.7 needs the first two
    assert support(_sample_many(top_k=3, top_p=0.7)) == {0, 1}


def test_sampling_frequencies_follow_tempered_distribution():
    tokens = _sample_many(rows=8000, temperature=0.5)
    expected = torch.softmax(torch.tensor(PROBS).log() / 0.5, -1).tolist()
    for tok, p in enumerate(expected):
        freq = tokens.count(tok) / len(tokens)
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(tokens)) + 1e-3, (tok, freq, p)


def test_full_support_without_truncation():
    assert support(_sample_many()) == {0, 1, 2, 3}


def test_process_logits_masks_and_scales():
    logits = logits_from_probs(PROBS, 2)
    reqs = [make_req("a", temperature=2.0, top_k=3), make_req("b", temperature=0.0)]
    out = process_logits(logits, reqs)
    assert torch.allclose(out[0, :3], logits[0, :3] / 2.0) and out[0, 3] == float("-inf")
    assert torch.equal(out[1], logits[1])  # greedy rows: penalised logits only


# --- penalties ------------------------------------------------------------------------------


def test_penalties_change_logits_exactly_as_defined():
    vocab = 8
    logits = torch.tensor([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0, -0.5, 0.0]] * 2)
    prompt, output = [1, 2], [2, 3, 3]
    reqs = [
        make_req("a", prompt=prompt, output=output, repetition_penalty=2.0,
                 presence_penalty=0.5, frequency_penalty=0.25),
        make_req("b", prompt=prompt, output=output),
    ]  # fmt: skip
    expected = logits[0].clone()
    for tok in set(prompt + output):  # repetition: prompt and output tokens
        v = expected[tok]
        expected[tok] = v / 2.0 if v > 0 else v * 2.0
    for tok in set(output):  # presence/frequency: output tokens only
        expected[tok] -= 0.5 + 0.25 * output.count(tok)
    got = apply_penalties(logits, reqs)
    assert torch.allclose(got[0], expected)
    assert torch.equal(got[1], logits[1])  # a row without penalties is untouched
    assert got.shape == (2, vocab)
    # token 1 only appears in the prompt: repetition applies, presence does not
    assert got[0, 1].item() == pytest.approx(-2.0)


@pytest.mark.parametrize("penalty", [7.2e-180, 1e-30, 1e-45])
def test_a_tiny_repetition_penalty_keeps_the_logits_finite(penalty):
    """Any positive penalty is accepted; one below float32's range made 0 in the sampler used
    to divide the positive logits of repeated tokens by zero (inf, then a NaN softmax that
    sampled token id == vocab) and to turn blocked tokens into NaN."""
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, 1.0]])
    req = make_req(prompt=[0, 1], output=[2], repetition_penalty=penalty, temperature=1.0,
                   logit_bias={3: -100}, logprobs=1)
    got = apply_penalties(logits, [req])
    assert not got.isnan().any() and got[0, [0, 2]].isfinite().all()
    assert got[0, 1].item() <= 0.0 and got[0, 4].item() == 1.0
    for _ in range(20):  # only the two boosted tokens (0 and 2) can come out
        out = Sampler()(logits, [req])
        assert out.token_ids[0] in (0, 2)


@pytest.mark.parametrize("top_p", [5e-324, 1e-45])
def test_a_top_p_below_float32_range_still_keeps_the_top_token(top_p):
    """Any top_p in (0, 1] is accepted; one that became 0 in float32 used to keep no token, and
    sampling drew token id == vocab (which the next step fed to the embedding)."""
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5, 1.0]] * 2)
    reqs = [make_req(top_p=top_p, temperature=1.0),
            make_req(top_p=top_p, temperature=1.0, top_k=3)]
    for _ in range(10):
        assert Sampler()(logits, reqs).token_ids == [2, 2]


def test_penalties_do_not_mutate_input_logits():
    logits = torch.randn(1, 10)
    before = logits.clone()
    apply_penalties(logits, [make_req(output=[1, 1], frequency_penalty=1.0)])
    Sampler()(logits, [make_req(output=[1, 1], frequency_penalty=1.0, temperature=0.7)])
    assert torch.equal(logits, before)


def test_frequency_penalty_steers_greedy_choice():
    logits = torch.tensor([[5.0, 4.0, 0.0]])
    req = make_req(output=[0, 0, 0], temperature=0.0, frequency_penalty=1.0)
    assert Sampler()(logits, [req]).token_ids == [1]


# --- min_tokens -----------------------------------------------------------------------------


def test_min_tokens_blocks_eos_and_stop_token_ids():
    logits = torch.zeros(1, 10)
    logits[0, 7] = 100.0  # eos
    logits[0, 8] = 90.0  # stop token
    params = dict(eos={7}, temperature=0.0, min_tokens=2, stop_token_ids=[8])
    early = make_req(output=[1], **params)
    out = process_logits(logits, [early])
    assert out[0, 7] == float("-inf") and out[0, 8] == float("-inf")
    assert Sampler()(logits, [early]).token_ids[0] not in (7, 8)
    done = make_req(output=[1, 2], **params)
    assert Sampler()(logits, [done]).token_ids == [7]


def test_min_tokens_with_ignore_eos_blocks_only_stop_ids():
    logits = torch.zeros(1, 10)
    logits[0, 7], logits[0, 8] = 100.0, 90.0
    req = make_req(eos={7}, temperature=0.0, min_tokens=2, stop_token_ids=[8], ignore_eos=True)
    assert Sampler()(logits, [req]).token_ids == [7]


def test_min_tokens_blocking_holds_for_random_rows():
    logits = torch.zeros(500, 4)
    logits[:, 3] = 3.0
    reqs = [make_req(f"r{i}", eos={3}, min_tokens=1) for i in range(500)]
    assert 3 not in Sampler()(logits, reqs).token_ids


# --- logprobs -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_and_ranks_match_log_softmax(device):
    torch.manual_seed(4)
    logits = torch.randn(3, 50, device=device) * 3
    reqs = [
        make_req("a", logprobs=3, temperature=0.8, repetition_penalty=1.5),
        make_req("b"),
        make_req("c", logprobs=0, temperature=0.0, presence_penalty=1.0, output=[5]),
    ]
    out = Sampler()(logits, reqs)
    ref = torch.log_softmax(logits.cpu(), -1)  # raw logits: before any processing
    for i in (0, 2):
        tok = out.token_ids[i]
        lp = out.logprobs[i][tok]
        assert abs(lp.logprob - ref[i, tok].item()) < 1e-5
        assert lp.rank == int((ref[i] > ref[i, tok]).sum()) + 1
    assert out.logprobs[1] is None
    assert list(out.logprobs[2]) == [out.token_ids[2]]  # logprobs=0: the chosen token only
    top = ref[0].topk(3)
    d = out.logprobs[0]
    assert list(d)[0] == out.token_ids[0]  # chosen first, then the top-k
    for r, (v, t) in enumerate(
        zip(top.values.tolist(), top.indices.tolist(), strict=True), start=1
    ):
        assert t in d and abs(d[t].logprob - v) < 1e-5 and d[t].rank == r
    assert len(d) in (3, 4)


# --- mixed batches and input checks ---------------------------------------------------------


def test_mixed_batch_greedy_rows_unaffected_by_random_rows():
    torch.manual_seed(5)
    logits = torch.randn(10, 64)
    reqs = [make_req(f"r{i}", temperature=0.0 if i % 3 == 0 else 1.0, top_k=5) for i in range(10)]
    out = Sampler()(logits, reqs).token_ids
    top5 = logits.topk(5, -1).indices
    for i, tok in enumerate(out):
        if i % 3 == 0:
            assert tok == logits[i].argmax().item()
        else:
            assert tok in top5[i].tolist()


def test_rejects_mismatched_rows_and_bad_shapes():
    with pytest.raises(ValueError, match="rows"):
        Sampler()(torch.zeros(2, 5), [make_req()])
    with pytest.raises(ValueError, match="2-D"):
        Sampler()(torch.zeros(5), [make_req()])
    assert Sampler()(torch.zeros(0, 5), []).token_ids == []


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_seeded_rows_reproducible_and_on_device():
    logits = torch.zeros(3, 1000, device="cuda")
    runs = []
    for _ in range(2):
        reqs = [make_req(f"r{i}", seed=11, top_k=50, top_p=0.9, min_p=0.01) for i in range(3)]
        runs.append(Sampler()(logits, reqs).token_ids)
    assert runs[0] == runs[1]
