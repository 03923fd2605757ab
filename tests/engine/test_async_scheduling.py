"""Async scheduling (step N+1 launched before step N's tokens are read) changes nothing a user sees.

Stops are seen one step late on the host; the token sampled past a stop must be dropped before
it reaches text, token ids, logprobs, usage or the work counters, and every block must come back,
including when a request is aborted while a step that reads its blocks is in flight.
"""

from __future__ import annotations

import pytest

from llmserve import SamplingParams
from llmserve.engine.llm_engine import LLMEngine

PROMPTS = [[5, 6, 7, 8] * i + [9] for i in range(1, 7)]


@pytest.fixture(scope="module")
def engines(llama_dir):
    make = lambda asy: LLMEngine.from_args(  # noqa: E731
        llama_dir, dtype="float32", async_scheduling=asy, num_kv_blocks=64, block_size=4)
    return {False: make(False), True: make(True)}


def run(engine: LLMEngine, params: SamplingParams | list[SamplingParams], prompts=PROMPTS):
    params = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(f"r{i}", prompt, p)
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.pool.check_integrity()
    return [final[f"r{i}"] for i in range(len(prompts))]


def summary(out):
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason, c.logprobs, c.cumulative_logprob)
            for c in out.outputs] + [out.num_computed_prefill_tokens, out.num_computed_decode_tokens]


def assert_same(a, b):
    assert [summary(o) for o in a] == [summary(o) for o in b]


def test_async_engine_overlaps_and_matches_sync(engines):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)
    sync, overlapped = run(engines[False], params), run(engines[True], params)
    assert_same(sync, overlapped)
    assert all(len(o.outputs[0].token_ids) == 12 for o in overlapped)


def test_stop_token_ends_at_the_same_token_with_and_without_overlap(engines):
    free = run(engines[False], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    # Stop each request on the token it would emit at position 3: the next step is already in
    # flight when the host sees it.
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1,
                             stop_token_ids=[o.outputs[0].token_ids[3]]) for o in free]
    sync, overlapped = run(engines[False], params), run(engines[True], params)
    assert_same(sync, overlapped)
    for out, ref in zip(overlapped, free):
        tokens = out.outputs[0].token_ids
        assert out.outputs[0].finish_reason == "stop"
        assert tokens == ref.outputs[0].token_ids[: len(tokens)]
        assert len(tokens) <= 4 and len(out.outputs[0].logprobs) == len(tokens)
        assert out.num_computed_decode_tokens == len(tokens) - 1  # the dropped step is not billed


def test_stop_string_ends_at_the_same_token_with_and_without_overlap(engines):
    free = run(engines[False], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    stops = []
    for out in free:
        text = out.outputs[0].text
        stops.append(text[len(text) // 2 : len(text) // 2 + 2] or "x")
    params = [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[s]) for s in stops]
    sync, overlapped = run(engines[False], params), run(engines[True], params)
    assert_same(sync, overlapped)
    assert any(o.outputs[0].finish_reason == "stop" and len(o.outputs[0].token_ids) < 12
               for o in overlapped)


def test_seeded_sampling_and_penalties_match(engines):
    params = [
        SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=3, max_tokens=10, ignore_eos=True,
                       repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=1.0, seed=11, max_tokens=10, min_tokens=6,
                       stop_token_ids=list(range(50))),
        SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, frequency_penalty=1.0),
    ] * 2
    prompts = PROMPTS[: len(params)] + PROMPTS[: len(params) - len(PROMPTS)]
    sync, overlapped = run(engines[False], params, prompts), run(engines[True], params, prompts)
    assert_same(sync, overlapped)


def test_abort_during_an_in_flight_step_returns_every_block(engines):
    engine = engines[True]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"a{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None  # a step that reads these requests' blocks is running
    engine.abort_request(["a0", "a3"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
            if out.request_id in ("a0", "a3"):
                assert out.finished  # nothing after the abort
        if len(finished) == 2:
            engine.abort_request([f"a{i}" for i in range(len(PROMPTS))])
    assert finished["a0"].outputs[0].finish_reason == "abort"
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    engine.kv.pool.check_integrity()
    assert not engine.scheduler.requests


def test_runner_block_tables_mirror_the_kv_manager(engines):
    engine = engines[True]
    params = SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(f"m{i}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            assert engine.runner.batch.block_ids(request.request_id) == \
                engine.kv.block_ids(request.request_id)
