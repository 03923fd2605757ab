"""Thread mode: the step loop runs in a background thread of this process.

Commands are queued under a condition variable; the thread takes all of them between steps and
sleeps on the condition when the engine is idle. Reports are handed to the frontend on that
thread, which posts them to the event loops with `call_soon_threadsafe`. Only this thread ever
touches the engine, so the engine needs no locks.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from llmserve.engine.errors import EngineDeadError
from llmserve.engine.messages import Command, CoreMessage, Dead, StepReport, Stop
from llmserve.engine.step_loop import StepLoop
from llmserve.outputs import RequestOutput

logger = logging.getLogger(__name__)


class ThreadCore:
    """Runs a `StepLoop` over `engine` (an LLMEngine) in a daemon thread; a `CoreHandle`."""

    pid = None  # no engine-core process

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._cond = threading.Condition()
        self._commands: list[Command] = []
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._deliver: Callable[[CoreMessage], None] | None = None

    def start(self, deliver: Callable[[CoreMessage], None]) -> None:
        if self._thread is not None:
            return
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name="llmserve-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        with self._cond:
            if self._stopped:
                raise EngineDeadError("engine is shutting down")
            self._commands.append(command)
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            if not self._stopped:
                self._stopped = True
                self._commands.append(Stop())
                self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.engine.shutdown()  # tensor-parallel workers, if any

    def _receive(self, block: bool) -> list[Command]:
        with self._cond:
            while block and not self._commands:
                self._cond.wait()
            commands, self._commands = self._commands, []
        return commands

    def _run(self) -> None:
        try:
            StepLoop(self.engine, self._report, answer_adds_early=True).run(self._receive)
        except Exception as exc:  # noqa: BLE001 - a bug delivering a report: fail, never hang
            logger.exception("engine step thread failed")
            self._report(Dead(exc, traceback.format_exc()))

    def _report(self, message: CoreMessage) -> None:
        if isinstance(message, StepReport):
            outputs = [_snapshot(out) for out in message.outputs]
            message = StepReport(message.replies, outputs, message.stats, message.step_stats)
        else:  # the loop has ended: later commands fail fast instead of queueing for no one
            with self._cond:
                self._stopped = True
        self._deliver(message)


def _snapshot(out: RequestOutput) -> RequestOutput:
    """Copy the lists the engine keeps appending to, so the loop thread reads a stable view."""
    outputs = [
        dataclasses.replace(c, logprobs=list(c.logprobs)) if c.logprobs is not None else c
        for c in out.outputs
    ]
    return dataclasses.replace(out, outputs=outputs)
