"""The online Batch API's worker: runs stored batches on the serving engine, one at a time.

Batch lines yield to interactive traffic. While no interactive request is in flight, up to
`max_concurrency` lines run at once; as soon as one is, new lines wait until fewer than
`busy_concurrency` run, and if interactive requests are waiting for a slot the newest batch
lines are preempted (aborted and queued again, like the scheduler's preemption by recompute).

Progress is the batch's result files (see `progress.ResultLog`), so a restarted server resumes
each unfinished batch where it stopped; a line cut short by a restart or a preemption is run
again and written once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

from llmserve.batch.bodies import (
    BATCH_PRIORITY,
    Failed,
    ModelView,
    Prepared,
    failure_line,
    prepare,
    response_body,
    result_line,
)
from llmserve.batch.lines import BatchInputError, read_batch_file
from llmserve.batch.options import BatchOptions
from llmserve.batch.progress import ResultLog
from llmserve.engine.async_engine import EngineDeadError, QueueFullError

if TYPE_CHECKING:
    from llmserve.batch.store import BatchStore
    from llmserve.engine.async_engine import AsyncEngine

logger = logging.getLogger(__name__)
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."


class _Stop(Exception):
    """The batch stops running now (cancel or expiry); `status` is where it ends."""

    def __init__(self, status: str) -> None:
        self.status = status


class BatchWorker:
    """Runs the store's active batches in creation order on an AsyncEngine."""

    def __init__(self, engine: AsyncEngine, store: BatchStore, options: BatchOptions) -> None:
        self.engine = engine
        self.store = store
        self.options = options
        self.served_names = list(options.served_model_names or [engine.model_name])
        # (tool-call parser, reasoning parser) names; the HTTP server sets its own.
        self.parsers: tuple[str | None, str | None] = (None, None)
        seqs = _max_num_seqs(engine)
        self.max_concurrency = options.max_concurrency or seqs
        self.busy_concurrency = options.busy_concurrency or max(1, seqs // 8)
        if self.max_concurrency < 1 or self.busy_concurrency < 1:
            raise ValueError("batch concurrency limits must be >= 1")
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._cancelled: set[str] = set()
        self._running: dict[str, tuple[Prepared, asyncio.Task]] = {}  # line task per custom_id
        self._inflight_requests = 0
        self._line_errors: list[BaseException] = []
        self.num_preempted = 0
        # Set by the server: while it drains, no new line starts (those left resume later).
        self.is_draining = lambda: False

    # -- control (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._main())

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, batch_id: str) -> None:
        self._cancelled.add(batch_id)
        self.wake()

    async def stop(self) -> None:
        """Stop at once; lines in flight are aborted and run again after a restart."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _main(self) -> None:
        while True:
            active = self.store.active_batches()
            if not active:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._process(active[0])
            except EngineDeadError:
                logger.error("engine is gone: batch %s stays in progress until a restart",
                             active[0]["id"])
                return
            except Exception as exc:  # noqa: BLE001 - a broken batch must not stop the others
                logger.exception("batch %s failed", active[0]["id"])
                self.store.update_batch(active[0]["id"], status="failed", errors=_errors(
                    "internal_error", f"the batch failed: {type(exc).__name__}"))

    # -- one batch -----------------------------------------------------------------------------
    async def _process(self, batch: dict) -> None:
        batch_id = batch["id"]
        if batch["status"] == "validating":
            batch = self._validate(batch)
        if batch["status"] == "in_progress":
            try:
                await self._execute(batch)
                final, interim = "completed", "finalizing"
            except _Stop as stop:
                final = stop.status
                interim = "cancelling" if final == "cancelled" else "finalizing"
            self._finalize(self.store.update_batch(batch_id, status=interim), final)
        elif batch["status"] in ("finalizing", "cancelling"):
            self._finalize(batch, "completed" if batch["status"] == "finalizing" else "cancelled")

    def _validate(self, batch: dict) -> dict:
        try:
            lines = read_batch_file(self.store.file_path(batch["input_file_id"]),
                                    batch["endpoint"])
        except BatchInputError as exc:
            return self.store.update_batch(batch["id"], status="failed", errors={
                "object": "list", "data": [e.to_dict() for e in exc.errors[:1000]]})
        except ValueError as exc:
            return self.store.update_batch(batch["id"], status="failed",
                                           errors=_errors("invalid_file", str(exc)))
        return self.store.update_batch(batch["id"], status="in_progress", total=len(lines),
                                       model=self.served_names[0])

    async def _execute(self, batch: dict) -> None:
        batch_id = batch["id"]
        lines = read_batch_file(self.store.file_path(batch["input_file_id"]), batch["endpoint"])
        folder = self.store.batch_dir(batch_id)
        with ResultLog(folder / "output.jsonl", folder / "errors.jsonl") as log:
            self._save_counts(batch_id, log)
            queue = deque(line for line in lines if line.custom_id not in log.done)
            try:
                await self._feed(batch, queue, log)
            finally:
                await self._abort_running()
                self._save_counts(batch_id, log)

    async def _feed(self, batch: dict, queue: deque, log: ResultLog) -> None:
        view = ModelView.build(self.engine.tokenizer, self.served_names,
                               self.engine.max_model_len, *self.parsers)
        last_save = time.monotonic()
        while queue or self._running:
            self._check_stop(batch, queue, log)
            if queue and self._has_slot():
                item = prepare(queue.popleft(), view)
                if isinstance(item, Failed):
                    log.write(result_line(item.line.custom_id, item.status, item.body()))
                else:
                    task = asyncio.ensure_future(self._run_line(batch["id"], item, log, queue))
                    self._running[item.line.custom_id] = (item, task)
                await asyncio.sleep(0)  # tokenizing many lines must not stall other requests
                continue
            self._preempt_if_needed(queue)
            await asyncio.sleep(self.options.poll_s)
            self._raise_line_errors()
            if time.monotonic() - last_save > self.options.counts_interval_s:
                self._save_counts(batch["id"], log)
                last_save = time.monotonic()
        self._raise_line_errors()

    def _check_stop(self, batch: dict, queue: deque, log: ResultLog) -> None:
        if batch["id"] in self._cancelled:
            raise _Stop("cancelled")
        if batch["expires_at"] is not None and time.time() > batch["expires_at"]:
            for line in [*queue, *(p.line for p, _ in self._running.values())]:
                log.write(failure_line(line.custom_id, "batch_expired", EXPIRED_MESSAGE))
            queue.clear()
            raise _Stop("expired")

    def _has_slot(self) -> bool:
        """Whether one more line may start now (the caps depend on interactive load)."""
        if self.is_draining():
            return False
        cap = self.busy_concurrency if self._interactive() else self.max_concurrency
        return len(self._running) < cap

    def _interactive(self) -> int:
        return max(0, self.engine.num_unfinished - self._inflight_requests)

    def _preempt_if_needed(self, queue: deque) -> None:
        """Give interactive requests the engine: preempt the newest lines above the busy cap."""
        if not self._interactive() or len(self._running) <= self.busy_concurrency:
            return
        if self.engine.stats().get("num_waiting", 0) == 0:
            return  # interactive requests are running already: just stop adding lines
        while len(self._running) > self.busy_concurrency:
            custom_id = next(reversed(self._running))
            prep, task = self._running.pop(custom_id)
            task.cancel()  # aborts the line's engine requests
            queue.appendleft(prep.line)
            self.num_preempted += 1

    async def _run_line(self, batch_id: str, prep: Prepared, log: ResultLog,
                        queue: deque) -> None:
        streams = []
        try:
            for k, prompt in enumerate(prep.prompts):
                streams.append(await self._add(batch_id, prep, k, prompt))
            finals = await asyncio.gather(*(_final(s) for s in streams))
        except ValueError as exc:  # the engine refused the request (e.g. too large)
            log.write(result_line(prep.line.custom_id, 400, _error_body(str(exc))))
            return
        except Exception as exc:  # noqa: BLE001 - raised in the feeding loop
            self._line_errors.append(exc)
            return
        finally:
            for s in streams:
                s.abort()
            self._inflight_requests -= len(streams)
            self._running.pop(prep.line.custom_id, None)
        error = next((c.error for o in finals for c in o.outputs if c.error), None)
        if error is not None:  # the line's own fault (its grammar failed to compile): no rerun
            log.write(result_line(prep.line.custom_id, 400,
                                  _error_body(error, code="invalid_grammar")))
            return
        if any(c.finish_reason == "abort" for o in finals for c in o.outputs):
            queue.appendleft(prep.line)  # aborted by the server (drain): run it again
            return
        body = response_body(prep, finals, self.engine.tokenizer)
        log.write(result_line(prep.line.custom_id, 200, body, prep.request_id))

    async def _add(self, batch_id: str, prep: Prepared, k: int, prompt: dict):
        info = prep.info(batch_id=batch_id)
        rid = f"{batch_id}-{prep.line.line}-{k}-{os.urandom(4).hex()}"
        while True:
            # Counted before the engine answers: a line waiting for its add to be accepted is
            # already one of the engine's unfinished requests, and must not pass for interactive
            # traffic (which would preempt batch lines for nothing).
            self._inflight_requests += 1
            try:
                return await self.engine.add_request(rid, prompt, prep.params,
                                                     priority=BATCH_PRIORITY, info=info)
            except QueueFullError:
                self._inflight_requests -= 1
                await asyncio.sleep(0.5)  # batch lines wait; they are never refused for load
            except BaseException:
                self._inflight_requests -= 1
                raise

    def _raise_line_errors(self) -> None:
        if self._line_errors:
            exc, self._line_errors = self._line_errors[0], []
            raise exc

    async def _abort_running(self) -> None:
        tasks = [task for _, task in self._running.values()]
        self._running.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _save_counts(self, batch_id: str, log: ResultLog) -> None:
        c = log.counts
        self.store.update_batch(batch_id, completed=c["completed"], failed=c["failed"],
                                input_tokens=c["input_tokens"], cached_tokens=c["cached_tokens"],
                                output_tokens=c["output_tokens"])

    def _finalize(self, batch: dict, status: str) -> None:
        """Publish the result files and end the batch (idempotent: a crash may repeat it)."""
        folder = self.store.batch_dir(batch["id"])
        suffix = batch["id"].removeprefix("batch_")
        ids = {}
        for kind, name in (("output_file_id", "output.jsonl"), ("error_file_id", "errors.jsonl")):
            file_id = f"file-{suffix}-{kind.split('_')[0]}"
            src, dst = folder / name, self.store.file_path(file_id)
            if src.exists() and src.stat().st_size > 0:
                os.replace(src, dst)
            if dst.exists():
                self.store.register_file(file_id, dst.stat().st_size,
                                         f"{batch['id']}_{name}", "batch_output")
                ids[kind] = file_id
        self._cancelled.discard(batch["id"])
        self.store.update_batch(batch["id"], status=status, **ids)


async def _final(stream):
    last = None
    async for out in stream:
        last = out
    if last is None:
        raise EngineDeadError("the request ended without a result")
    return last


def _error_body(message: str, code: str | None = None) -> dict:
    from llmserve.server.openai.errors import error_body

    return error_body(400, message[:1000], code=code)


def _errors(code: str, message: str) -> dict:
    return {"object": "list", "data": [{"code": code, "message": message, "param": None,
                                        "line": None}]}


def _max_num_seqs(engine: AsyncEngine) -> int:
    inner = getattr(engine, "engine", None)
    config = getattr(inner, "config", None)
    return getattr(getattr(config, "scheduler", None), "max_num_seqs", 16)
