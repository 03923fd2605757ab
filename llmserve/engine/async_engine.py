"""AsyncEngine: the synchronous LLMEngine driven by a background thread, for asyncio frontends.

One thread owns the engine: it applies queued adds and aborts between steps, runs `step()`, and
hands each step's outputs to the event loop with `loop.call_soon_threadsafe`. The engine itself
is never touched from another thread, so it needs no locks. When there is no work the thread
sleeps on a condition variable.

`MultiprocessAsyncEngine` (in `core_client.py`) keeps this class's API, streams and observers
but runs the engine in a child process, so the model's Python work never competes with the event
loop for the GIL; `AsyncEngine.from_args(engine_process=True)` builds one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from llmserve.engine.request_stream import RequestStream

if TYPE_CHECKING:
    from llmserve.engine.llm_engine import LLMEngine
    from llmserve.outputs import RequestOutput
    from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

HOOKS = ("on_request_added", "on_first_token", "on_token", "on_finished", "on_step")


class QueueFullError(RuntimeError):
    """Raised by `add_request` when `max_queued_requests` requests are already waiting."""

    def __init__(self, num_waiting: int, limit: int, retry_after: float = 1.0) -> None:
        super().__init__(
            f"server overloaded: {num_waiting} requests waiting (limit {limit}); retry later"
        )
        self.retry_after = retry_after


class EngineDeadError(RuntimeError):
    """The step loop died (or was stopped); no request can be served any more."""


@dataclasses.dataclass
class _PendingAdd:
    stream: RequestStream
    prompt: Any
    params: SamplingParams
    arrival_time: float
    priority: int
    info: dict
    future: asyncio.Future


class AsyncEngine:
    """Runs an `LLMEngine` in a background thread and streams each request's outputs.

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

    def __init__(self, engine: LLMEngine, max_queued_requests: int = 1024) -> None:
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        self.engine = engine
        self.max_queued_requests = max_queued_requests
        self._cond = threading.Condition()
        self._adds: list[_PendingAdd] = []
        self._aborts: set[str] = set()
        self._abort_all = False
        self._applying = 0  # adds taken from the queue but not yet reflected in _stats
        self._stats: dict = {}
        self._stopping = False
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._main_loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, RequestStream] = {}
        self._loops: dict[str, asyncio.AbstractEventLoop] = {}  # step thread's view
        self._last_step: object = None
        self._hooks: dict[str, list] = {name: [] for name in HOOKS}

    @classmethod
    def from_args(cls, max_queued_requests: int = 1024, *, engine_process: bool = False,
                  cpu_threads: int | None = None, **engine_kwargs: Any) -> AsyncEngine:
        """Build the engine from `LLMEngine.from_args(**engine_kwargs)` and wrap it.

        With `engine_process=True` the engine runs in a child process (with `cpu_threads` torch
        threads) and this returns a `MultiprocessAsyncEngine`; otherwise it runs in a thread of
        this process.
        """
        if engine_process:
            from llmserve.engine.core_client import EngineCoreClient, MultiprocessAsyncEngine

            client = EngineCoreClient.start(engine_kwargs, cpu_threads=cpu_threads)
            return MultiprocessAsyncEngine(client, max_queued_requests=max_queued_requests)
        from llmserve.engine.llm_engine import LLMEngine

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
    def num_unfinished(self) -> int:
        """Requests accepted (or being accepted) whose final output has not been delivered."""
        return len(self._streams)

    def stats(self) -> dict:
        """The engine's `stats()` after the latest step, plus `num_pending` adds not yet applied."""
        with self._cond:
            return {**self._stats, "num_pending": len(self._adds) + self._applying}

    def add_observer(self, observer: object) -> None:
        """Register an object whose `on_*` methods (see the class docstring) are called."""
        for name in HOOKS:
            fn = getattr(observer, name, None)
            if callable(fn):
                self._hooks[name].append(fn)

    def start(self) -> None:
        """Start the step thread (idempotent); `add_request` calls it on first use."""
        if self._thread is not None:
            return
        self._main_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="llmserve-engine", daemon=True)
        self._thread.start()

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
        pending = _PendingAdd(stream, prompt, params, arrival, priority, dict(info or {}),
                              stream.accepted)
        self._enqueue(pending)
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

    def _enqueue(self, pending: _PendingAdd) -> None:
        """Hand an add to the step thread, or raise QueueFullError / EngineDeadError."""
        with self._cond:
            self._check_admission()
            self._adds.append(pending)
            self._cond.notify()

    def _check_admission(self) -> None:
        """Raise EngineDeadError / QueueFullError unless an add may be queued (holds `_cond`)."""
        if self._dead is not None or self._stopping:  # re-checked under the lock
            raise EngineDeadError(self._dead_message())
        # Waiting = not yet handed to the engine (or not yet taken by it), plus the engine's own
        # waiting queue.
        waiting = len(self._adds) + self._applying + self._stats.get("num_waiting", 0)
        if waiting >= self.max_queued_requests:
            raise QueueFullError(waiting, self.max_queued_requests)

    def abort(self, request_ids: str | Iterable[str]) -> None:
        """Abort requests (thread-safe, idempotent); applied before the next step."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        with self._cond:
            self._aborts.update(ids)
            self._cond.notify()

    def abort_all(self) -> None:
        """Abort every request the engine holds, e.g. when a drain timeout expires."""
        with self._cond:
            self._abort_all = True
            self._cond.notify()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step thread; requests still open fail with EngineDeadError."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self.engine.shutdown()  # tensor-parallel workers, if any

    # ------------------------------------------------------------------ step thread

    def _run(self) -> None:
        has_work = False
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._abort_all or has_work
                           or self._stopping):
                    self._cond.wait()
                if self._stopping:
                    break
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, set()
                if self._abort_all:
                    aborts.update(self._loops)
                    self._abort_all = False
                self._applying = len(adds)
            try:
                has_work = self._step_once(adds, aborts)
            except Exception as exc:  # noqa: BLE001 - any engine failure is fatal to all requests
                logger.exception("engine step failed; failing every in-flight request")
                self._die(exc)
                return
        self._die(EngineDeadError("engine stopped"))

    def _step_once(self, adds: list[_PendingAdd], aborts: set[str]) -> bool:
        for pending in adds:
            self._apply_add(pending)
        aborted = [rid for rid in aborts if rid in self._loops]
        if aborted:
            self.engine.abort_request(aborted)
        outputs: list[RequestOutput] = []
        # An aborted request reports its final "abort" output in the next step, even if idle.
        if aborted or self.engine.has_unfinished_requests():
            outputs = self.engine.step()
        now = time.time()
        stats = self.engine.stats()
        with self._cond:
            self._stats = stats
            self._applying = 0
        self._dispatch([_snapshot(out) for out in outputs], now,
                       getattr(self.engine, "last_step", None))
        return self.engine.has_unfinished_requests()

    def _apply_add(self, pending: _PendingAdd) -> None:
        stream = pending.stream
        try:
            prompt_ids = self.engine.add_request(
                stream.request_id, pending.prompt, pending.params,
                arrival_time=pending.arrival_time, priority=pending.priority,
            )
        except Exception as exc:  # noqa: BLE001 - handed to the caller of add_request
            stream.loop.call_soon_threadsafe(self._rejected, pending, exc)
            return
        self._loops[stream.request_id] = stream.loop
        stream.loop.call_soon_threadsafe(self._accepted, pending, list(prompt_ids))

    def _dispatch(self, outputs: list[RequestOutput], now: float, step: object) -> None:
        """Hand a step's outputs (which the engine will not mutate any more) and its step stats
        to the event loops of their requests (runs on the thread that drives the engine)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[RequestOutput]] = {}
        for out in outputs:
            loop = self._loops.get(out.request_id)
            if loop is None:
                continue
            if out.finished:
                del self._loops[out.request_id]
            by_loop.setdefault(loop, []).append(out)
        # A step that only reported aborts leaves last_step as it was: report each step once.
        if step is not None and step is not self._last_step and self._hooks["on_step"]:
            _call_soon(self._main_loop, self._call_hooks, "on_step", step)
        self._last_step = step
        for loop, batch in by_loop.items():
            _call_soon(loop, self._deliver, batch, now)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self._dead = exc
            adds, self._adds = self._adds, []
        error = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"engine failed: {exc}")
        for pending in adds:
            _call_soon(pending.stream.loop, self._rejected, pending, error)
        for stream in list(self._streams.values()):
            _call_soon(stream.loop, self._fail, stream, error)
        self._loops.clear()

    # ------------------------------------------------------------------ event loop side

    def _accepted(self, pending: _PendingAdd, prompt_ids: list[int]) -> None:
        stream = pending.stream
        stream.prompt_token_ids = prompt_ids
        info = {"prompt_token_ids": prompt_ids, "params": pending.params,
                "arrival_time": pending.arrival_time, **pending.info}
        self._call_hooks("on_request_added", stream.request_id, info)
        if not pending.future.done():
            pending.future.set_result(prompt_ids)

    def _rejected(self, pending: _PendingAdd, exc: BaseException) -> None:
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
            self._observe(stream, out, now)
            if out.finished:
                self._streams.pop(out.request_id, None)
            stream._put(out)

    def _observe(self, stream: RequestStream, out: RequestOutput, now: float) -> None:
        num_tokens = sum(len(c.token_ids) for c in out.outputs)
        new = num_tokens - stream.num_tokens_seen
        if new > 0:
            if stream.first_token_time is None:
                stream.first_token_time = now
                self._call_hooks("on_first_token", stream.request_id, now - stream.arrival_time)
            elif self._hooks["on_token"]:
                self._call_hooks("on_token", stream.request_id, new, now - stream.last_token_time)
            stream.last_token_time = now
            stream.num_tokens_seen = num_tokens
        if out.finished and self._hooks["on_finished"]:
            self._call_hooks("on_finished", out, _usage(out), _timings(stream, out, now))

    def _call_hooks(self, name: str, *args: Any) -> None:
        for fn in self._hooks[name]:
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - an observer must never break serving
                logger.exception("observer hook %s failed", name)

    def _dead_message(self) -> str:
        if self._dead is None:
            return "engine is shutting down"
        return str(self._dead) if isinstance(self._dead, EngineDeadError) else (
            f"engine failed: {self._dead}")


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        pass  # the loop is closed: nobody is left to deliver to


def _snapshot(out: RequestOutput) -> RequestOutput:
    """Copy the lists the engine keeps appending to, so the loop thread reads a stable view."""
    outputs = [
        dataclasses.replace(c, logprobs=list(c.logprobs)) if c.logprobs is not None else c
        for c in out.outputs
    ]
    return dataclasses.replace(out, outputs=outputs)


def _usage(out: RequestOutput) -> dict:
    prompt = len(out.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion, "cached_tokens": out.num_cached_tokens}


def _timings(stream: RequestStream, out: RequestOutput, now: float) -> dict:
    arrival = stream.arrival_time
    metrics = out.metrics
    scheduled = metrics.first_scheduled_time if metrics is not None else None
    first = stream.first_token_time
    return {
        "arrival_time": arrival,
        "first_scheduled_time": scheduled,
        "first_token_time": first,
        "finished_time": now,
        "queue_time": None if scheduled is None else max(0.0, scheduled - arrival),
        "ttft": None if first is None else first - arrival,
        "e2e": now - arrival,
    }
