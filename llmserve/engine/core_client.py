"""The frontend half of a process-separated engine: start the core, talk to it, stream its outputs.

`EngineCoreClient` starts `engine_core.run_engine_core` in a spawned child process and holds what
the frontend needs without the model: the config, the tokenizer, the served name.
`MultiprocessAsyncEngine` is an `AsyncEngine` whose step thread is replaced by a reader thread:
adds and aborts go straight down a pipe, and each message the core sends back is decoded and
delivered to the event loops exactly as the in-process step thread would have delivered it.

Why a process: on a small model the engine's step is mostly Python and many small torch calls,
which hold the GIL; in one process the HTTP/SSE work and the step share one interpreter lock, so
together they never use more than about one core. Apart, each gets its own.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import threading
import time
from collections.abc import Iterable
from typing import Any

from llmserve.engine.async_engine import AsyncEngine, EngineDeadError, _call_soon, _PendingAdd
from llmserve.engine.engine_core import run_engine_core
from llmserve.engine.output_wire import OutputDecoder

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes


class EngineCoreClient:
    """Handle on a running engine-core process (what `MultiprocessAsyncEngine.engine` is)."""

    def __init__(self, config: Any, tokenizer: Any, model_name: str, process: Any,
                 commands: Any, messages: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = config.max_model_len
        self.process = process
        self.commands = commands  # frontend -> core
        self.messages = messages  # core -> frontend
        self._send_lock = threading.Lock()
        self._closed = False
        atexit.register(self.shutdown, 1.0)

    @classmethod
    def start(cls, engine_kwargs: dict[str, Any], cpu_threads: int | None = None,
              timeout: float = STARTUP_TIMEOUT_S) -> EngineCoreClient:
        """Validate the arguments here (fast, clear errors), start the core and wait until its
        engine is built. Raises what building the engine raised."""
        from llmserve.engine.llm_engine import build_engine_config, served_model_name
        from llmserve.tokenizer import Tokenizer

        kwargs = dict(engine_kwargs)
        config = build_engine_config(kwargs.pop("model", None), **kwargs)
        # The child gets the resolved model directory, so both build the same config.
        kwargs["model"] = config.model.model
        tokenizer = Tokenizer.from_pretrained(config.tokenizer or config.model.model)
        ctx = multiprocessing.get_context("spawn")  # fork would copy a running event loop's state
        commands_rx, commands_tx = ctx.Pipe(duplex=False)
        messages_rx, messages_tx = ctx.Pipe(duplex=False)
        # Not a daemon: the core may start its own tensor-parallel workers.
        process = ctx.Process(
            target=run_engine_core, name="llmserve-engine-core",
            args=(kwargs, cpu_threads, commands_rx, messages_tx, logging.getLogger().level),
        )
        process.start()
        commands_rx.close()  # the child's ends: closing ours lets each side see the other leave
        messages_tx.close()
        client = cls(config, tokenizer, served_model_name(config.model.model), process,
                     commands_tx, messages_rx)
        try:
            reply = client._await_ready(timeout)
        except BaseException:
            client.shutdown(1.0)
            raise
        logger.info("engine core process %d ready (%s)", process.pid, reply)
        return client

    def _await_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.messages.poll(0.1):
            if not self.process.is_alive():
                raise EngineDeadError(
                    f"engine core process exited with code {self.process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"engine core did not start within {timeout:.0f} s")
        message = self.messages.recv()
        if message[0] == "failed":
            raise message[1]
        if message[0] != "ready":
            raise EngineDeadError(f"unexpected first message from the engine core: {message[0]!r}")
        return message[1]

    def send(self, command: tuple) -> None:
        """Send a command (thread-safe). Raises EngineDeadError if the core is gone."""
        try:
            with self._send_lock:
                self.commands.send(command)
        except (OSError, ValueError) as exc:  # broken pipe, or our end already closed
            raise EngineDeadError(f"engine core process is gone ({exc})") from exc

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, wait for it, and make sure it is gone (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(("stop",))
        except EngineDeadError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("engine core did not stop within %.1f s; terminating it", timeout)
            self.process.kill()
            self.process.join(5.0)
        self.commands.close()
        atexit.unregister(self.shutdown)


class MultiprocessAsyncEngine(AsyncEngine):
    """`AsyncEngine` over an engine-core process; same API, streams and observer hooks."""

    engine: EngineCoreClient

    def __init__(self, client: EngineCoreClient, max_queued_requests: int = 1024) -> None:
        super().__init__(client, max_queued_requests=max_queued_requests)  # type: ignore[arg-type]
        self._unacked: dict[str, _PendingAdd] = {}  # sent to the core, no reply yet
        self._decoder = OutputDecoder()

    @property
    def core_pid(self) -> int | None:
        return self.engine.process.pid

    def _enqueue(self, pending: _PendingAdd) -> None:
        # `_applying` counts the adds the core has not answered yet, so the base class's
        # admission check counts them as waiting.
        with self._cond:
            self._check_admission()
            rid = pending.stream.request_id
            self._unacked[rid] = pending
            self._applying = len(self._unacked)
        try:
            self.engine.send(("add", rid, pending.prompt, pending.params, pending.arrival_time,
                              pending.priority))
        except EngineDeadError:
            with self._cond:
                self._unacked.pop(rid, None)
                self._applying = len(self._unacked)
            raise

    def abort(self, request_ids: str | Iterable[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids and self._dead is None:
            try:
                self.engine.send(("abort", ids))
            except EngineDeadError:
                pass  # the reader thread fails every request when the core dies

    def abort_all(self) -> None:
        if self._dead is None:
            try:
                self.engine.send(("abort_all",))
            except EngineDeadError:
                pass

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
        self.engine.shutdown(timeout)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._dead is None:  # the reader never started (no request was ever made)
            self._die(EngineDeadError("engine stopped"))

    # ------------------------------------------------------------------ reader thread

    def _run(self) -> None:
        """The thread `start()` runs: it reads the core's messages instead of stepping."""
        messages = self.engine.messages
        while True:
            try:
                message = messages.recv()
            except (EOFError, OSError):
                code = self.engine.process.exitcode
                self._die(EngineDeadError(
                    "engine stopped" if self._stopping else
                    f"engine core process exited unexpectedly (exit code {code})"))
                return
            kind = message[0]
            if kind == "step":
                self._on_step_message(*message[1:])
            elif kind == "stopped":
                self._die(EngineDeadError("engine stopped"))
                return
            elif kind == "dead":
                logger.error("engine core step failed; failing every in-flight request\n%s",
                             message[2])
                self._die(message[1])
                return

    def _on_step_message(self, replies: list[tuple], wire: list[tuple], stats: dict,
                         step: object) -> None:
        now = time.time()
        answered = []
        with self._cond:
            for kind, rid, payload in replies:
                pending = self._unacked.pop(rid, None)
                if pending is not None:
                    answered.append((kind, pending, payload))
            self._stats = stats
            self._applying = len(self._unacked)
        for kind, pending, payload in answered:
            if kind == "added":
                rid = pending.stream.request_id
                if not pending.params.stop:  # the core sends no text for these: build it here
                    self._decoder.detokenize(rid, payload, self.engine.tokenizer,
                                             pending.params.skip_special_tokens)
                self._loops[rid] = pending.stream.loop
                _call_soon(pending.stream.loop, self._accepted, pending, payload)
            else:
                _call_soon(pending.stream.loop, self._rejected, pending, payload)
        # The core sends step stats only for a step that ran (None otherwise).
        self._dispatch(self._decoder.decode(wire), now, step)

    def _die(self, exc: BaseException) -> None:
        with self._cond:
            self._adds.extend(self._unacked.values())
            self._unacked.clear()
            self._applying = 0
        super()._die(exc)
