"""AsyncEngine: an LLMEngine driven by a step loop off the event loop, for asyncio frontends.

The engine is driven by `step_loop.StepLoop`, either in a background thread of this process
(`thread_core.ThreadCore`, the default) or in a child process (`core_client.EngineCoreClient`,
with `from_args(engine_process=True)`), so that the model's Python work never competes with the
event loop for the GIL. Both run the same loop and speak the same messages (`messages.py`): this
class sends commands (add, abort, stop) and turns each `StepReport` into deliveries on the event
loops of the requests it concerns, with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llmserve.engine.core_client import EngineCoreClient
from llmserve.engine.errors import EngineDeadError, QueueFullError
from llmserve.engine.hooks import HOOKS
from llmserve.engine.messages import Abort, AbortAll, AddRequest, CoreHandle
from llmserve.engine.request_stream import RequestStream
from llmserve.engine.stream_router import PendingAdd, StreamRouter
from llmserve.engine.thread_core import ThreadCore

if TYPE_CHECKING:
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.sampling_params import SamplingParams

# Re-exported: frontends import these from here.
__all__ = ["HOOKS", "AsyncEngine", "EngineDeadError", "QueueFullError", "RequestStream"]


class AsyncEngine(StreamRouter):
    """Drives an `LLMEngine` off the event loop and streams each request's outputs.

    The engine runs in a background thread, or in an engine-core process when built with
    `from_args(engine_process=True)` (then `.engine` is an `EngineCoreClient`, not the
    `LLMEngine`); the API, streams and hooks are the same.

    `stream = await engine.add_request(request_id, prompt, params)` returns a `RequestStream`, an
    async iterator of cumulative `RequestOutput`s (it raises ValueError for bad input and
    `QueueFullError` when too many requests wait). Cancelling the consumer, breaking out of the
    loop or dropping the stream aborts the request within one step, which frees its KV blocks.

    Observers (`add_observer(obj)`) may define any of these methods; they run on the event loop
    thread, in this order within a step, before the consumer sees the output, and must not block.
    An observer that raises is logged and otherwise ignored.

    - `on_request_added(request_id, info)`: the engine accepted the request. `info` holds
      `prompt_token_ids`, `params`, `arrival_time` and whatever the caller passed as `info`
      (the HTTP server adds `model`, `endpoint`, `user`, `metadata`, `http_request_id`).
    - `on_first_token(request_id, ttft)`: seconds from arrival to the first output token.
    - `on_token(request_id, num_new_tokens, interval)`: a step added tokens; `interval` is the
      seconds since the previous delivery for this request.
    - `on_finished(output, usage, timings)`: the final `RequestOutput` (finish_reason may be
      "abort"); `usage` = prompt_tokens, completion_tokens, total_tokens, cached_tokens;
      `timings` = arrival_time, first_token_time, finished_time, queue_time, ttft, e2e (seconds).
    - `on_step(step_stats)`: the engine's `last_step` (start, end, work per request id), with the
      engine's `stats()` dict of the same step available as `async_engine.stats()`.
    """

    def __init__(self, engine: LLMEngine | EngineCoreClient,
                 max_queued_requests: int = 1024) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        super().__init__()
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        # An EngineCoreClient runs the step loop in its process; an LLMEngine gets a thread.
        self._core: CoreHandle = engine if isinstance(engine, EngineCoreClient) else (
            ThreadCore(engine))
        self._stopping = False
        self._started = False

    @classmethod
    def from_args(cls, max_queued_requests: int = 1024, *, engine_process: bool = False,
                  cpu_threads: int | None = None, **engine_kwargs: Any) -> AsyncEngine:
        """Build the engine from `LLMEngine.from_args(**engine_kwargs)` and wrap it.

        With `engine_process=True` the engine runs in a child process (with `cpu_threads` torch
        threads) and `.engine` is its `EngineCoreClient`; otherwise it runs in a thread of this
        process and `.engine` is the `LLMEngine`.
        """
        if engine_process:
            client = EngineCoreClient.spawn(engine_kwargs, cpu_threads=cpu_threads)
            return cls(client, max_queued_requests=max_queued_requests)
        from llmserve.engine.llm_engine import LLMEngine  # the model stack: only when needed

        return cls(LLMEngine.from_args(**engine_kwargs), max_queued_requests=max_queued_requests)

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_healthy(self) -> bool:
        return self._dead is None and not self._stopping

    @property
    def dead_error(self) -> BaseException | None:
        return self._dead

    @property
    def core_pid(self) -> int | None:
        """The engine-core process id in process mode, None in thread mode."""
        return self._core.pid

    @property
    def num_unfinished(self) -> int:
        """Requests accepted (or being accepted) whose final output has not been delivered."""
        return len(self._streams)

    def stats(self) -> dict:
        """The engine's `stats()` after the latest step, plus `num_pending` adds not yet applied."""
        with self._lock:
            return {**self._stats, "num_pending": len(self._unacked)}

    def add_observer(self, observer: object) -> None:
        """Register an object whose `on_*` methods (see the class docstring) are called."""
        self._hooks.add(observer)

    def start(self) -> None:
        """Start the step loop's reports (idempotent); `add_request` calls it on first use."""
        if self._started:
            return
        self._started = True
        self._main_loop = asyncio.get_running_loop()
        self._core.start(self._on_core_message)

    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        params: SamplingParams,
        *,
        arrival_time: float | None = None,
        priority: int = 0,
        info: dict | None = None,
    ) -> RequestStream:
        """Queue a request; return its output stream once the engine has accepted it.

        Raises ValueError for bad input (from the engine), QueueFullError when the wait queue is
        full, EngineDeadError when the step loop is gone.
        """
        if self._dead is not None or self._stopping:
            raise EngineDeadError(self._dead_message())
        if request_id in self._streams:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.start()
        loop = asyncio.get_running_loop()
        arrival = time.time() if arrival_time is None else arrival_time
        stream = RequestStream(self, request_id, loop, arrival)
        stream.accepted = loop.create_future()
        pending = PendingAdd(stream, params, arrival, dict(info or {}), stream.accepted)
        self._enqueue(pending, AddRequest(request_id, prompt, params, arrival, priority))
        self._streams[request_id] = stream
        try:
            await pending.future
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        return stream

    def _enqueue(self, pending: PendingAdd, command: AddRequest) -> None:
        """Hand an add to the step loop, or raise QueueFullError / EngineDeadError."""
        rid = command.request_id
        with self._lock:
            self._check_admission()
            self._unacked[rid] = pending
        try:
            self._core.send(command)
        except EngineDeadError:
            with self._lock:
                self._unacked.pop(rid, None)
            raise

    def _check_admission(self) -> None:
        """Raise EngineDeadError / QueueFullError unless an add may be queued (holds `_lock`)."""
        if self._dead is not None or self._stopping:  # re-checked under the lock
            raise EngineDeadError(self._dead_message())
        # Waiting = sent to the step loop and not answered yet, plus the engine's own waiting
        # queue (both as of the latest report, so nothing is counted twice or missed).
        waiting = len(self._unacked) + self._stats.get("num_waiting", 0)
        if waiting >= self.max_queued_requests:
            raise QueueFullError(waiting, self.max_queued_requests)

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (thread-safe, idempotent); applied before the next step."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids and self._dead is None:
            try:
                self._core.send(Abort(ids))
            except EngineDeadError:
                pass  # every request fails when the step loop dies

    def abort_all(self) -> None:
        """Abort every request the engine holds, e.g. when a drain timeout expires."""
        if self._dead is None:
            try:
                self._core.send(AbortAll())
            except EngineDeadError:
                pass

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop; requests still open fail with EngineDeadError."""
        with self._lock:
            self._stopping = True
        self._core.shutdown(timeout)
        self._die(EngineDeadError("engine stopped"))  # a no-op once the loop reported its end

    def _dead_message(self) -> str:
        if self._dead is None:
            return "engine is shutting down"
        return str(self._dead) if isinstance(self._dead, EngineDeadError) else (
            f"engine failed: {self._dead}")

