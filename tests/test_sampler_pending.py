"""Sampler.sample() -> PendingSample, seeds, generators, penalties over steps, history flag."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from llmserve.engine.request import Request
from llmserve.engine.sampler import PendingSample, Sampler, apply_penalties, needs_output_history
from llmserve.engine.sampling_penalties import TokenHistory
from llmserve.engine.sampling_tensors import SamplingTensors
from llmserve.sampling_params import SamplingParams

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_req(rid: str = "r", prompt=(1, 2, 3), output=(), eos=frozenset(), **params) -> Request:
    sp = SamplingParams(max_tokens=params.pop("max_tokens", 64), **params)
    req = Request(rid, list(prompt), sp, max_tokens=sp.max_tokens, eos_token_ids=frozenset(eos))
    for t in output:
        req.append_token(t)
    return req


MIXED = [
    dict(temperature=0.0),
    dict(temperature=0.8, top_p=0.9),
    dict(temperature=1.2, top_k=20, top_p=0.7, min_p=0.02, seed=3),
    dict(temperature=0.0, logprobs=3, repetition_penalty=1.3),
    dict(temperature=0.7, logprobs=0, presence_penalty=0.5, frequency_penalty=0.2, seed=9),
    dict(temperature=1.0, min_tokens=4, stop_token_ids=[5], eos={7}),
    dict(temperature=1.0, top_k=5),
]


def mixed_batch() -> list[Request]:
    reqs = []
    for i, params in enumerate(MIXED):
        params = dict(params)
        reqs.append(make_req(f"m{i}", prompt=(i, 2, 9), output=(4, 4, 11)[: i % 4], **params))
    return reqs


@pytest.mark.parametrize("device", DEVICES)
def test_sample_then_to_host_equals_call(device):
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(0)).to(device)
    torch.manual_seed(1)
    called = Sampler()(logits, mixed_batch())
    torch.manual_seed(1)
    pending = Sampler().sample(logits, mixed_batch())
    assert isinstance(pending, PendingSample)
    assert pending.token_ids.dtype == torch.long and pending.token_ids.shape == (len(MIXED),)
    assert pending.token_ids.device == logits.device
    got = pending.to_host()
    assert got == called
    assert pending.token_ids.tolist() == got.token_ids
    assert pending.to_host() is got  # one transfer, however often it is read


@pytest.mark.parametrize("device", DEVICES)
def test_all_greedy_pending_is_one_argmax_on_the_device(device):
    logits = torch.randn(5, 100, device=device)
    pending = Sampler().sample(logits, [make_req(f"g{i}", temperature=0.0) for i in range(5)])
    assert pending.token_ids.device == logits.device
    assert torch.equal(pending.token_ids, logits.argmax(-1))
    assert pending.to_host().token_ids == logits.argmax(-1).tolist()


def test_sample_copies_what_it_needs_from_the_requests():
    logits = torch.randn(len(MIXED), 300, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    expected = Sampler()(logits, mixed_batch())
    reqs = mixed_batch()
    torch.manual_seed(3)
    pending = Sampler().sample(logits, reqs)
    for r in reqs:  # what the engine does next: append tokens, even change the request
        r.append_token(17)
        r.sampling_params = dataclasses.replace(r.sampling_params, logprobs=None)
    assert pending.to_host() == expected


def test_empty_batch():
    pending = Sampler().sample(torch.zeros(0, 5), [])
    assert pending.token_ids.shape == (0,) and pending.to_host().token_ids == []


# --- seeds and generators ------------------------------------------------------------------


SEEDED = dict(seed=42, temperature=0.9, top_k=40, top_p=0.8, min_p=0.01, presence_penalty=0.3)


def _stream(position: int, mates: list[dict], steps: list[torch.Tensor]) -> list[int]:
    """The seeded request's tokens when placed at `position` among `mates`."""
    sampler = Sampler()
    target = make_req("t", **SEEDED)
    others = [make_req(f"o{i}", **params) for i, params in enumerate(mates)]
    got = []
    for step, row in enumerate(steps):
        batch = torch.randn(
            len(mates) + 1, row.numel(), generator=torch.Generator().manual_seed(step)
        )
        batch[position] = row
        reqs = others[:position] + [target] + others[position:]
        token = sampler(batch, reqs).token_ids[position]
        target.append_token(token)
        for r in others:
            r.append_token(step)
        got.append(token)
    return got


