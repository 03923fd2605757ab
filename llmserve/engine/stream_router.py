"""The receiving half of an AsyncEngine: the step loop's reports become deliveries to streams.

Reports arrive on one thread (the step thread, or the pipe's reader thread). Each output is
handed to the event loop of its request with `call_soon_threadsafe`, where the observers run and
then the request's `RequestStream` gets it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from llmserve.engine.errors import EngineDeadError
from llmserve.engine.hooks import Hooks
from llmserve.engine.messages import Added, CoreMessage, Dead, StepReport, Stopped
from llmserve.engine.request_stream import RequestStream

if TYPE_CHECKING:
    from llmserve.outputs import RequestOutput
    from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class PendingAdd:
    """An add sent to the step loop and not answered yet."""

    stream: RequestStream
    params: SamplingParams
    arrival_time: float
    info: dict
    future: asyncio.Future


class StreamRouter:
    """Routes step reports to request streams; the base of `AsyncEngine`, which sends the
    commands. It holds the state both halves share, under `_lock` where two threads touch it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._unacked: dict[str, PendingAdd] = {}  # sent to the step loop, no reply yet
        self._stats: dict = {}  # the engine's stats() as of the latest report
        self._dead: BaseException | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None  # where on_step runs
        self._streams: dict[str, RequestStream] = {}  # event loop side: open streams
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # delivering side: live requests
        self._hooks = Hooks()

    def _on_core_message(self, message: CoreMessage) -> None:
        """Handle a report of the step loop (on its thread, or on the pipe's reader thread)."""
        if isinstance(message, StepReport):
            self._on_step(message)
        elif isinstance(message, Dead):
            if message.traceback is not None:
                logger.error("engine step failed; failing every in-flight request\n%s",
                             message.traceback)
            self._die(message.error)
        elif isinstance(message, Stopped):
            self._die(EngineDeadError("engine stopped"))

    def _on_step(self, report: StepReport) -> None:
        now = time.time()
        answered = []
        with self._lock:
            for reply in report.replies:
                pending = self._unacked.pop(reply.request_id, None)
                if pending is not None:
                    answered.append((reply, pending))
            self._stats = report.stats
        for reply, pending in answered:
            loop = pending.stream.loop
            if isinstance(reply, Added):
                self._loops[reply.request_id] = loop
                call_soon(loop, self._accepted, pending, reply.prompt_token_ids)
            else:
                call_soon(loop, self._rejected, pending, reply.error)
        self._dispatch(report.outputs, now, report.step_stats)

    def _dispatch(self, outputs: list[RequestOutput], now: float, step: object) -> None:
        """Hand a step's outputs (which nobody will mutate any more) and its step stats (None
        when no step ran) to the event loops of their requests."""
        by_loop: dict[asyncio.AbstractEventLoop, list[RequestOutput]] = {}
        for out in outputs:
            rid = out.request_id
            # pop, not del: a shutdown that gave up waiting may clear the map concurrently
            loop = self._loops.pop(rid, None) if out.finished else self._loops.get(rid)
            if loop is not None:
                by_loop.setdefault(loop, []).append(out)
        if step is not None and self._hooks.wanted("on_step"):
            call_soon(self._main_loop, self._hooks.call, "on_step", step)
        for loop, batch in by_loop.items():
            call_soon(loop, self._deliver, batch, now)

    def _die(self, exc: BaseException) -> None:
        """Fail every open request with `exc` (the first call wins)."""
        with self._lock:
            if self._dead is not None:
                return
            self._dead = exc
            pending, self._unacked = list(self._unacked.values()), {}
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine failed: {exc}")
        for add in pending:
            call_soon(add.stream.loop, self._rejected, add, error)
        for stream in list(self._streams.values()):
            call_soon(stream.loop, self._fail, stream, error)
        self._loops.clear()

    # ------------------------------------------------------------------ event loop side

    def _accepted(self, pending: PendingAdd, prompt_ids: list[int]) -> None:
        stream = pending.stream
        stream.prompt_token_ids = prompt_ids
        info = {"prompt_token_ids": prompt_ids, "params": pending.params,
                "arrival_time": pending.arrival_time, **pending.info}
        self._hooks.call("on_request_added", stream.request_id, info)
        if not pending.future.done():
            pending.future.set_result(prompt_ids)

    def _rejected(self, pending: PendingAdd, exc: BaseException) -> None:
        self._streams.pop(pending.stream.request_id, None)
        pending.stream._finished = True
        if not pending.future.done():
            pending.future.set_exception(exc)

    def _fail(self, stream: RequestStream, exc: BaseException) -> None:
        self._streams.pop(stream.request_id, None)
        if stream.accepted is not None and not stream.accepted.done():
            stream.accepted.set_exception(exc)  # it died before the add was applied
        stream._fail(exc)

    def _deliver(self, batch: list[RequestOutput], now: float) -> None:
        for out in batch:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            self._hooks.observe(stream, out, now)
            if out.finished:
                self._streams.pop(out.request_id, None)
            stream._put(out)



def call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    """`loop.call_soon_threadsafe(fn, *args)`, doing nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody is left to deliver to
