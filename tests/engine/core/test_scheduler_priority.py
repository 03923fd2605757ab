"""Priority scheduling without a model: lower values first, arrival order within a class."""

from __future__ import annotations

from llmserve.engine.request import RequestStatus
from llmserve.engine.request_queue import RequestQueue
from tests.engine.core.driver import Core, make_request, scheduled

BATCH, ONLINE = 10, 0  # what batch lines and default online requests send


def ids(base: int, n: int) -> list[int]:
    return list(range(base, base + n))


def test_queue_orders_by_priority_then_arrival_and_requeues_at_the_front_of_a_class():
    q = RequestQueue()
    for rid, priority in [("b1", 10), ("o1", 0), ("b2", 10), ("o2", 0), ("urgent", -1)]:
        q.add(make_request(rid, 2, priority=priority))
    assert [r.request_id for r in q] == ["urgent", "o1", "o2", "b1", "b2"]
    q.add_front(make_request("pre-b", 2, priority=10))
    q.add_front(make_request("pre-o", 2, priority=0))
    assert [r.request_id for r in q] == ["urgent", "pre-o", "o1", "o2", "pre-b", "b1", "b2"]


def test_an_online_request_overtakes_queued_batch_lines():
    core = Core(num_blocks=16, max_num_batched_tokens=8)
    lines = [make_request(f"line{i}", ids(100 * i, 8), max_tokens=2, priority=BATCH)
             for i in range(1, 4)]
    core.add(*lines)
    assert scheduled(core.step()) == [("line1", 8)]  # one prompt fills the budget
    online = make_request("online", ids(900, 6), max_tokens=2, priority=ONLINE)
    core.add(online)
    assert core.waiting_ids() == ["online", "line2", "line3"]
    out = core.step()
    # The running line decodes first (it is running), then the online request is admitted
    # ahead of the lines that were queued before it; line2 gets the last budget token.
    assert scheduled(out) == [("line1", 1), ("online", 6), ("line2", 1)]
    assert core.running_ids() == ["online", "line2"]  # line1 finished
    assert core.waiting_ids() == ["line3"]


def test_running_requests_are_kept_and_served_in_priority_order():
    core = Core(num_blocks=16, max_num_batched_tokens=64)
    core.add(make_request("line", ids(100, 4), max_tokens=8, priority=BATCH))
    core.step()
    core.add(make_request("online", ids(200, 4), max_tokens=8, priority=ONLINE))
    core.step()
    assert core.running_ids() == ["online", "line"]
    assert scheduled(core.step()) == [("online", 1), ("line", 1)]


def test_when_the_pool_is_full_the_least_urgent_running_request_is_preempted():
    core = Core(num_blocks=6, max_num_batched_tokens=64)
    a = make_request("a", ids(100, 7), max_tokens=8, priority=ONLINE)
    line = make_request("line", ids(200, 7), max_tokens=8, priority=BATCH)
    core.add(a, line)
    core.step()
    c = make_request("c", ids(300, 7), max_tokens=8, priority=ONLINE)
    core.add(c)
    core.step()  # c admitted: running is [a, c, line], all six blocks held
    assert core.running_ids() == ["a", "c", "line"] and core.kv.num_free_blocks == 0
    out = core.step()  # a needs a block: the batch line goes, not c (the newest)
    assert out.preempted == [line]
    assert scheduled(out) == [("a", 1), ("c", 1)]
    assert core.waiting_ids() == ["line"]


def test_a_more_urgent_waiting_request_preempts_a_less_urgent_running_one():
    core = Core(num_blocks=16, max_num_seqs=1)
    line = make_request("line", ids(100, 5), max_tokens=6, priority=BATCH)
    core.add(line)
    core.step()
    online = make_request("online", ids(200, 5), max_tokens=2, priority=ONLINE)
    core.add(online)
    out = core.step()
    assert out.preempted == [line] and out.freed_ids == ["line"]
    assert scheduled(out) == [("online", 5)]
    assert line.status is RequestStatus.PREEMPTED and core.waiting_ids() == ["line"]
    core.step()
    assert online.output_token_ids == [100, 101] and online.is_finished
    out = core.step()  # the line resumes from its cached first block
    assert scheduled(out) == [("line", 2)] and out.starts == [4]
    while core.sched.has_unfinished():
        core.step()
    assert line.output_token_ids == [100, 101, 102, 103, 104, 105]


def test_equal_priorities_never_preempt_for_a_waiting_request():
    core = Core(num_blocks=16, max_num_seqs=1)
    first = make_request("first", ids(100, 5), max_tokens=3)
    core.add(first)
    core.step()
    core.add(make_request("second", ids(200, 5), max_tokens=3))
    out = core.step()
    assert out.preempted == [] and scheduled(out) == [("first", 1)]
    assert core.waiting_ids() == ["second"]


def test_a_waiting_request_preempts_only_while_it_cannot_be_admitted():
    core = Core(num_blocks=16, max_num_seqs=2)
    core.add(make_request("line", ids(100, 5), max_tokens=4, priority=BATCH))
    core.step()
    core.add(make_request("online", ids(200, 5), max_tokens=4, priority=ONLINE))
    out = core.step()  # a free sequence slot and free blocks: no reason to preempt
    assert out.preempted == [] and scheduled(out) == [("line", 1), ("online", 5)]


def test_no_preemption_when_the_less_urgent_blocks_would_not_make_room():
    core = Core(num_blocks=4)
    core.add(make_request("a", ids(100, 11), max_tokens=4, priority=ONLINE),
             make_request("line", ids(200, 2), max_tokens=4, priority=BATCH))
    core.step()
    assert core.kv.num_free_blocks == 0
    core.add(make_request("big", ids(300, 12), max_tokens=1, priority=ONLINE))
    out = core.step()  # big needs 3 blocks; preempting the line would free only 1
    assert out.preempted == [] and scheduled(out) == [("a", 1), ("line", 1)]
    assert core.waiting_ids() == ["big"]
