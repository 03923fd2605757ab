"""The step loop: the one piece of code that drives an LLMEngine for an AsyncEngine.

Thread mode (`thread_core.py`) and process mode (`engine_core.py`) run this same loop; they
differ only in where commands come from and where reports go. Each iteration applies every
command that has arrived (in order), runs one engine step if there is work, and reports what
happened in one `StepReport` (thread mode sends the answers to adds ahead of the step, in a
report of their own). It blocks for commands only when the engine is idle, so it never waits for
the frontend between steps.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

from llmserve.engine.messages import (
    Abort,
    AbortAll,
    Added,
    AddRequest,
    Command,
    CoreMessage,
    Dead,
    Rejected,
    Reply,
    StepReport,
    Stop,
    Stopped,
)

# receive(block) -> the commands that arrived since the last call; with block=True it waits
# until there is at least one.
Receive = Callable[[bool], list[Command]]


class StepLoop:
    """Drives one engine: `run(receive)` serves commands until `Stop` or a failed step.

    The engine is used only through `add_request`, `abort_request`, `step`,
    `has_unfinished_requests`, `stats` and `last_step`.
    """

    def __init__(self, engine: Any, report: Callable[[CoreMessage], None], *,
                 answer_adds_early: bool = False) -> None:
        self.engine = engine
        self._report = report
        # Thread mode answers adds before the step, so `await add_request` does not wait for
        # one; across a pipe that would be a second message per step, so process mode answers
        # them in the step's report.
        self._answer_adds_early = answer_adds_early
        self._live: set[str] = set()  # accepted and not yet reported finished
        self._last_step: object = None

    def run(self, receive: Receive) -> None:
        """Loop until a `Stop` command (reports `Stopped`) or until a step raises (reports
        `Dead`). What `receive` or `report` raise propagates: the transport is gone."""
        has_work = False
        while True:
            replies, aborts, stop = self._apply(receive(not has_work))
            if stop:
                self._report(Stopped())
                return
            if replies and self._answer_adds_early:
                self._report(StepReport(replies, [], self.engine.stats(), None))
                replies = []
            try:
                report, has_work = self._step(replies, aborts)
            except Exception as exc:  # noqa: BLE001 - fatal for every request: the frontend fails them
                self._report(Dead(exc, traceback.format_exc()))
                return
            self._report(report)

    def _apply(self, commands: list[Command]) -> tuple[list[Reply], set[str], bool]:
        """Apply adds now; collect aborts for the step. True when a `Stop` came."""
        replies: list[Reply] = []
        aborts: set[str] = set()
        for command in commands:
            if isinstance(command, AddRequest):
                replies.append(self._add(command))
            elif isinstance(command, Abort):
                aborts.update(command.request_ids)
            elif isinstance(command, AbortAll):
                aborts.update(self._live)
            elif isinstance(command, Stop):
                return replies, aborts, True
            else:
                raise TypeError(f"not a step loop command: {command!r}")
        return replies, aborts, False

    def _add(self, command: AddRequest) -> Reply:
        try:
            prompt_ids = self.engine.add_request(
                command.request_id, command.prompt, command.params,
                arrival_time=command.arrival_time, priority=command.priority,
            )
        except Exception as exc:  # noqa: BLE001 - the caller's bad input, handed back to it
            return Rejected(command.request_id, exc)
        self._live.add(command.request_id)
        return Added(command.request_id, list(prompt_ids))

    def _step(self, replies: list[Reply], aborts: set[str]) -> tuple[StepReport, bool]:
        engine = self.engine
        aborted = [rid for rid in aborts if rid in self._live]
        if aborted:
            engine.abort_request(aborted)
        outputs = []
        # An aborted request reports its final "abort" output in the next step, even if idle.
        if aborted or engine.has_unfinished_requests():
            outputs = engine.step()
        for out in outputs:
            if out.finished:
                self._live.discard(out.request_id)
        # Report each step's stats once: an iteration that did not step leaves last_step as it was.
        last_step = getattr(engine, "last_step", None)
        step_stats = last_step if last_step is not self._last_step else None
        self._last_step = last_step
        report = StepReport(replies, outputs, engine.stats(), step_stats)
        return report, engine.has_unfinished_requests()