def test_seeded_row_independent_of_batch_mates_and_position():
    steps = [torch.randn(800, generator=torch.Generator().manual_seed(50 + s)) for s in range(10)]
    alone = _stream(0, [], steps)
    mates = [dict(params) for params in MIXED if "eos" not in params]
    assert _stream(3, mates, steps) == alone
    assert _stream(len(mates), mates, steps) == alone
    assert _stream(1, [dict(seed=42, temperature=0.9)] * 4, steps) == alone  # same seed, others
    assert len(set(alone)) > 3


def test_generators_are_used_only_by_seeded_random_rows():
    seeded_random = make_req("a", seed=1, temperature=1.0)
    seeded_greedy = make_req("b", seed=2, temperature=0.0, logprobs=1)
    unseeded = make_req("c", temperature=1.0)
    before = [seeded_random.generator.get_state(), seeded_greedy.generator.get_state()]
    Sampler()(torch.randn(3, 50), [seeded_random, seeded_greedy, unseeded])
    assert not torch.equal(seeded_random.generator.get_state(), before[0])
    assert torch.equal(seeded_greedy.generator.get_state(), before[1])


def test_zero_probability_tokens_are_never_sampled():
    logits = torch.full((3000, 64), float("-inf"))
    logits[:, 0] = 0.0  # first and last columns: the edges of the inverse CDF
    logits[:, 63] = 0.0
    logits[:1000, 31] = 5.0
    reqs = [make_req(f"r{i}", temperature=1.0) for i in range(3000)]
    tokens = Sampler()(logits, reqs).token_ids
    assert set(tokens[:1000]) <= {0, 31, 63} and set(tokens[1000:]) == {0, 63}


# --- penalties: vectorised, with a per-request history that grows by appends -----------------


def ref_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """The former dense implementation, with counts built token by token."""
    batch, vocab = logits.shape
    seen = torch.zeros(batch, vocab)
    counts = torch.zeros(batch, vocab)
    out = logits.clone()
    for i, r in enumerate(requests):
        sp = r.sampling_params
        if len(r.output_token_ids) < sp.min_tokens:
            stops = set(sp.stop_token_ids or ()) | (
                set() if sp.ignore_eos else set(r.eos_token_ids)
            )
            for t in stops:
                if 0 <= t < vocab:
                    out[i, t] = float("-inf")
        if sp.repetition_penalty != 1.0:
            for t in r.all_token_ids:
                if 0 <= t < vocab:
                    seen[i, t] = 1.0
        if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
            for t in r.output_token_ids:
                if 0 <= t < vocab:
                    counts[i, t] += 1
    rep = torch.tensor([r.sampling_params.repetition_penalty for r in requests])[:, None]
    pres = torch.tensor([r.sampling_params.presence_penalty for r in requests])[:, None]
    freq = torch.tensor([r.sampling_params.frequency_penalty for r in requests])[:, None]
    out = torch.where(seen > 0, torch.where(out > 0, out / rep, out * rep), out)
    return out - pres * (counts > 0) - freq * counts


def test_penalties_equal_reference_as_histories_grow_and_get_rewritten():
    gen = torch.Generator().manual_seed(7)
    vocab = 40
    params = [
        dict(repetition_penalty=1.5), dict(presence_penalty=0.7), dict(frequency_penalty=0.4),
        dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=0.3),
        dict(), dict(min_tokens=3, stop_token_ids=[2, 99], eos={5}),
    ]  # fmt: skip
    reqs = [
        make_req(f"p{i}", prompt=torch.randint(vocab, (5 + i,), generator=gen).tolist(), **p)
        for i, p in enumerate(params)
    ]
    history = TokenHistory()
    for step in range(8):
        logits = torch.randn(len(reqs), vocab, generator=gen) * 3
        st = SamplingTensors.from_requests(reqs, vocab, logits.device)
        assert torch.equal(apply_penalties(logits, reqs, st, history), ref_penalties(logits, reqs))
        for r in reqs:
            r.append_token(int(torch.randint(vocab, (1,), generator=gen)))
        if step == 4:  # a history that is rewritten, not appended to, must not be used stale
            reqs[1].output_token_ids[-2] = reqs[1].all_token_ids[-2] = 39  # already cached
            for _ in range(2):
                reqs[2].output_token_ids.pop()
                reqs[2].all_token_ids.pop()


