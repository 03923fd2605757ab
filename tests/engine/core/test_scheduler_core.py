"""Scheduler + KVCacheManager + BlockPool without a model, step by step, by block id.

Each test drives `schedule()` and `update_from_output()` the way `LLMEngine.step` does, with
fabricated tokens (100, 101, ... per request), and asserts the exact batch, block tables and
free-queue order after every step.
"""

from __future__ import annotations

from llmserve.engine.request import RequestStatus
from llmserve.engine.scheduler import StepWork
from tests.engine.core.driver import EOS, Core, make_request, scheduled


def ids(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def test_admission_fills_the_budget_in_arrival_order_then_chunks_the_last():
    core = Core(num_blocks=8, max_num_batched_tokens=16)
    a = make_request("a", ids(10, 6), max_tokens=2)
    b = make_request("b", ids(20, 5), max_tokens=2)
    c = make_request("c", ids(30, 7), max_tokens=2)
    core.add(a, b, c)

    out = core.step()
    assert scheduled(out) == [("a", 6), ("b", 5), ("c", 5)]  # c gets what is left: a chunk
    assert out.starts == [0, 0, 0]
    assert out.new_block_ids == [[0, 1], [2, 3], [4, 5]]
    assert out.sample_indices == [0, 1]  # c is not level with its length yet
    assert out.num_batched_tokens == 16
    assert out.work == {"a": StepWork(6, 0), "b": StepWork(5, 0), "c": StepWork(5, 0)}
    assert core.free_queue() == [6, 7]
    assert (a.output_token_ids, b.output_token_ids, c.output_token_ids) == ([100], [100], [])

    out = core.step()
    assert scheduled(out) == [("a", 1), ("b", 1), ("c", 2)]
    assert out.new_block_ids == [[], [], []]
    assert out.sample_indices == [0, 1, 2]
    # Decodes are billed once their token is kept; c's last prompt chunk is prefill work.
    assert out.work == {"a": StepWork(0, 1), "b": StepWork(0, 1), "c": StepWork(2, 0)}
    # a and b reach max_tokens and are freed tail-first: the partial block 1 goes to the head,
    # the cached block 0 to the tail; then b's 3 and 2 the same way.
    assert a.status is b.status is RequestStatus.FINISHED_LENGTH
    assert core.free_queue() == [3, 1, 6, 7, 0, 2]
    assert core.cached_ids() == {0, 2, 4}
    assert core.running_ids() == ["c"]

    out = core.step()
    assert out.freed_ids == ["a", "b"]  # the runner hears of releases at the next schedule
    assert scheduled(out) == [("c", 1)]
    assert c.output_token_ids == [100, 101] and c.is_finished


def test_chunked_prefill_samples_only_when_the_prompt_is_done():
    core = Core(num_blocks=8, max_num_batched_tokens=4)
    r = make_request("r", ids(10, 10), max_tokens=2)
    core.add(r)
    steps = [core.step() for _ in range(4)]
    assert [scheduled(s) for s in steps] == [[("r", 4)], [("r", 4)], [("r", 2)], [("r", 1)]]
    assert [s.starts for s in steps] == [[0], [4], [8], [10]]
    assert [s.new_block_ids for s in steps] == [[[0]], [[1]], [[2]], [[]]]
    assert [s.sample_indices for s in steps] == [[], [], [0], [0]]
    assert r.output_token_ids == [100, 101] and r.status is RequestStatus.FINISHED_LENGTH
    assert core.kv.num_free_blocks == 8 and core.blocks("r") == []


def test_a_shared_prefix_is_admitted_with_its_cached_blocks():
    core = Core(num_blocks=8)
    first = make_request("first", ids(10, 10), max_tokens=1)
    core.add(first)
    core.step()
    assert first.is_finished and core.free_queue() == [2, 3, 4, 5, 6, 7, 1, 0]

    second = make_request("second", ids(10, 8) + [7, 7], max_tokens=1)
    core.add(second)
    out = core.step()
    assert scheduled(out) == [("second", 2)] and out.starts == [8]
    assert out.new_block_ids == [[0, 1, 2]]  # two hits, then the head of the free queue
    assert second.num_cached_tokens == 8
    assert (core.kv.prefix_cache_queries, core.kv.prefix_cache_hits) == (20, 8)


def test_preemption_frees_the_newest_and_it_recomputes_from_what_stayed_cached():
    core = Core(num_blocks=4)
    a = make_request("a", ids(10, 7), max_tokens=3)
    b = make_request("b", ids(20, 7), max_tokens=8)
    core.add(a, b)
    out = core.step()
    assert out.new_block_ids == [[0, 1], [2, 3]] and core.free_queue() == []
    core.step()  # token 8 of each fills its second block: both blocks now cached
    assert core.cached_ids() == {0, 1, 2, 3}

    out = core.step()  # a needs a third block: b, the newest, is preempted
    assert out.preempted == [b] and scheduled(out) == [("a", 1)]
    assert out.new_block_ids == [[3]]  # b's blocks went to the tail 3, 2; a took 3
    assert out.freed_ids == ["b"]
    assert b.status is RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and core.sched.num_preemptions == 1
    assert core.waiting_ids() == ["b"]
    # a finished in that step: its partial block 3 to the head, cached 1 and 0 to the tail.
    assert a.is_finished and core.free_queue() == [3, 2, 1, 0]

    out = core.step()  # b returns: block 2 is still cached, block 3 was evicted by a
    assert scheduled(out) == [("b", 5)] and out.starts == [4]
    assert out.new_block_ids == [[2, 3, 1]]
    assert out.sample_indices == [0] and b.output_token_ids == [100, 101, 102]
    assert core.free_queue() == [0]


def test_no_admission_in_a_step_that_had_to_preempt():
    core = Core(num_blocks=4)
    a = make_request("a", ids(10, 7), max_tokens=8)
    b = make_request("b", ids(20, 7), max_tokens=8)
    core.add(a, b)
    core.step()
    core.step()
    late = make_request("late", ids(40, 2), max_tokens=1)
    core.add(late)
    out = core.step()
    assert out.preempted == [b] and scheduled(out) == [("a", 1)]
    assert core.waiting_ids() == ["b", "late"]  # the preempted one keeps its place ahead


def test_abort_frees_blocks_at_once_and_reports_the_row_next_step():
    core = Core(num_blocks=8)
    a = make_request("a", ids(10, 6), max_tokens=4)
    b = make_request("b", ids(20, 6), max_tokens=4)
    waiting = make_request("w", ids(30, 6), max_tokens=4)
    core.add(a, b)
    core.step()
    core.add(waiting)
    assert core.sched.abort(["a", "w", "missing"]) == [a, waiting]
    assert a.status is waiting.status is RequestStatus.FINISHED_ABORTED
    assert core.blocks("a") == [] and core.waiting_ids() == []
    assert core.free_queue() == [1, 4, 5, 6, 7, 0]
    assert core.sched.abort(["a"]) == []  # idempotent
    out = core.step()
    assert out.freed_ids == ["a", "w"] and scheduled(out) == [("b", 1)]
    assert "a" not in core.sched.requests


def test_async_scheduling_runs_ahead_on_placeholders():
    core = Core(num_blocks=8)
    r = make_request("r", ids(10, 6), max_tokens=3)
    core.add(r)
    out1 = core.schedule()
    assert scheduled(out1) == [("r", 6)] and r.num_output_placeholders == 1
    out2 = core.schedule()  # the next step's input is the token still in flight
    assert scheduled(out2) == [("r", 1)] and out2.starts == [6]
    assert r.num_output_placeholders == 2 and r.num_computed_tokens == 7
    assert core.update(out1) == [r] and r.output_token_ids == [100]
    out3 = core.schedule()
    assert scheduled(out3) == [("r", 1)] and out3.starts == [7]
    core.update(out2)
    out4 = core.schedule()
    assert out4.is_empty  # the token in flight is r's last (max_tokens): nothing to run
    core.update(out3)
    assert r.output_token_ids == [100, 101, 102] and r.status is RequestStatus.FINISHED_LENGTH
    assert r.num_output_placeholders == 0 and core.kv.num_free_blocks == 8


def test_a_stop_seen_one_step_late_drops_the_extra_token():
    core = Core(num_blocks=8)
    r = make_request("r", ids(10, 6), max_tokens=5)
    core.add(r)
    out1 = core.schedule()
    out2 = core.schedule()
    assert core.update(out1, {"r": EOS}) == [r]
    assert r.status is RequestStatus.FINISHED_STOPPED and core.blocks("r") == []
    assert core.update(out2) == []  # finished while the step ran: its token never lands
    assert r.output_token_ids == [EOS] and r.num_output_placeholders == 0
    assert core.schedule().freed_ids == ["r"]


def test_abort_with_a_step_in_flight_drops_its_token_and_frees_everything():
    core = Core(num_blocks=8)
    r = make_request("r", ids(10, 6), max_tokens=5)
    core.add(r)
    out1 = core.schedule()
    core.sched.abort(["r"])
    assert core.kv.num_free_blocks == 8
    assert core.update(out1) == [] and r.output_token_ids == []
    assert not core.sched.has_unfinished()
