"""Process mode: the engine-core process, an LLMEngine stepping on its own, fed and drained over
two pipes.

It runs the same `StepLoop` as thread mode. Commands arrive on one pipe and reports leave on the
other, each pickled by `messages.dumps`; the per-step report carries its outputs as
`output_wire` deltas. The core never waits for the frontend between steps, so HTTP work and model
work overlap on separate cores and separate GILs. The protocol is specified in
docs/engine_api.md ("The engine-core pipe"). The core exits after `Stop`, after a failed step,
or when the frontend goes away (its end of a pipe closes).
"""

from __future__ import annotations

import gc
import logging
import pickle
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from llmserve.engine.messages import (
    Command,
    CoreMessage,
    Dead,
    Failed,
    Ready,
    Rejected,
    Reply,
    StepReport,
    dumps,
    loads,
)
from llmserve.engine.output_wire import OutputEncoder
from llmserve.engine.step_loop import StepLoop

logger = logging.getLogger(__name__)


def portable_error(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a ValueError/RuntimeError with the same message
    (ValueError stays ValueError: the frontend maps it to a 400)."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling problem: fall back to a plain error
        kind = ValueError if isinstance(exc, ValueError) else RuntimeError
        return kind(str(exc))


def run_engine_core(engine_kwargs: dict[str, Any], cpu_threads: int | None,
                    commands: Connection, messages: Connection, log_level: int) -> None:
    """Child-process entry point: build the engine, report `Ready`, serve commands until told to
    stop or until the frontend disappears."""
    # Ctrl-C and SIGTERM go to the whole process group; the frontend decides when the core stops
    # (after draining), so the core must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import torch

        if cpu_threads is not None:
            torch.set_num_threads(cpu_threads)
        from llmserve.engine.llm_engine import LLMEngine

        engine = LLMEngine.from_args(**engine_kwargs)
        # Detokenizing is the frontend's job for requests without stop strings (see
        # OutputDecoder.detokenize): it keeps the step loop shorter.
        engine.outputs.frontend_detokenizes = True
        # Everything built so far lives as long as the process: move it out of the collector's
        # reach, so full collections (measured 0.3-1.3 s here) stop landing inside requests.
        gc.collect()
        gc.freeze()
    except BaseException as exc:  # noqa: BLE001 - reported to the frontend, which raises it
        messages.send_bytes(dumps(Failed(portable_error(exc))))
        return
    try:
        messages.send_bytes(dumps(Ready({"num_kv_blocks": engine.kv.num_blocks})))
        StepLoop(engine, _publisher(messages)).run(_receiver(commands))
    except (EOFError, OSError):
        pass  # the frontend is gone: nothing left to serve
    except Exception as exc:  # noqa: BLE001 - a bug outside the engine: still tell the frontend
        logger.exception("engine core failed")
        _send_quietly(messages, Dead(portable_error(exc), traceback.format_exc()))
    finally:
        engine.shutdown()


def _receiver(commands: Connection) -> Callable[[bool], list[Command]]:
    def receive(block: bool) -> list[Command]:
        batch = [loads(commands.recv_bytes())] if block else []
        while commands.poll():
            batch.append(loads(commands.recv_bytes()))
        return batch

    return receive


def _publisher(messages: Connection) -> Callable[[CoreMessage], None]:
    encoder = OutputEncoder()

    def publish(message: CoreMessage) -> None:
        if isinstance(message, StepReport):
            message = StepReport([_portable(r) for r in message.replies],
                                 encoder.encode(message.outputs), message.stats,
                                 message.step_stats)
        elif isinstance(message, Dead):
            logger.error("engine step failed\n%s", message.traceback)
            message = Dead(portable_error(message.error), message.traceback)
        messages.send_bytes(dumps(message))

    return publish


def _portable(reply: Reply) -> Reply:
    if isinstance(reply, Rejected):
        return Rejected(reply.request_id, portable_error(reply.error))
    return reply


def _send_quietly(messages: Connection, message: CoreMessage) -> None:
    try:
        messages.send_bytes(dumps(message))
    except OSError:
        pass  # the frontend is gone too