def test_penalties_on_a_subset_leave_other_rows_bitwise_untouched():
    logits = torch.randn(4, 30)
    reqs = [make_req("a"), make_req("b", output=[3, 3], frequency_penalty=1.0), make_req("c"),
            make_req("d", repetition_penalty=2.0)]  # fmt: skip
    out = apply_penalties(logits, reqs)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert out[1, 3] == logits[1, 3] - 2.0


# --- the history flag for overlapped scheduling ----------------------------------------------


def test_needs_output_history():
    assert not needs_output_history(make_req(temperature=0.7, top_p=0.9, seed=3, logprobs=2))
    assert needs_output_history(make_req(repetition_penalty=1.1))
    assert needs_output_history(make_req(presence_penalty=0.1))
    assert needs_output_history(make_req(frequency_penalty=-0.1))
    early = make_req(min_tokens=2, output=[1], eos={7})
    assert needs_output_history(early)
    early.append_token(1)
    assert not needs_output_history(early)  # min_tokens reached: nothing is blocked any more
    assert needs_output_history(make_req(min_tokens=2, stop_token_ids=[9], ignore_eos=True))
    # Nothing to block (no stop ids, eos ignored): the outputs do not change the distribution.
    assert not needs_output_history(make_req(min_tokens=2, eos={7}, ignore_eos=True))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sample_makes_no_host_sync():
    logits = torch.randn(len(MIXED), 3000, device="cuda")
    sampler = Sampler()
    sampler.sample(logits, mixed_batch()).to_host()  # warm-up: twins, pinned pool
    reqs = mixed_batch()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pending = sampler.sample(logits, reqs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(pending.to_host().token_ids) == len(MIXED)


def test_large_vocab_batches_are_sampled_in_chunks_with_the_same_results():
    # 70k columns: the CPU path samples random rows three at a time.
    vocab = 70_000
    logits = torch.randn(9, vocab, generator=torch.Generator().manual_seed(11)) * 3
    wide = dict(top_k=50, temperature=3.0)  # ~50 likely tokens: a wrong stream shows
    params = [dict(temperature=0.0), dict(top_k=2), dict(seed=5, **wide), dict(top_k=3, top_p=0.9),
              dict(temperature=0.0), dict(top_k=2, min_p=0.1), dict(top_k=2), dict(top_k=2),
              dict(seed=6, **wide)]  # fmt: skip
    reqs = [make_req(f"c{i}", **p) for i, p in enumerate(params)]
    threads = torch.get_num_threads()
    sampler = Sampler()
    runs = [sampler(logits, reqs).token_ids for _ in range(3)]
    assert torch.get_num_threads() == threads  # sampling leaves torch's thread count alone
    top = logits.topk(50, dim=-1).indices
    for i, p in enumerate(params):
        if p.get("temperature") == 0.0:
            assert runs[0][i] == int(logits[i].argmax())
        else:
            assert all(run[i] in top[i, : p["top_k"]].tolist() for run in runs)
    for i in (2, 8):  # seeded rows: as if sampled alone, step after step
        alone = make_req("alone", **params[i])
        sampler = Sampler()
        assert [sampler(logits[i : i + 1], [alone]).token_ids[0] for _ in range(3)] == [
            run[i] for run in runs
        ]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_ties_take_the_lowest_id(device):
    logits = torch.randint(0, 3, (64, 500), generator=torch.Generator().manual_seed(8)).float()
    reqs = [make_req(f"g{i}", temperature=0.0) for i in range(64)]
    expected = [int((row == row.max()).nonzero()[0]) for row in logits]
    assert Sampler()(logits.to(device), reqs).token_ids == expected
