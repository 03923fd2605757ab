"""Priority through a real engine: an online request overtakes batch lines, outputs unchanged."""

from __future__ import annotations

import pytest

from llmserve import SamplingParams
from llmserve.batch.bodies import BATCH_PRIORITY
from llmserve.engine.llm_engine import LLMEngine

PROMPTS = {f"line{i}": [5 + i, 17, 23, 42, 8, 9, 10 + i] for i in range(3)}
ONLINE = [31, 32, 33, 34, 35]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def engine(llama_dir):
    # One sequence at a time, so order is all that priority can change.
    return LLMEngine.from_args(llama_dir, dtype="float32", block_size=4, num_kv_blocks=32,
                               max_num_seqs=1, max_num_batched_tokens=64)


def run_alone(engine: LLMEngine, rid: str, prompt: list[int]) -> list[int]:
    engine.add_request(rid, prompt, GREEDY)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens = out.outputs[0].token_ids
    return tokens


def test_online_request_overtakes_queued_batch_lines(engine):
    expected = {rid: run_alone(engine, f"alone-{rid}", p) for rid, p in PROMPTS.items()}
    expected["online"] = run_alone(engine, "alone-online", ONLINE)

    for rid, prompt in PROMPTS.items():
        engine.add_request(rid, prompt, GREEDY, priority=BATCH_PRIORITY)
    engine.step()  # line0 is admitted and running
    engine.add_request("online", ONLINE, GREEDY)  # default priority 0: more urgent
    finished: list[str] = []
    results: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
                results[out.request_id] = list(out.outputs[0].token_ids)
    # The online request preempted line0 (the only sequence slot) and finished first.
    assert finished == ["online", "line0", "line1", "line2"]
    assert engine.scheduler.num_preemptions >= 1
    assert results == expected  # recompute after preemption changes no token
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
