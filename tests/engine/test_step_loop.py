"""The step loop that thread mode and process mode share, driven against a stand-in engine."""

from __future__ import annotations

import threading

import pytest

from llmserve.engine.errors import EngineDeadError
from llmserve.engine.messages import (
    Abort,
    AbortAll,
    Added,
    AddRequest,
    Dead,
    Rejected,
    StepReport,
    Stop,
    Stopped,
)
from llmserve.engine.step_loop import StepLoop
from llmserve.engine.thread_core import ThreadCore
from llmserve.outputs import CompletionOutput, RequestOutput


class FakeEngine:
    """The LLMEngine interface the loop uses: one token per request per step."""

    def __init__(self) -> None:
        self.requests: dict[str, list] = {}  # id -> [max_tokens, tokens so far, aborted]
        self.aborted: list[list[str]] = []
        self.steps = 0
        self.last_step: object = None
        self.fail_at_step: int | None = None

    def add_request(self, request_id, prompt, max_tokens, arrival_time=None, priority=0):
        if prompt == "bad":
            raise ValueError("bad prompt")
        self.requests[request_id] = [max_tokens, [], False]
        return [1, 2, 3]

    def abort_request(self, ids):
        self.aborted.append(sorted(ids))
        for rid in ids:
            self.requests[rid][2] = True

    def step(self):
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("device lost")
        self.last_step = object()
        outputs = []
        for rid, (max_tokens, tokens, aborted) in list(self.requests.items()):
            if not aborted:
                tokens.append(7)
            reason = "abort" if aborted else "length" if len(tokens) >= max_tokens else None
            outputs.append(RequestOutput(rid, None, [1, 2, 3],
                                         [CompletionOutput(0, "", list(tokens), None, None, reason)],
                                         reason is not None))
            if reason is not None:
                del self.requests[rid]
        return outputs

    def has_unfinished_requests(self):
        return bool(self.requests)

    def stats(self):
        return {"num_running": len(self.requests), "num_waiting": 0}

    def shutdown(self):
        pass


def _run(engine: FakeEngine, batches: list[list]) -> tuple[list, list[bool]]:
    """Run the loop over scripted command batches (then Stop); return reports and block flags."""
    reports, blocks = [], []
    script = list(batches)

    def receive(block: bool) -> list:
        blocks.append(block)
        return script.pop(0) if script else [Stop()]

    StepLoop(engine, reports.append).run(receive)
    return reports, blocks


def _add(rid: str, max_tokens: int = 2, prompt: str = "hi") -> AddRequest:
    return AddRequest(rid, prompt, max_tokens, 0.0, 0)  # FakeEngine's params: max_tokens


def test_adds_are_answered_and_stepped_until_done_blocking_only_when_idle():
    engine = FakeEngine()
    reports, blocks = _run(engine, [[_add("a", 2), _add("b", 1, prompt="bad")], [], []])
    first, second, idle, stopped = reports
    assert first.replies[0] == Added("a", [1, 2, 3])
    assert isinstance(first.replies[1], Rejected) and "bad prompt" in str(first.replies[1].error)
    assert [o.outputs[0].token_ids for o in first.outputs] == [[7]]
    assert second.replies == [] and second.outputs[0].finished
    assert first.stats == {"num_running": 1, "num_waiting": 0}
    assert idle.outputs == [] and stopped == Stopped()
    # It waits for commands only once the engine has nothing left to do.
    assert blocks == [True, False, True, True]
    assert engine.steps == 2


def test_thread_mode_answers_adds_before_the_step():
    engine = FakeEngine()
    reports, steps_at_report = [], []

    def report(message):
        reports.append(message)
        steps_at_report.append(engine.steps)

    script = [[_add("a", 1), _add("b", 1, prompt="bad")]]
    StepLoop(engine, report, answer_adds_early=True).run(
        lambda block: script.pop(0) if script else [Stop()])
    answers, stepped = reports[0], reports[1]
    assert [type(r) for r in answers.replies] == [Added, Rejected]
    assert answers.outputs == [] and answers.step_stats is None
    assert answers.stats["num_running"] == 1  # the engine's view right after the adds
    assert stepped.replies == [] and stepped.outputs[0].finished
    assert steps_at_report[:2] == [0, 1]  # the answers went out before the step ran


def test_step_stats_are_reported_once_per_step_that_ran():
    engine = FakeEngine()
    reports, _ = _run(engine, [[_add("a", 1)], [Abort(["nobody"])]])
    ran, idle = reports[0], reports[1]
    assert ran.step_stats is engine.last_step is not None
    assert idle.step_stats is None  # no step ran: last_step is unchanged and not sent again


def test_aborts_reach_the_engine_only_for_live_requests_and_report_the_final_output():
    engine = FakeEngine()
    reports, _ = _run(engine, [[_add("a", 50)], [Abort(["a", "unknown"])], [Abort(["a"])]])
    assert engine.aborted == [["a"]]  # the unknown id and the repeat are dropped
    final = reports[1].outputs[0]
    assert final.finished and final.outputs[0].finish_reason == "abort"


def test_abort_all_applies_in_order_to_what_is_live_when_it_is_read():
    engine = FakeEngine()
    _run(engine, [[_add("a", 50), AbortAll(), _add("b", 50)], [Abort(["b"])]])
    assert engine.aborted == [["a"], ["b"]]


def test_stop_ends_the_loop_before_later_commands():
    engine = FakeEngine()
    reports, _ = _run(engine, [[_add("a", 5), Stop(), _add("b", 5)]])
    assert reports == [Stopped()]
    assert "b" not in engine.requests and engine.steps == 0


def test_a_failing_step_reports_dead_with_its_traceback_and_ends_the_loop():
    engine = FakeEngine()
    engine.fail_at_step = 2
    reports, blocks = _run(engine, [[_add("a", 5)], [], []])
    assert isinstance(reports[0], StepReport)
    dead = reports[-1]
    assert isinstance(dead, Dead) and str(dead.error) == "device lost"
    assert "RuntimeError: device lost" in dead.traceback
    assert len(reports) == 2 and len(blocks) == 2  # nothing read after the failure


def test_an_unknown_command_is_a_type_error():
    with pytest.raises(TypeError, match="not a step loop command"):
        _run(FakeEngine(), [[("add", "a")]])


def test_thread_core_runs_the_loop_and_turns_a_delivery_bug_into_dead():
    got, ended = [], threading.Event()

    def deliver(message):
        got.append(message)
        if isinstance(message, StepReport):
            raise RuntimeError("frontend bug")
        ended.set()

    core = ThreadCore(FakeEngine())
    core.start(deliver)
    core.send(_add("a", 3))
    assert ended.wait(10)
    assert isinstance(got[0], StepReport) and got[0].replies == [Added("a", [1, 2, 3])]
    assert len(got) == 2 and isinstance(got[1], Dead) and "frontend bug" in got[1].traceback
    with pytest.raises(EngineDeadError):
        core.send(_add("b"))  # nobody would read it
    core.shutdown(5.0)
