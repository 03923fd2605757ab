"""The frontend half of process mode: start the engine-core process, talk to it, read its reports.

`EngineCoreClient.spawn` starts `engine_core.run_engine_core` in a spawned child process and
returns a handle that holds what the frontend needs without the model: the config, the
tokenizer, the served name. An `AsyncEngine` built on it (`AsyncEngine.from_args(
engine_process=True)`) sends its commands down one pipe; a reader thread takes each report off
the other, rebuilds the outputs from their wire deltas and hands the report to the AsyncEngine
exactly as thread mode's step thread would have.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from llmserve.engine.engine_core import run_engine_core
from llmserve.engine.errors import EngineDeadError
from llmserve.engine.messages import (
    Added,
    AddRequest,
    Command,
    CoreMessage,
    Dead,
    Failed,
    Ready,
    StepReport,
    Stop,
    Stopped,
    dumps,
    loads,
)
from llmserve.engine.output_wire import OutputDecoder

if TYPE_CHECKING:
    from llmserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 600.0  # loading a large checkpoint can take minutes


class EngineCoreClient:
    """Handle on a running engine-core process (what `AsyncEngine.engine` is in process mode);
    a `messages.CoreHandle`."""

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
        self._reader: threading.Thread | None = None
        self._decoder = OutputDecoder()
        # Adds not answered yet whose text the frontend builds (no stop strings: the core sends
        # only their tokens).
        self._text_params: dict[str, SamplingParams] = {}
        atexit.register(self.shutdown, 1.0)

    @classmethod
    def spawn(cls, engine_kwargs: dict[str, Any], cpu_threads: int | None = None,
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
            info = client._await_ready(timeout)
        except BaseException:
            client.shutdown(1.0)
            raise
        logger.info("engine core process %d ready (%s)", process.pid, info)
        return client

    def _await_ready(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while not self.messages.poll(0.1):
            if not self.process.is_alive():
                raise EngineDeadError(
                    f"engine core process exited with code {self.process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"engine core did not start within {timeout:.0f} s")
        message = loads(self.messages.recv_bytes())
        if isinstance(message, Failed):
            raise message.error
        if not isinstance(message, Ready):
            raise EngineDeadError(
                f"unexpected first message from the engine core: {type(message).__name__}")
        return message.info

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def start(self, deliver: Callable[[CoreMessage], None]) -> None:
        """Start the thread that reads the core's reports and hands them to `deliver`."""
        if self._reader is not None:
            return
        self._reader = threading.Thread(target=self._read, args=(deliver,),
                                        name="llmserve-engine", daemon=True)
        self._reader.start()

    def send(self, command: Command) -> None:
        """Send a command (thread-safe). Raises EngineDeadError if the core is gone."""
        rid = command.request_id if isinstance(command, AddRequest) else None
        if rid is not None and not command.params.stop:
            self._text_params[rid] = command.params
        data = dumps(command)
        try:
            with self._send_lock:
                self.commands.send_bytes(data)
        except (OSError, ValueError) as exc:  # broken pipe, or our end already closed
            self._text_params.pop(rid, None)
            raise EngineDeadError(f"engine core process is gone ({exc})") from exc

    def shutdown(self, timeout: float = 10.0) -> None:
        """Ask the core to stop, wait for it, and make sure it is gone (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.send(Stop())
        except EngineDeadError:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("engine core did not stop within %.1f s; terminating it", timeout)
            self.process.kill()
            self.process.join(5.0)
        self.commands.close()
        atexit.unregister(self.shutdown)
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    # ------------------------------------------------------------------ reader thread

    def _read(self, deliver: Callable[[CoreMessage], None]) -> None:
        while True:
            try:
                message = loads(self.messages.recv_bytes())
            except (EOFError, OSError):
                deliver(self._lost())
                return
            if isinstance(message, StepReport):
                deliver(self._decode(message))
                continue
            deliver(message)
            if isinstance(message, (Dead, Stopped)):
                return

    def _lost(self) -> CoreMessage:
        """What the end of the pipe means: a stop we asked for, or a core that died."""
        if self._closed:
            return Stopped()
        code = self.process.exitcode
        return Dead(EngineDeadError(
            f"engine core process exited unexpectedly (exit code {code})"), None)

    def _decode(self, report: StepReport) -> StepReport:
        """The report with its wire outputs rebuilt into cumulative RequestOutputs."""
        for reply in report.replies:
            params = self._text_params.pop(reply.request_id, None)
            if params is not None and isinstance(reply, Added):
                self._decoder.detokenize(reply.request_id, reply.prompt_token_ids,
                                         self.tokenizer, params.skip_special_tokens)
        return StepReport(report.replies, self._decoder.decode(report.outputs), report.stats,
                          report.step_stats)
