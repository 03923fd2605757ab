"""Block accounting under random add / abort / step sequences (property test)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmserve import SamplingParams
from llmserve.engine.llm_engine import LLMEngine

NUM_BLOCKS = 12


@pytest.fixture(scope="module")
def engine(llama_dir):
    return LLMEngine.from_args(
        llama_dir, dtype="float32", block_size=4, num_kv_blocks=NUM_BLOCKS,
        max_num_batched_tokens=16, max_num_seqs=4,
    )


def assert_pool_consistent(engine: LLMEngine) -> None:
    kv = engine.kv
    kv.pool.check_integrity()
    holders = Counter(b.block_id for blocks in kv.req_blocks.values() for b in blocks)
    for block in kv.pool.blocks:
        assert block.ref_cnt == holders.get(block.block_id, 0), block
    live = {r.request_id for r in engine.scheduler.running}
    assert set(kv.req_blocks) <= live | {r.request_id for r in engine.scheduler.waiting}


ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(1, 20), st.integers(1, 12), st.integers(1, 2)),
        st.tuples(st.just("abort"), st.integers(0, 30)),
        st.tuples(st.just("step"), st.integers(1, 4)),
    ),
    max_size=25,
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=ops)
def test_random_add_abort_step_returns_every_block(engine, ops):
    added: list[str] = []
    for op in ops:
        if op[0] == "add":
            _, prompt_len, max_tokens, n = op
            rid = f"r{len(added)}-{id(ops)}"
            # a shared start so prefix caching and shared blocks are exercised
            prompt = ([7, 8, 9, 10, 11] * 4)[:prompt_len]
            engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, n=n, temperature=0.8, seed=1))
            added.append(rid)
        elif op[0] == "abort" and added:
            engine.abort_request(added[op[1] % len(added)])
        else:
            for _ in range(op[1]):
                engine.step()
        assert_pool_consistent(engine)
    for rid in added:
        engine.abort_request(rid)
    while engine.has_unfinished_requests():
        engine.step()
    assert_pool_consistent(engine)
    assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"] == NUM_BLOCKS


def _drain(engine):
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("when", ["waiting", "mid_prefill", "decoding", "preempted"])
def test_abort_at_any_point_frees_all_blocks(engine, when):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    if when == "preempted":  # an older request that needs most of the pool
        engine.add_request("hog", list(range(30, 50)), SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    engine.add_request("victim", list(range(3, 23)), params)  # 20 tokens: prefill takes 2 steps
    if when == "mid_prefill":
        engine.step()
        assert 0 < engine.scheduler.requests["victim"].num_computed_tokens < 20
    elif when == "decoding":
        for _ in range(3):
            engine.step()
        assert engine.scheduler.requests["victim"].num_output_tokens > 0
    elif when == "preempted":
        for _ in range(40):
            engine.step()
            if engine.scheduler.requests["victim"].num_preemptions:
                break
        assert engine.scheduler.requests["victim"].num_preemptions > 0
        engine.abort_request("hog")
    engine.abort_request("victim")
    outs = _drain(engine)
    victim_outs = [o for o in outs if o.request_id == "victim"]
    assert victim_outs[-1].finished and victim_outs[-1].outputs[0].finish_reason == "abort"
    assert_pool_consistent(engine)
    assert engine.stats()["kv_blocks_free"] == NUM_BLOCKS
